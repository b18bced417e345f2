"""Scheduler: chunked prefill, preemption, abort, prefix hits, priorities, siblings, limits.

A FakeRunner stands in for the model: its "KV cache" holds token ids written through the
page tables, and it reads each sequence's whole context back through its page table before
"sampling". A wrong page table, a bad prefix hit or a write into a shared page therefore
changes the generated tokens or fails an assertion, just as it would corrupt real output.
"""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import page_manager
from engine.core.request import ModelOutput, Request, RequestStatus
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.sampling_params import SamplingParams

VOCAB = 1000
EOS = 0


def deterministic_next_token(context):
    """A 'model' whose next token depends on the whole context (never EOS)."""
    return 1 + (sum((i + 1) * t for i, t in enumerate(context)) * 7919 + len(context)) % (
        VOCAB - 1)


class FakeRunner:
    def __init__(self, scheduler, next_token=deterministic_next_token):
        self.scheduler = scheduler
        self.next_token = next_token
        page_size = scheduler.config.page_size
        self.kv_pages = [[None] * page_size for _ in range(scheduler.config.num_pages)]

    def execute(self, scheduler_output):
        manager = self.scheduler.page_manager
        page_size = self.scheduler.config.page_size
        sampled = []
        for entry in scheduler_output.scheduled:
            table, start = entry.page_table, entry.start_position
            end = start + len(entry.token_ids)
            assert 0 not in table and len(table) * page_size >= end
            for position, token in enumerate(entry.token_ids, start):
                page = table[position // page_size]
                assert manager.ref_count(page) == 1 and not manager.is_cached(page)
                self.kv_pages[page][position % page_size] = token
            context = [self.kv_pages[table[p // page_size]][p % page_size] for p in range(end)]
            request = self.scheduler.get_request(entry.request_id)
            assert context == request.all_token_ids[:end]
            sampled.append(self.next_token(context) if entry.sample else -1)
        padding = [-1] * (-len(sampled) % 4)   # runners pad to a sequence rung
        return ModelOutput(np.array(sampled + padding, dtype=np.int32))


def _config(**overrides):
    fields = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=4,
                  num_pages=128, enable_prefix_caching=True)
    return SchedulerConfig(**{**fields, **overrides})


def _request(request_id, prompt, max_tokens=8, **kwargs):
    params = {k: kwargs.pop(k) for k in list(kwargs) if k in SamplingParams.__slots__}
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=frozenset({EOS}), **kwargs)


def _tokens(rng, n):
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def _run(scheduler, runner, max_steps=10_000):
    """Steps until nothing is left; returns every SchedulerOutput."""
    outputs = []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < max_steps, "no progress"
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
        outputs.append(out)
    return outputs


def _generate(config, requests):
    """Output tokens of each request when run to completion under `config`."""
    scheduler = Scheduler(config)
    for request in requests:
        scheduler.add_request(request)
    outputs = _run(scheduler, FakeRunner(scheduler))
    assert scheduler.page_manager.num_free_pages == config.num_pages - 1
    return {r.request_id: r.output_token_ids for r in requests}, outputs


def _copies(requests):
    return [Request(r.request_id, r.prompt_token_ids, r.sampling_params, r.eos_token_ids,
                    r.priority, r.wait_for) for r in requests]


@pytest.fixture
def rng():
    return random.Random(20240611)


def test_chunked_prefill_spans_steps_within_budget_and_decodes_go_first(rng):
    config = _config(max_num_batched_tokens=8)
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    short = _request("short", _tokens(rng, 3), max_tokens=10)
    scheduler.add_request(short)
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    long_prompt = _tokens(rng, 21)
    scheduler.add_request(_request("long", long_prompt, max_tokens=2))
    starts = []
    for _ in range(3):
        out = scheduler.schedule()
        assert out.num_batched_tokens == 8
        decode, chunk = out.scheduled
        assert decode.request_id == "short" and not decode.is_prefill and decode.sample
        assert chunk.request_id == "long" and chunk.is_prefill
        assert chunk.token_ids == long_prompt[chunk.start_position:chunk.start_position + 7]
        starts.append((chunk.start_position, chunk.sample))
        scheduler.update(out, runner.execute(out))
    assert starts == [(0, False), (7, False), (14, True)]
    assert scheduler.get_request("long").num_output_tokens == 1
    # Chunking changes nothing a user sees.
    _run(scheduler, runner)
    unchunked, _ = _generate(_config(), [_request("short", short.prompt_token_ids, 10),
                                         _request("long", long_prompt, max_tokens=2)])
    assert unchunked["short"] == short.output_token_ids


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_takes_most_recent_and_recomputes_the_same_tokens(rng, caching):
    # 6 usable pages of 2 tokens; each request needs up to 5 pages: they cannot both fit.
    tiny = _config(page_size=2, num_pages=7, enable_prefix_caching=caching)
    requests = [_request(name, _tokens(rng, 4), max_tokens=6) for name in "ab"]
    expected, _ = _generate(_config(page_size=2), _copies(requests))
    outputs, steps = _generate(tiny, requests)
    assert outputs == expected
    assert all(len(tokens) == 6 for tokens in outputs.values())
    preempted = [rid for out in steps for rid in out.preempted_ids]
    assert preempted and set(preempted) == {"b"}
    assert requests[1].num_preemptions == len(preempted)
    # The recompute feeds the prompt and the output kept so far (after any cached prefix).
    first = next(i for i, out in enumerate(steps) if out.preempted_ids)
    resumed = next(e for out in steps[first + 1:] for e in out.scheduled if e.request_id == "b")
    start, end = resumed.start_position, resumed.start_position + len(resumed.token_ids)
    assert resumed.is_prefill and end > 4
    assert start == 0 or (caching and start % 2 == 0)
    assert resumed.token_ids == (requests[1].prompt_token_ids + outputs["b"])[start:end]


def test_tiny_pool_never_deadlocks_nor_starves_the_oldest(rng):
    requests = [_request(f"r{i}", _tokens(rng, rng.randrange(1, 9)), max_tokens=9)
                for i in range(6)]
    expected, _ = _generate(_config(page_size=2), _copies(requests))
    tiny = _config(page_size=2, num_pages=9, max_num_batched_tokens=5)   # one request's worth
    outputs, steps = _generate(tiny, requests)
    assert outputs == expected
    assert all(len(tokens) == 9 for tokens in outputs.values())
    assert "r0" not in {rid for out in steps for rid in out.preempted_ids}
    assert all(out.num_batched_tokens <= 5 for out in steps)


def test_a_waiting_request_that_does_not_fit_is_not_overtaken(rng):
    scheduler = Scheduler(_config(num_pages=9))   # 8 usable pages of 4 tokens
    runner = FakeRunner(scheduler)
    scheduler.add_request(_request("hog", _tokens(rng, 20), max_tokens=8))
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    scheduler.add_request(_request("big", _tokens(rng, 20), max_tokens=2))   # 5 pages, 3 free
    scheduler.add_request(_request("small", _tokens(rng, 3), max_tokens=2))  # would fit
    out = scheduler.schedule()
    assert [e.request_id for e in out.scheduled] == ["hog"]
    scheduler.update(out, runner.execute(out))
    steps = _run(scheduler, runner)
    first_seen = [e.request_id for out in steps for e in out.scheduled if e.start_position == 0]
    assert first_seen == ["big", "small"]


def test_preempting_an_already_scheduled_request_returns_its_tokens_to_the_budget(rng):
    scheduler = Scheduler(_config(max_num_batched_tokens=8, num_pages=9))
    runner = FakeRunner(scheduler)
    scheduler.add_request(_request("low", _tokens(rng, 3), max_tokens=20, priority=1))
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    scheduler.add_request(_request("high", _tokens(rng, 30), max_tokens=1, priority=0))
    steps = _run(scheduler, runner)
    step = next(out for out in steps if out.preempted_ids)
    # "low" decoded first, then lost its pages to "high"'s chunk, which gets the whole budget.
    assert step.preempted_ids == ("low",)
    assert [e.request_id for e in step.scheduled] == ["high"]
    assert step.num_batched_tokens == 8


@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "mid_decode"])
def test_abort_frees_pages_at_once(rng, stage):
    config = _config(max_num_batched_tokens=8)
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    scheduler.add_request(_request("victim", _tokens(rng, 30), max_tokens=20))
    steps = {"waiting": 0, "mid_prefill": 2, "mid_decode": 6}[stage]
    for _ in range(steps):
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
    victim = scheduler.get_request("victim")
    assert (victim.num_output_tokens > 0) == (stage == "mid_decode")
    scheduler.abort("victim")
    assert scheduler.page_manager.page_table("victim") == []
    assert scheduler.page_manager.num_free_pages == config.num_pages - 1
    assert victim.status is RequestStatus.FINISHED_ABORTED
    assert victim.status.finish_reason == "abort"
    assert not scheduler.has_unfinished_requests() and scheduler.get_request("victim") is None
    out = scheduler.schedule()
    assert out.finished_ids == ("victim",) and not out.scheduled
    scheduler.abort("victim")   # unknown ids are ignored
    scheduler.abort("never-added")


