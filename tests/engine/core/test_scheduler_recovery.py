"""After the KV cache's contents are lost (the engine rebuilt it after a failed step), every
running request recomputes its tokens and no cached page is reused: the same tokens come
out, nothing leaks. The fake runner's KV is wiped too, so any stale page read would show.
"""

import random

import pytest

from engine.core.page_manager import PageManager
from engine.core.request import Request, RequestStatus
from engine.core.scheduler import Scheduler
from tests.engine.core.test_scheduler import (FakeRunner, _check_invariants, _config, _request,
                                              _run, _tokens)
from tests.engine.core.test_scheduler_tenants import _expected_output


@pytest.mark.parametrize("apply_update", [False, True])
def test_lost_kv_is_recomputed_and_never_served_from_the_cache(apply_update):
    rng = random.Random(5)
    scheduler = Scheduler(_config(max_num_batched_tokens=16))
    runner = FakeRunner(scheduler)
    shared = _tokens(rng, 8)
    requests = [_request(f"r{i}", shared + _tokens(rng, 3), max_tokens=6, tenant="ab"[i % 2],
                         cache_salt="k") for i in range(5)]
    for request in requests:
        scheduler.add_request(request)
    for _ in range(4):
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
    out = scheduler.schedule()   # this step "fails": it is undone, or its results applied
    if apply_update:
        scheduler.update(out, runner.execute(out))
    else:
        scheduler.rollback(out)
    running = [r.request_id for r in requests if r.status is RequestStatus.RUNNING]
    assert running and sorted(scheduler.preempt_all()) == sorted(running)
    scheduler.reset_prefix_cache()
    runner.kv_pages = [[None] * 4 for _ in runner.kv_pages]   # the rebuilt, empty cache
    manager = scheduler.page_manager
    assert manager.num_cached_pages == 0 and manager.num_free_pages == 127
    _check_invariants(scheduler)
    late = _request("late", shared + _tokens(rng, 2), max_tokens=2, cache_salt="k")
    scheduler.add_request(late)
    steps = _run(scheduler, runner)
    # Each recomputes from its start or from pages computed again since (FakeRunner checks
    # every context it reads, and the wiped cache holds nothing stale).
    for request_id in running:
        entry = next(e for out in steps for e in out.scheduled if e.request_id == request_id)
        assert entry.is_prefill and entry.start_position % 4 == 0
    assert late.num_cached_tokens in (0, 8)   # 8 only from pages computed after the loss
    for request in requests + [late]:
        assert request.output_token_ids == _expected_output(request)
    assert manager.num_free_pages == 127
    assert scheduler.stats().num_preemptions >= len(running)


def test_reset_prefix_cache_keeps_pages_held_and_frees_the_rest():
    manager = PageManager(num_pages=9, page_size=2)
    held = Request("held", [1, 2, 3, 4, 5])
    table = manager.allocate(held, 5)
    held.num_computed_tokens = 5
    manager.commit(held)
    done = Request("done", [7, 8, 9])
    manager.allocate(done, 3)
    done.num_computed_tokens = 3
    manager.commit(done)
    manager.free(done)
    assert manager.num_cached_pages == 3 and manager.num_free_pages == 5
    manager.reset_prefix_cache()
    assert manager.num_cached_pages == 0 and manager.num_free_pages == 5
    assert manager.page_table("held") == table and not manager.is_cached(table[0])
    assert manager.get_computed_prefix(Request("again", [1, 2, 3, 4, 5])).num_tokens == 0
    manager.free(held)
    assert manager.num_free_pages == 8
