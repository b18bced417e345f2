"""A Generation bills what its client was sent, and its ledger row never falls more than
UNRECORDED_TOKENS_PER_CHOICE per choice behind what was sent (the kill -9 bound).

The engine thread is a stand-in that hands the Generation outputs the test chooses (as the
real one does, on its sink); the ledger is real SQLite, read directly."""

import random
import threading
import time

import pytest

from engine.metering import schema
from engine.openai.prompts import EnginePrompt
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.serving.generation import UNRECORDED_TOKENS_PER_CHOICE, ClientWatch, Generation
from engine.serving.metrics import ServerMetrics

BOUND = UNRECORDED_TOKENS_PER_CHOICE


class StandInEngine:
    """EngineThread's add/abort; `emit` plays one engine step for a request."""

    def __init__(self, rng: random.Random):
        self.rng, self.added, self.sinks, self.tokens = rng, [], {}, {}

    def add(self, request_id, prompt, params, sink, *, tenant=""):
        self.added.append((request_id, prompt, tenant))
        self.sinks[request_id], self.tokens[request_id] = sink, []

    def emit(self, request_id: str, count: int, finish_reason: str | None = None) -> None:
        self.tokens[request_id] += [self.rng.randrange(3, 300) for _ in range(count)]
        sink, tokens = self.sinks[request_id], list(self.tokens[request_id])
        prompt_ids = self.added[[r for r, *_ in self.added].index(request_id)][1][
            "prompt_token_ids"]
        sink.on_output(RequestOutput(
            request_id, None, prompt_ids,
            [CompletionOutput(0, "x" * len(tokens), tokens, finish_reason=finish_reason)],
            finished=finish_reason is not None, num_cached_tokens=2), time.monotonic())

    def abort(self, request_id: str) -> None:
        self.emit(request_id, 0, "abort")


@pytest.fixture
def rng():
    return random.Random(20250312)


def _start(ledger, engine, rng, **fields) -> Generation:
    key = ledger.get_key("team-a") or ledger.create_key("team-a")[0]
    prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(5, 40))]
    generation = Generation(
        response_id=f"cmpl-{rng.getrandbits(32):x}", prompts=[EnginePrompt(None, prompt)],
        params=SamplingParams(max_tokens=200), key=key, model="tiny", ledger=ledger,
        metrics=ServerMetrics("tiny", lambda: None, lambda: True), engine=engine,
        arrival=time.monotonic(), **fields)
    assert ledger.try_admit(generation.response_id, key, "tiny", len(prompt) + 200,
                            prompt_tokens=generation.prompt_tokens).allowed
    generation.submit()
    return generation


def _row(ledger, generation):
    with ledger._db.connect() as conn:
        return conn.execute(schema.requests.select().where(
            schema.requests.c.id == generation.response_id)).one()


def test_submit_salts_the_prompt_and_names_the_tenant(ledger, rng):
    engine = StandInEngine(rng)
    salted = _start(ledger, engine, rng, tenant="17", cache_salt="17")
    shared = _start(ledger, engine, rng)
    (_, prompt, tenant), (_, plain, no_tenant) = engine.added
    assert (prompt["cache_salt"], tenant) == ("17", "17")
    assert "cache_salt" not in plain and no_tenant == ""
    assert prompt["prompt_token_ids"] == salted.prompts[0].token_ids
    assert _row(ledger, shared).prompt_tokens == len(shared.prompts[0].token_ids)


@pytest.mark.parametrize("steps", [
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [3, 8, 1, 9, 2],          # 9: one batch past the bound is recorded before it is sent
    [BOUND, BOUND, BOUND],
    [40, 1, 25],              # a client far behind the engine
])
def test_a_stream_row_stays_within_the_bound_of_what_was_sent(ledger, rng, steps):
    engine = StandInEngine(rng)
    generation = _start(ledger, engine, rng)
    request_id = generation.request_ids[0]
    updates = generation.updates(ClientWatch(None))
    sent = 0
    for count in steps:
        engine.emit(request_id, count)
        next(updates)             # the batch of `count` is about to be written to the client
        billed = _row(ledger, generation).completion_tokens
        assert billed >= sent + count - BOUND                 # a crash now loses <= BOUND
        assert billed <= (sent + count if count > BOUND else sent)   # never billed unsent
        sent += count
    updates.close()               # the client left while the last batch was being written
    usage = generation.abort()
    row = _row(ledger, generation)
    assert (row.status, row.completion_tokens) == ("aborted", sent - steps[-1])
    assert (usage.prompt_tokens, usage.cached_tokens) == (generation.prompt_tokens, 2)


def test_a_backlog_of_engine_steps_goes_out_in_pieces_each_billed_once_sent(ledger, rng):
    """The engine adds one token per choice per step; a client 40 steps behind gets them in
    pieces of at most BOUND tokens, none billed before it is sent."""
    engine = StandInEngine(rng)
    generation = _start(ledger, engine, rng)
    request_id = generation.request_ids[0]
    updates = generation.updates(ClientWatch(None))
    for _ in range(40):
        engine.emit(request_id, 1)
    sent, pieces = 0, []
    while sent < 40:
        piece = next(updates)     # about to be written to the client
        after = len(piece[0].outputs[0].token_ids)
        billed = _row(ledger, generation).completion_tokens
        assert after - BOUND <= billed <= sent, (sent, after, billed)
        pieces.append(after - sent)
        sent = after
    assert pieces == [BOUND] * (40 // BOUND) + ([40 % BOUND] if 40 % BOUND else [])
    updates.close()               # the client left while the last piece was being written
    generation.abort()
    assert _row(ledger, generation).completion_tokens == 40 - pieces[-1]


def test_an_aborted_stream_is_billed_for_what_was_sent_not_generated(ledger, rng):
    ledger.set_price("tiny", 0.6, 0.15, 2.4)
    engine = StandInEngine(rng)
    generation = _start(ledger, engine, rng)
    request_id = generation.request_ids[0]
    updates = generation.updates(ClientWatch(None))
    engine.emit(request_id, 6)
    next(updates)
    engine.emit(request_id, 4)
    next(updates)                 # 6 sent; the batch of 4 is being written
    engine.emit(request_id, 50)   # the engine runs on while the client stalls
    updates.close()               # ... and the write fails
    generation.abort()
    row = _row(ledger, generation)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (
        "aborted", generation.prompt_tokens, 6)
    assert row.cost == pytest.approx(((generation.prompt_tokens - 2) * 0.6 + 2 * 0.15
                                      + 6 * 2.4) / 1e6)


def test_a_non_streaming_row_follows_the_tokens_generated(ledger, rng):
    engine = StandInEngine(rng)
    generation = _start(ledger, engine, rng)
    request_id = generation.request_ids[0]
    waiter = threading.Thread(target=generation.wait, args=(ClientWatch(None),))
    waiter.start()
    generated = 0
    for count in (5, 17, 3):
        engine.emit(request_id, count)
        generated += count
        deadline = time.monotonic() + 10
        while _row(ledger, generation).completion_tokens != generated:
            assert time.monotonic() < deadline, "progress never reached the ledger"
            time.sleep(0.005)
    engine.emit(request_id, 1, "length")
    waiter.join(10)
    usage = generation.finalize()
    row = _row(ledger, generation)
    assert (row.status, row.completion_tokens, usage.completion_tokens) == (
        "completed", generated + 1, generated + 1)