def test_abort_between_schedule_and_update_is_skipped(rng):
    scheduler = Scheduler(_config())
    runner = FakeRunner(scheduler)
    for name in "ab":
        scheduler.add_request(_request(name, _tokens(rng, 5)))
    out = scheduler.schedule()
    model_output = runner.execute(out)
    scheduler.abort("a")
    changed = scheduler.update(out, model_output)
    assert [r.request_id for r in changed] == ["b"]
    assert scheduler.num_running == 1


def test_prefix_hit_bills_full_shared_pages_never_the_whole_prompt(rng):
    prompt = _tokens(rng, 10)
    requests = [
        _request("first", prompt, max_tokens=3),
        _request("longer", prompt[:9] + _tokens(rng, 6), max_tokens=3),
        _request("same_8", prompt[:8], max_tokens=3),
        _request("same", prompt, max_tokens=3),
    ]
    expected, _ = _generate(_config(enable_prefix_caching=False), _copies(requests))
    scheduler = Scheduler(_config())
    runner = FakeRunner(scheduler)
    for request in requests:
        scheduler.add_request(request)
        _run(scheduler, runner)   # one after the other, so each finds the pages before it
    assert [r.num_cached_tokens for r in requests] == [0, 8, 4, 8]
    assert {r.request_id: r.output_token_ids for r in requests} == expected
    stats = scheduler.stats()
    assert stats.prefix_cache_hit_tokens == 20
    assert stats.prefix_cache_hit_rate == pytest.approx(20 / (10 + 15 + 8 + 10))


