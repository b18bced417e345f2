"""Scheduler with tenants: a burst cannot starve a late tenant, turns, fair-share preemption
that changes no token, n > 1 and priorities with tenants, and one tenant scheduling exactly
as the scheduler did before tenants (compared step by step with the old rule as an oracle).
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.request import RequestStatus
from engine.core.scheduler import Scheduler, SchedulerConfig
from tests.engine.core.test_fair_queue import _old_order_key
from tests.engine.core.test_scheduler import (FakeRunner, _check_invariants, _config, _request,
                                              _run, _tokens, deterministic_next_token)


@pytest.fixture
def rng():
    return random.Random(20250211)


def _step(scheduler, runner):
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    _check_invariants(scheduler)
    return out


def _expected_output(request):
    """What the deterministic fake model generates for the request, whatever the batch."""
    context = list(request.prompt_token_ids)
    for _ in range(request.sampling_params.max_tokens):
        context.append(deterministic_next_token(context))
    return context[request.num_prompt_tokens:]


def _first_scheduled_order(steps):
    order = []
    for out in steps:
        order += [e.request_id for e in out.scheduled if e.request_id not in order]
    return order


def _check_all_done(scheduler, requests):
    assert scheduler.page_manager.num_free_pages == scheduler.config.num_pages - 1
    for request in requests:
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == _expected_output(request)


@pytest.mark.parametrize("max_num_seqs", [8, 32])
def test_a_burst_cannot_push_a_late_tenant_behind_it(rng, max_num_seqs):
    # Tenant "a" floods the queue (as one request with 64 prompts and n=16 would, scaled
    # down); "b" then sends one short request. Before tenants, "b" waited for the whole burst.
    scheduler = Scheduler(_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=256,
                                  num_pages=1024))
    runner = FakeRunner(scheduler)
    burst = [_request(f"a{i}", _tokens(rng, 6), max_tokens=30, tenant="a") for i in range(300)]
    for request in burst:
        scheduler.add_request(request)
    for _ in range(5):
        _step(scheduler, runner)
    late = _request("b0", _tokens(rng, 4), max_tokens=4, tenant="b")
    scheduler.add_request(late)
    steps = []
    while not late.is_finished:
        before = sum(r.num_output_tokens for r in burst)
        steps.append(_step(scheduler, runner))
        assert sum(r.num_output_tokens for r in burst) > before   # "a" keeps going
    # Scheduled in the next step (a request of "a" makes room) and done in max_tokens steps.
    assert "b0" in {e.request_id for e in steps[0].scheduled}
    assert len(steps) == 4
    assert {rid[0] for rid in steps[0].preempted_ids} <= {"a"}
    _run(scheduler, runner)
    _check_all_done(scheduler, burst + [late])
    assert sum(r.num_preemptions for r in burst) <= 1


def test_tenants_take_turns_for_a_single_slot(rng):
    scheduler = Scheduler(_config(max_num_seqs=1))
    for tenant in "abc":
        for index in range(3):
            scheduler.add_request(_request(f"{tenant}{index}", _tokens(rng, 5), max_tokens=3,
                                           tenant=tenant))
    steps = _run(scheduler, FakeRunner(scheduler))
    assert _first_scheduled_order(steps) == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2",
                                             "c2"]
    assert not any(out.preempted_ids for out in steps)   # a full share is never preempted


def test_fair_share_preemption_evens_out_the_slots_and_changes_no_token(rng):
    scheduler = Scheduler(_config(max_num_seqs=8, max_num_batched_tokens=128))
    runner = FakeRunner(scheduler)
    first = [_request(f"a{i}", _tokens(rng, 5), max_tokens=40, tenant="a") for i in range(8)]
    for request in first:
        scheduler.add_request(request)
    _step(scheduler, runner)
    assert scheduler._tenants.running("a") == 8
    second = [_request(f"b{i}", _tokens(rng, 5), max_tokens=10, tenant="b") for i in range(6)]
    for request in second:
        scheduler.add_request(request)
    out = _step(scheduler, runner)
    # Share of 8 slots between 2 tenants: 4 each; the newest requests of "a" give way.
    assert sorted(out.preempted_ids) == ["a4", "a5", "a6", "a7"]
    assert [scheduler._tenants.running(t) for t in "ab"] == [4, 4]
    _run(scheduler, runner)
    _check_all_done(scheduler, first + second)


def test_a_less_important_tenant_never_preempts_nor_overtakes(rng):
    scheduler = Scheduler(_config(max_num_seqs=2))
    runner = FakeRunner(scheduler)
    urgent = [_request(f"a{i}", _tokens(rng, 5), max_tokens=4, tenant="a") for i in range(4)]
    for request in urgent:
        scheduler.add_request(request)
    steps = [_step(scheduler, runner)]
    scheduler.add_request(_request("b0", _tokens(rng, 3), max_tokens=2, tenant="b",
                                   priority=1))
    steps += _run(scheduler, runner)
    assert not any(out.preempted_ids for out in steps)
    assert _first_scheduled_order(steps) == ["a0", "a1", "a2", "a3", "b0"]


def test_n_siblings_of_one_tenant_still_share_their_prompt_pages(rng):
    scheduler = Scheduler(_config(max_num_seqs=4, max_num_batched_tokens=32))
    runner = FakeRunner(scheduler)
    for index in range(6):
        scheduler.add_request(_request(f"a{index}", _tokens(rng, 6), tenant="a"))
    prompt = _tokens(rng, 10)
    siblings = [_request(f"b#{i}", prompt, tenant="b", cache_salt="b",
                         wait_for="b#0" if i else None) for i in range(3)]
    for request in siblings:
        scheduler.add_request(request)
    steps = _run(scheduler, runner)
    assert [r.num_cached_tokens for r in siblings] == [0, 8, 8]
    order = _first_scheduled_order(steps)
    assert order.index("b#0") < 4   # admitted in the first round, not after the burst
    assert all(r.output_token_ids == _expected_output(r) for r in siblings)


# ---- random workloads ------------------------------------------------------------------


class OldOrderScheduler(Scheduler):
    """The oracle: admission and preemption exactly as before tenants existed."""

    def _schedule_waiting(self, step):
        for request in sorted(self._waiting, key=_old_order_key):
            if step.budget == 0 or len(self._running) >= self.config.max_num_seqs:
                break
            if self._must_wait_for_sibling(request):
                continue
            prefix = self.page_manager.get_computed_prefix(request)
            num_new = min(request.num_tokens - prefix.num_tokens, step.budget)
            page_table = self.page_manager.allocate(request, num_new, prefix)
            if page_table is None:
                break
            self._admit(request, step, prefix.num_tokens, num_new, page_table)
        for request in step.admitted.values():
            self._waiting.remove(request, admitted=True)

    def _schedule_or_preempt(self, request, step):
        while True:
            num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
            page_table = self.page_manager.allocate(request, num_new)
            if page_table is not None:
                self._add_to_step(step, request, num_new, page_table)
                return
            victim = max(reversed(self._running), key=lambda r: r.priority)
            self._preempt(victim, step)
            if victim is request:
                return


def _random_script(rng, num_events, tenants):
    """Events (kind, drawn values) replayed identically on several schedulers."""
    prefixes = [_tokens(rng, 12) for _ in range(3)]
    script = []
    for _ in range(num_events):
        kind = rng.choices(["add", "abort", "step"], weights=[3, 1, 6])[0]
        prompt = rng.choice(prefixes)[:rng.randrange(0, 12)] + _tokens(rng, rng.randrange(1, 8))
        script.append((kind, dict(
            prompt=prompt, max_tokens=rng.randrange(0, 12), priority=rng.randrange(3),
            tenant=rng.choice(tenants), num_siblings=rng.choice([0, 0, 0, 1, 2]),
            victim=rng.random())))
    return script


def _replay(scheduler, script):
    runner = FakeRunner(scheduler)
    requests, steps = [], []
    for kind, drawn in script:
        if kind == "add":
            params = dict(max_tokens=drawn["max_tokens"], priority=drawn["priority"],
                          tenant=drawn["tenant"], cache_salt=drawn["tenant"] or None)
            first_id = f"q{len(requests)}"
            for index in range(1 + drawn["num_siblings"]):
                request = _request(f"q{len(requests)}", drawn["prompt"],
                                   wait_for=first_id if index else None, **params)
                try:
                    scheduler.add_request(request)
                except ValueError:
                    break
                requests.append(request)
        elif kind == "abort" and requests:
            scheduler.abort(requests[int(drawn["victim"] * len(requests))].request_id)
        elif kind == "step":
            steps.append(_step(scheduler, runner))
    steps += _run(scheduler, runner, max_steps=5000)
    _check_invariants(scheduler)
    return requests, steps


def _random_config(page_size, num_pages, max_num_seqs, budget):
    return SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                           max_model_len=24, page_size=page_size, num_pages=num_pages)


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), page_size=st.sampled_from([1, 2, 4]),
       num_pages=st.integers(6, 24), max_num_seqs=st.integers(1, 6),
       budget=st.integers(1, 24), tenant=st.sampled_from(["", "k1"]))
def test_one_tenant_schedules_exactly_as_before(seed, page_size, num_pages, max_num_seqs,
                                                budget, tenant):
    script = _random_script(random.Random(seed), 300, tenants=[tenant])
    config = _random_config(page_size, num_pages, max_num_seqs, budget)
    _, steps = _replay(Scheduler(config), script)
    _, old_steps = _replay(OldOrderScheduler(config), script)
    assert steps == old_steps


@settings(max_examples=25, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), page_size=st.sampled_from([1, 2, 4]),
       num_pages=st.integers(6, 24), max_num_seqs=st.integers(1, 6),
       budget=st.integers(1, 24))
def test_random_tenants_leak_nothing_and_always_finish(seed, page_size, num_pages,
                                                       max_num_seqs, budget):
    script = _random_script(random.Random(seed), 600, tenants=["", "a", "b", "c"])
    scheduler = Scheduler(_random_config(page_size, num_pages, max_num_seqs, budget))
    requests, steps = _replay(scheduler, script)
    assert scheduler.page_manager.num_free_pages == num_pages - 1
    assert not scheduler.has_unfinished_requests() and len(scheduler._waiting) == 0
    for request in requests:
        assert request.status.is_finished
        if request.status is not RequestStatus.FINISHED_ABORTED:
            assert request.output_token_ids == _expected_output(request)
    for out in steps:   # no victim is admitted again in the step that preempted it
        assert not set(out.preempted_ids) & {e.request_id for e in out.scheduled}
