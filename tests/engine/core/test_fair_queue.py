"""FairQueue and TenantShares: the admission order between tenants, and the fair share.

The order with one tenant is compared with the rule the scheduler had before tenants,
(priority, preempted first, arrival), on random sequences of queue operations.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.fair_queue import FairQueue, TenantShares
from engine.core.request import Request, RequestStatus


def _old_order_key(request):
    """The scheduler's waiting order before tenants existed."""
    return (request.priority, request.status is not RequestStatus.PREEMPTED,
            request.arrival_index)


def _request(arrival, tenant="", priority=0, preempted=False):
    request = Request(f"r{arrival}", [1, 2, 3], priority=priority, tenant=tenant)
    request.arrival_index = arrival
    if preempted:
        request.status = RequestStatus.PREEMPTED
    return request


def _ids(requests):
    return [r.request_id for r in requests]


def _admit(queue, request):
    queue.remove(request, admitted=True)
    request.status = RequestStatus.RUNNING


def _preempt(queue, request):
    request.status = RequestStatus.PREEMPTED
    queue.add(request)


@settings(max_examples=200, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), tenant=st.sampled_from(["", "key-17"]))
def test_one_tenant_keeps_the_old_order_exactly(seed, tenant):
    rng = random.Random(seed)
    queue, queued, running, arrivals = FairQueue(), [], [], 0
    for _ in range(rng.randrange(1, 80)):
        kind = rng.choices(["add", "admit", "preempt", "finish"], weights=[5, 3, 2, 1])[0]
        if kind == "add":
            request = _request(arrivals, tenant, priority=rng.randrange(3))
            arrivals += 1
            queue.add(request)
            queued.append(request)
        elif kind == "admit" and queued:   # the scheduler admits from the head, or skips
            request = next(queue.in_order()) if rng.random() < 0.7 else rng.choice(queued)
            _admit(queue, request)
            queued.remove(request)
            running.append(request)
        elif kind == "preempt" and running:
            request = running.pop(rng.randrange(len(running)))
            _preempt(queue, request)
            queued.append(request)
        elif kind == "finish" and queued:
            request = queued.pop(rng.randrange(len(queued)))
            queue.remove(request)
            queue.forget(tenant)
        assert _ids(queue) == _ids(sorted(queued, key=_old_order_key))
        assert len(queue) == len(queued)


def test_tenants_take_turns_least_recently_admitted_first():
    queue = FairQueue()
    burst = [_request(i, "a") for i in range(6)]
    late = [_request(6, "b"), _request(7, "c"), _request(8, "b")]
    for request in burst + late:
        queue.add(request)
    assert _ids(queue) == ["r0", "r6", "r7", "r1", "r8", "r2", "r3", "r4", "r5"]
    # Once "a" and then "b" are admitted, "c" (never admitted) goes first, then "a".
    _admit(queue, burst[0])
    _admit(queue, late[0])
    assert _ids(queue) == ["r7", "r1", "r8", "r2", "r3", "r4", "r5"]


def test_a_tenant_with_requests_left_keeps_its_place_and_an_idle_one_goes_first():
    queue = FairQueue()
    requests = [_request(0, "a"), _request(1, "b"), _request(2, "b")]
    for request in requests:
        queue.add(request)
    _admit(queue, requests[1])
    _admit(queue, requests[0])
    queue.add(_request(3, "a"))   # "a" still runs r0: its turn stays after "b"'s
    assert _ids(queue) == ["r2", "r3"]
    queue.forget("a")             # every request of "a" finished: "a" goes first again
    assert _ids(queue) == ["r3", "r2"]


def test_priority_is_strict_and_preempted_lead_their_tenant_only():
    queue = FairQueue()
    requests = [_request(0, "a", priority=1), _request(1, "b", priority=0),
                _request(2, "a", priority=0), _request(3, "b", priority=0),
                _request(4, "a", priority=0, preempted=True)]
    for request in requests:
        queue.add(request)
    # Priority 0: "b" (r1 came first) and "a" take turns; "a" leads with its preempted r4.
    assert _ids(queue) == ["r1", "r4", "r3", "r2", "r0"]


def test_skipped_tenants_are_passed_over_while_iterating():
    queue = FairQueue()
    for i, tenant in enumerate("aabbcc"):
        queue.add(_request(i, tenant))
    seen, skipped = [], set()
    for request in queue.in_order(skipped):
        seen.append(request.request_id)
        if request.tenant == "b":
            skipped.add("b")
    assert seen == ["r0", "r2", "r4", "r1", "r5"]


def test_remove_of_a_request_not_queued_names_it():
    queue = FairQueue()
    queue.add(_request(0, "a"))
    with pytest.raises(ValueError, match="request 'r9' is not waiting"):
        queue.remove(_request(9, "a"))
    with pytest.raises(ValueError, match="request 'r0' is not waiting"):
        queue.remove(_request(0, "a"))   # same id, another request: never confused


@pytest.mark.parametrize("max_num_seqs, tenants, share", [
    (8, 0, 8), (8, 1, 8), (8, 2, 4), (8, 3, 3), (1, 3, 1), (256, 5, 52)])
def test_fair_share_is_the_rounded_up_split_of_the_slots(max_num_seqs, tenants, share):
    shares = TenantShares(max_num_seqs)
    for index in range(tenants):
        shares.add(f"t{index}")
    assert shares.fair_share == share


def test_victim_is_the_newest_of_the_tenant_running_most_within_the_least_priority():
    shares = TenantShares(8)
    running = [_request(0, "a"), _request(1, "a"), _request(2, "a"), _request(3, "b"),
               _request(4, "b", priority=1)]
    for request in running:
        shares.add(request.tenant)
        shares.start(request.tenant)
    assert shares.pick_victim(running).request_id == "r4"     # least important priority
    assert shares.pick_victim(running[:4]).request_id == "r2"  # "a" runs 3, "b" 1
    assert shares.pick_victim([]) is None
    assert not shares.anyone_above_share()                      # share 4: none above
    for _ in range(3):
        shares.start("a")
    assert shares.above_share("a") and shares.below_share("b")
    shares.stop("a")
    assert shares.finish("b") is False and shares.finish("b") is True