def test_colliding_hashes_never_serve_wrong_pages(rng, monkeypatch):
    monkeypatch.setattr(page_manager, "hash_page", lambda parent, token_ids: b"collide")
    requests = [_request(f"r{i}", _tokens(rng, 9), max_tokens=4) for i in range(4)]
    expected, _ = _generate(_config(enable_prefix_caching=False), _copies(requests))
    outputs, _ = _generate(_config(max_num_seqs=1), requests)
    assert outputs == expected
    assert all(r.num_cached_tokens == 0 for r in requests)


def test_cached_tokens_billed_at_first_admission_survive_preemption(rng):
    shared = _tokens(rng, 4)
    config = _config(page_size=2, num_pages=10)   # 9 usable pages
    scheduler = Scheduler(config)
    runner = FakeRunner(scheduler)
    scheduler.add_request(_request("warm", shared + _tokens(rng, 1), max_tokens=1))
    _run(scheduler, runner)
    scheduler.add_request(_request("old", _tokens(rng, 4), max_tokens=13))
    late = _request("late", shared + _tokens(rng, 1), max_tokens=13)
    scheduler.add_request(late)
    steps = _run(scheduler, runner)
    assert late.num_preemptions >= 1
    readmissions = [e for out in steps for e in out.scheduled
                    if e.request_id == "late" and e.is_prefill]
    # The re-admission hit a different number of cached tokens; the bill keeps the first.
    assert readmissions[-1].start_position != 4
    assert late.num_cached_tokens == 4


def test_priority_lower_first_then_first_come(rng):
    scheduler = Scheduler(_config(max_num_seqs=1))
    for name, priority in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", -1)]:
        scheduler.add_request(_request(name, _tokens(rng, 3), max_tokens=2, priority=priority))
    steps = _run(scheduler, FakeRunner(scheduler))
    order = []
    for out in steps:
        order += [e.request_id for e in out.scheduled if e.request_id not in order]
    assert order == ["e", "b", "d", "a", "c"]


def test_wait_for_siblings_share_the_prompt_pages(rng):
    scheduler = Scheduler(_config(max_num_batched_tokens=16))
    runner = FakeRunner(scheduler)
    prompt = _tokens(rng, 10)
    scheduler.add_request(_request("s0", prompt, temperature=0.7))
    for name in ("s1", "s2"):
        scheduler.add_request(_request(name, prompt, temperature=0.7, wait_for="s0"))
    scheduler.add_request(_request("other", _tokens(rng, 5)))
    out = scheduler.schedule()
    assert [e.request_id for e in out.scheduled] == ["s0", "other"]   # siblings skipped only
    scheduler.update(out, runner.execute(out))
    out = scheduler.schedule()
    siblings = [e for e in out.scheduled if e.request_id in ("s1", "s2")]
    s0_table = scheduler.page_manager.page_table("s0")
    for entry in siblings:
        assert entry.start_position == 8 and entry.token_ids == prompt[8:]
        assert entry.page_table[:2] == s0_table[:2]
        assert scheduler.get_request(entry.request_id).num_cached_tokens == 8
    assert len(siblings) == 2
    scheduler.update(out, runner.execute(out))
    _run(scheduler, runner)


