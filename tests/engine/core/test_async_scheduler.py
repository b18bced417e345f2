"""Async scheduling at the scheduler: step N+1 is planned before step N's tokens come back.

The fake "device" here resolves PENDING_TOKEN from the previous step's draws, as the runner's
forward does, and checks every context it reads against the tokens the request will have. A
request finishing at step N (EOS, a stop token, a stop string, an abort) must never get the
token its row in step N+1 drew, and pages must never leak.
"""

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.request import PENDING_TOKEN, ModelOutput, RequestStatus
from engine.core.scheduler import Scheduler, SchedulerConfig
from tests.engine.core.test_scheduler import EOS, _check_invariants, _request, _tokens


def next_token(context):
    """A deterministic 'model' that sometimes draws EOS, so requests stop mid-flight."""
    value = (sum((i + 3) * t for i, t in enumerate(context)) * 7919 + len(context)) % 997
    return EOS if value % 9 == 0 else 1 + value


def expected_output(request, max_model_len):
    """The request's output run alone and in order: EOS (from min_tokens on) stops it."""
    context, output = list(request.prompt_token_ids), []
    while len(output) < request.max_tokens and len(context) < max_model_len:
        token = next_token(context)
        context.append(token)
        output.append(token)
        if token == EOS and len(output) >= request.sampling_params.min_tokens:
            break
    return output