def test_waiter_proceeds_when_its_sibling_is_aborted(rng):
    scheduler = Scheduler(_config(max_num_batched_tokens=4))
    prompt = _tokens(rng, 10)
    scheduler.add_request(_request("s0", prompt))
    scheduler.add_request(_request("s1", prompt, wait_for="s0"))
    scheduler.abort("s0")
    out = scheduler.schedule()
    assert [e.request_id for e in out.scheduled] == ["s1"]


@pytest.mark.parametrize("prompt_len, max_tokens, message", [
    (0, 4, "prompt has 0 tokens"),
    (300, None, "prompt has 300 tokens, beyond max_model_len=256"),
    (250, 10, "prompt has 250 tokens and max_tokens=10, beyond max_model_len=256"),
    (30, 4, "needs 9 KV pages of 4 tokens, beyond the 7 usable pages"),
])
def test_impossible_requests_are_rejected_before_taking_a_page(rng, prompt_len, max_tokens,
                                                               message):
    scheduler = Scheduler(_config(num_pages=8))
    scheduler.add_request(_request("ok", _tokens(rng, 5)))
    scheduler.schedule()
    free_before = scheduler.page_manager.num_free_pages
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(_request("bad", _tokens(rng, prompt_len), max_tokens))
    assert scheduler.page_manager.num_free_pages == free_before
    assert scheduler.get_request("bad") is None and scheduler.num_waiting == 0
    with pytest.raises(ValueError, match="request_id='ok' is already in use"):
        scheduler.add_request(_request("ok", _tokens(rng, 5)))


def test_max_tokens_none_runs_to_max_model_len(rng):
    scheduler = Scheduler(_config(max_model_len=20))
    request = _request("r", _tokens(rng, 7), max_tokens=None)
    scheduler.add_request(request)
    assert request.max_tokens == 13
    _run(scheduler, FakeRunner(scheduler))
    assert request.num_tokens == 20 and request.status.finish_reason == "length"


def _scripted(scheduler, request, tokens):
    """Feeds `tokens` as the sampled ids, one per step; returns the tokens consumed."""
    scheduler.add_request(request)
    consumed = 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        sample = out.scheduled[0].sample
        scheduler.update(out, ModelOutput(np.array([tokens[consumed] if sample else -1],
                                                   dtype=np.int32)))
        consumed += sample
    return consumed


@pytest.mark.parametrize("params, tokens, status, num_output, stop_reason", [
    (dict(), [5, 6, EOS, 7], RequestStatus.FINISHED_STOPPED, 3, None),
    (dict(min_tokens=4), [EOS, 5, EOS, 6, EOS, 7], RequestStatus.FINISHED_STOPPED, 5, None),
    (dict(ignore_eos=True, max_tokens=3), [EOS, EOS, EOS], RequestStatus.FINISHED_LENGTH, 3,
     None),
    (dict(stop_token_ids=[42]), [5, 42, 6], RequestStatus.FINISHED_STOPPED, 2, 42),
    (dict(max_tokens=4), [5, 6, 7, 8, 9], RequestStatus.FINISHED_LENGTH, 4, None),
    (dict(max_tokens=4), [5, 6, 7, EOS], RequestStatus.FINISHED_STOPPED, 4, None),
])
def test_stop_conditions(rng, params, tokens, status, num_output, stop_reason):
    params = {"max_tokens": 8, **params}
    scheduler = Scheduler(_config())
    request = _request("r", _tokens(rng, 6), **params)
    _scripted(scheduler, request, tokens)
    assert request.status is status
    assert request.output_token_ids == tokens[:num_output]
    assert request.stop_reason == stop_reason
    assert scheduler.page_manager.num_free_pages == 127


def test_max_tokens_zero_computes_the_prompt_and_returns_it_once(rng):
    scheduler = Scheduler(_config(max_num_batched_tokens=4))
    request = _request("score", _tokens(rng, 10), max_tokens=0, prompt_logprobs=1)
    scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    changed = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        changed += scheduler.update(out, runner.execute(out))
    assert changed == [request] and request.output_token_ids == []
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_finish_request_for_a_stop_string_frees_pages(rng):
    scheduler = Scheduler(_config())
    runner = FakeRunner(scheduler)
    scheduler.add_request(_request("r", _tokens(rng, 9)))
    out = scheduler.schedule()
    (request,) = scheduler.update(out, runner.execute(out))
    scheduler.finish_request("r", RequestStatus.FINISHED_STOPPED, stop_reason="\n\n")
    assert request.status.finish_reason == "stop" and request.stop_reason == "\n\n"
    assert scheduler.page_manager.usage == 0.0
    with pytest.raises(ValueError, match="status"):
        scheduler.finish_request("r", RequestStatus.RUNNING)


@pytest.mark.parametrize("field, value", [
    ("max_num_seqs", 0), ("max_num_batched_tokens", -1), ("max_model_len", 1.5),
    ("page_size", 0), ("num_pages", 1), ("enable_prefix_caching", "yes")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _config(**{field: value})


# ---- property test ---------------------------------------------------------------------


def _check_invariants(scheduler):
    config, manager = scheduler.config, scheduler.page_manager
    running = [r for r in scheduler._running]
    assert len(running) <= config.max_num_seqs
    owners = {}
    for request in running:
        table = manager.page_table(request.request_id)
        assert 0 not in table and len(set(table)) == len(table)
        assert len(table) * config.page_size >= request.num_computed_tokens
        for index, page in enumerate(table):
            owners.setdefault(page, []).append((request, index))
    for request in scheduler._waiting:
        assert manager.page_table(request.request_id) == []
        assert request.num_computed_tokens == 0
    for page in range(config.num_pages):
        assert manager.ref_count(page) == len(owners.get(page, ()))
    for page, holders in owners.items():
        if len(holders) > 1:   # shared: a cached page inside every holder's computed prefix
            assert manager.is_cached(page)
            assert all(i < r.num_computed_tokens // config.page_size for r, i in holders)
    assert manager.num_free_pages + len(owners) == config.num_pages - 1


def _random_event(rng, scheduler, runner, all_requests, prefixes):
    kind = rng.choices(["add", "abort", "finish", "step"], weights=[3, 1, 1, 6])[0]
    if kind == "add":
        _add_random(rng, scheduler, all_requests, prefixes)
    elif kind == "abort" and all_requests:
        scheduler.abort(rng.choice(all_requests).request_id)
    elif kind == "finish" and all_requests:
        scheduler.finish_request(rng.choice(all_requests).request_id,
                                 RequestStatus.FINISHED_STOPPED, "stop")
    else:
        out = scheduler.schedule()
        assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
        # A step that preempts admits nobody, least of all its victims (that would thrash).
        assert not set(out.preempted_ids) & {e.request_id for e in out.scheduled}
        scheduler.update(out, runner.execute(out))
        _check_invariants(scheduler)


def _add_random(rng, scheduler, all_requests, prefixes):
    prompt = rng.choice(prefixes)[:rng.randrange(0, 12)] + _tokens(rng, rng.randrange(0, 8))
    max_tokens = rng.randrange(0, 12)
    params = dict(max_tokens=max_tokens, min_tokens=min(rng.randrange(0, 3), max_tokens),
                  priority=rng.randrange(3))
    first = _request(f"q{len(all_requests)}", prompt, **params)
    free_before = scheduler.page_manager.num_free_pages
    try:
        scheduler.add_request(first)
    except ValueError:
        assert scheduler.page_manager.num_free_pages == free_before
        return
    all_requests.append(first)
    for _ in range(rng.choice([0, 0, 0, 1, 2])):   # n > 1: siblings sharing the prompt
        sibling = _request(f"q{len(all_requests)}", prompt, wait_for=first.request_id,
                           **params)
        scheduler.add_request(sibling)
        all_requests.append(sibling)


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), page_size=st.sampled_from([1, 2, 4]),
       num_pages=st.integers(6, 24), max_num_seqs=st.integers(1, 6),
       budget=st.integers(1, 24), caching=st.booleans())
def test_random_workloads_leak_nothing_and_always_finish(seed, page_size, num_pages,
                                                        max_num_seqs, budget, caching):
    rng = random.Random(seed)
    scheduler = Scheduler(SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=24,
        page_size=page_size, num_pages=num_pages, enable_prefix_caching=caching))
    runner = FakeRunner(scheduler, next_token=lambda context: rng.randrange(0, 12))
    prefixes = [_tokens(rng, 12) for _ in range(3)]
    all_requests = []
    for _ in range(1000):
        _random_event(rng, scheduler, runner, all_requests, prefixes)
    _run(scheduler, runner, max_steps=5000)
    _check_invariants(scheduler)
    assert scheduler.page_manager.num_free_pages == num_pages - 1
    for request in all_requests:
        assert request.status.is_finished
        assert request.num_output_tokens <= request.max_tokens
        if request.status is RequestStatus.FINISHED_LENGTH:
            assert request.num_output_tokens == request.max_tokens