class AsyncFakeDevice:
    """Runs a step when it is launched, writing K/V "pages" of token ids; a PENDING_TOKEN
    row feeds the previous step's draw for that request, which the host has not seen."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        config = scheduler.config
        self.kv_pages = [[None] * config.page_size for _ in range(config.num_pages)]
        self.drawn: dict[str, int] = {}   # the last launched step's draws

    def launch(self, scheduler_output):
        page_size = self.scheduler.config.page_size
        drawn = {}
        for entry in scheduler_output.scheduled:
            request = self.scheduler.get_request(entry.request_id)
            tokens = list(entry.token_ids)
            known = request.all_token_ids
            if PENDING_TOKEN in tokens:
                assert tokens.index(PENDING_TOKEN) == len(tokens) - 1   # only the last
                assert entry.start_position + len(tokens) - 1 == len(known)
                tokens[-1] = self.drawn[entry.request_id]
                known = known + [tokens[-1]]
            end = entry.start_position + len(tokens)
            for position, token in enumerate(tokens, entry.start_position):
                page = entry.page_table[position // page_size]
                assert not self.scheduler.page_manager.is_cached(page)
                self.kv_pages[page][position % page_size] = token
            context = [self.kv_pages[entry.page_table[p // page_size]][p % page_size]
                       for p in range(end)]
            assert context == known[:end]
            if entry.sample:
                drawn[entry.request_id] = next_token(context)
        self.drawn = drawn
        return [drawn.get(entry.request_id, -1) for entry in scheduler_output.scheduled]


def run_async(scheduler, device, rng, requests, abort_rate=0.0, stop_rate=0.0, max_steps=5000):
    """Launch N+1, then apply N; aborts and stop strings land between the two."""
    in_flight, steps = None, 0
    while scheduler.has_unfinished_requests() or in_flight is not None:
        steps += 1
        assert steps < max_steps, "no progress"
        out = scheduler.schedule()
        launched = (out, device.launch(out)) if out.scheduled else None
        if in_flight is not None:
            previous, tokens = in_flight
            scheduler.update(previous, ModelOutput(np.asarray(tokens, np.int32)))
        in_flight = launched
        live = [r for r in requests if not r.is_finished]
        if live and rng.random() < abort_rate:
            scheduler.abort(rng.choice(live).request_id)
        elif live and rng.random() < stop_rate:   # what a stop string does
            scheduler.finish_request(rng.choice(live).request_id,
                                     RequestStatus.FINISHED_STOPPED, "stop")
        _check_invariants(scheduler)


@settings(max_examples=40, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), page_size=st.sampled_from([1, 2, 4]),
       num_pages=st.integers(8, 40), max_num_seqs=st.integers(1, 6),
       budget=st.integers(6, 24), caching=st.booleans(), abort_rate=st.sampled_from([0, 0.05]))
def test_async_outputs_equal_each_request_alone_and_nothing_leaks(
        seed, page_size, num_pages, max_num_seqs, budget, caching, abort_rate):
    rng = random.Random(seed)
    max_model_len = min(32, (num_pages - 1) * page_size)
    scheduler = Scheduler(SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
        page_size=page_size, num_pages=num_pages, enable_prefix_caching=caching))
    shared = _tokens(rng, 10)
    requests = []
    for index in range(rng.randrange(1, 12)):
        prompt = shared[:rng.randrange(0, 10)] + _tokens(rng, rng.randrange(1, 8))
        max_tokens = rng.randrange(0, 16)
        first = _request(f"r{index}", prompt, max_tokens=max_tokens,
                         min_tokens=min(rng.randrange(0, 3), max_tokens))
        try:
            scheduler.add_request(first)
        except ValueError:
            continue
        requests.append(first)
        if rng.random() < 0.2:   # n = 2: the sibling waits for the prompt's pages
            sibling = _request(f"r{index}#1", prompt, max_tokens=max_tokens,
                               min_tokens=first.sampling_params.min_tokens,
                               wait_for=first.request_id)
            scheduler.add_request(sibling)
            requests.append(sibling)
    run_async(scheduler, AsyncFakeDevice(scheduler), rng, requests, abort_rate=abort_rate,
              stop_rate=abort_rate)
    assert scheduler.page_manager.num_free_pages == num_pages - 1
    for request in requests:
        assert request.is_finished and request.num_pending == 0
        expected = expected_output(request, max_model_len)
        if request.status is RequestStatus.FINISHED_ABORTED or request.stop_reason == "stop":
            assert request.output_token_ids == expected[:request.num_output_tokens]
        else:   # EOS, max_tokens, max_model_len: every token, none past the end
            assert request.output_token_ids == expected


def test_a_request_finished_in_flight_gets_no_token_from_the_next_step():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                          max_model_len=64, page_size=4, num_pages=32))
    device = AsyncFakeDevice(scheduler)
    request = _request("a", [5, 6, 7], max_tokens=10)
    scheduler.add_request(request)
    first = scheduler.schedule()
    first_tokens = device.launch(first)
    second = scheduler.schedule()       # planned on the pending token
    assert second.scheduled[0].token_ids == [PENDING_TOKEN]
    assert request.num_pending == 2 and request.num_computed_tokens == 4
    device.launch(second)
    scheduler.update(first, ModelOutput(np.asarray(first_tokens, np.int32)))
    assert request.output_token_ids == first_tokens and request.num_pending == 1
    scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED, "stop")   # a stop string
    scheduler.update(second, ModelOutput(np.asarray([123], np.int32)))
    assert request.output_token_ids == first_tokens
    assert scheduler.page_manager.num_free_pages == 31


def test_rollback_undoes_a_step_that_never_ran():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                          max_model_len=64, page_size=4, num_pages=32))
    request = _request("a", [5, 6, 7, 8, 9], max_tokens=4)
    scheduler.add_request(request)
    first = scheduler.schedule()
    second = scheduler.schedule()
    scheduler.rollback(second)
    scheduler.rollback(first)
    assert request.num_pending == 0 and request.num_computed_tokens == 0
    again = scheduler.schedule()   # the same work is planned again
    assert again.scheduled[0].token_ids == [5, 6, 7, 8, 9] and again.scheduled[0].sample


def test_a_stale_row_never_reaches_a_new_request_that_reuses_the_id():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                          max_model_len=64, page_size=4, num_pages=32))
    old = _request("a", [5, 6, 7], max_tokens=10)
    scheduler.add_request(old)
    first = scheduler.schedule()
    second = scheduler.schedule()       # in flight when "a" ends
    scheduler.update(first, ModelOutput(np.asarray([11], np.int32)))
    scheduler.abort("a")
    new = _request("a", [8, 9], max_tokens=10)   # the id is free again
    scheduler.add_request(new)
    scheduler.update(second, ModelOutput(np.asarray([99], np.int32)))   # old's row
    assert new.output_token_ids == [] and new.num_pending == 0
    assert old.output_token_ids == [11]
    scheduler.rollback(second)   # a stale step undone: nothing of new's changes either
    assert new.num_computed_tokens == 0 and new.num_pending == 0
