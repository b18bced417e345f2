"""Fairness between tenants (no JAX): the waiting queue's order and each tenant's share.

A tenant is whoever a request is billed to (the server's API key); offline use is the one
tenant "". The scheduler admits waiting requests in the order `FairQueue.in_order()` gives:

1. priority, lower first, strictly;
2. within one priority, tenants take turns, one request per turn: the tenant admitted least
   recently goes first; tenants never admitted (or idle since) go before all others, the one
   whose oldest waiting request came first leading;
3. within one tenant: its preempted requests first (they have shown output), then by
   arrival.

With one tenant this is exactly the order (priority, preempted first, arrival), so offline
use and a single-key server behave as they always did.

Turns count requests, not tokens (deficit round-robin by tokens was the alternative): what a
waiting request needs is a running slot and its pages, and it keeps both until it finishes,
so slots are the resource to share; a request's size is already bounded by max_model_len and
its pages checked at admission. Counting requests keeps the bound simple: a tenant's next
request waits behind at most one request of each other tenant.

Turns alone cannot help when every running slot is held by another tenant's long
generations: nothing is admitted until one finishes. So `TenantShares` gives each tenant with
unfinished requests a fair share of the slots, ceil(max_num_seqs / tenants); a request of a
tenant below its share that does not fit preempts the newest request of a tenant above its
share (never one of a more important priority). The victim's tenant stays at or above its
share, so the victim does not come back at once and nothing thrashes. When pages run short
for a running request, the victim is likewise taken from the tenant running the most
(`TenantShares.pick_victim`). Shares count sequences, not pages: a tenant within its share
whose few long sequences hold most pages is not preempted for another's request.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from engine.core.request import Request, RequestStatus


@dataclass(slots=True)
class _TenantQueue:
    """One tenant's waiting requests at one priority."""

    preempted: list[Request] = field(default_factory=list)   # by arrival_index
    waiting: OrderedDict[str, Request] = field(default_factory=OrderedDict)   # by arrival

    def __len__(self) -> int:
        return len(self.preempted) + len(self.waiting)

    def __iter__(self) -> Iterator[Request]:
        return itertools.chain(self.preempted, self.waiting.values())

    def head_arrival(self) -> int:
        return next(iter(self)).arrival_index


class FairQueue:
    """Waiting requests (never admitted, or preempted), in the order they are admitted.

    add/remove cost O(log n) at worst (a preempted request is inserted by arrival); walking
    the order costs O(priorities + tenants) to start, then O(1) per request.
    """

    def __init__(self) -> None:
        self._levels: dict[int, dict[str, _TenantQueue]] = {}   # priority -> tenant -> queue
        self._last_admitted: dict[str, int] = {}   # tenant -> its latest admission's number
        self._num_admitted = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Request]:
        return self.in_order()

    def add(self, request: Request) -> None:
        """Queue a new request (status WAITING) or a preempted one (status PREEMPTED)."""
        tenants = self._levels.setdefault(request.priority, {})
        queue = tenants.setdefault(request.tenant, _TenantQueue())
        if request.status is RequestStatus.PREEMPTED:
            bisect.insort(queue.preempted, request, key=lambda r: r.arrival_index)
        else:
            queue.waiting[request.request_id] = request
        self._size += 1

    def remove(self, request: Request, *, admitted: bool = False) -> None:
        """Take a queued request out: admitted (its tenant's turn is used) or finished.

        Raises:
          ValueError when the request is not queued.
        """
        tenants = self._levels.get(request.priority, {})
        queue = tenants.get(request.tenant)
        if queue is not None and queue.waiting.get(request.request_id) is request:
            del queue.waiting[request.request_id]
        elif queue is not None and request in queue.preempted:   # by identity (eq=False)
            queue.preempted.remove(request)
        else:
            raise ValueError(f"request {request.request_id!r} is not waiting")
        if not queue:
            del tenants[request.tenant]
            if not tenants:
                del self._levels[request.priority]
        self._size -= 1
        if admitted:
            self._last_admitted[request.tenant] = self._num_admitted
            self._num_admitted += 1

    def forget(self, tenant: str) -> None:
        """The tenant has no unfinished request left: its next one goes first in its turn."""
        self._last_admitted.pop(tenant, None)

    def in_order(self, skipped: Collection[str] = frozenset()) -> Iterator[Request]:
        """Every queued request in admission order, lazily.

        Args:
          skipped: tenants whose remaining requests are passed over. The caller may add to it
            while iterating (a tenant that cannot be admitted in this step).

        The queue must not change until the iteration is done.
        """
        for priority in sorted(self._levels):
            tenants = self._levels[priority]
            turns = sorted(tenants, key=lambda t: (self._last_admitted.get(t, -1),
                                                   tenants[t].head_arrival()))
            yield from _round_robin([(t, iter(tenants[t])) for t in turns], skipped)


def _round_robin(turns: Iterable[tuple[str, Iterator[Request]]],
                 skipped: Collection[str]) -> Iterator[Request]:
    """One request of each tenant in turn, until all are exhausted or skipped."""
    turns = list(turns)
    while turns:
        remaining = []
        for tenant, requests in turns:
            request = None if tenant in skipped else next(requests, None)
            if request is not None:
                yield request
                remaining.append((tenant, requests))
        turns = remaining


class TenantShares:
    """Running and unfinished requests per tenant, and the fair share of running slots.

    Args:
      max_num_seqs: running slots shared by all tenants.
    """

    def __init__(self, max_num_seqs: int):
        self.max_num_seqs = max_num_seqs
        self._unfinished: Counter[str] = Counter()
        self._running: Counter[str] = Counter()

    def add(self, tenant: str) -> None:
        self._unfinished[tenant] += 1

    def finish(self, tenant: str) -> bool:
        """One of the tenant's requests finished; True when it has none left."""
        self._unfinished[tenant] -= 1
        if self._unfinished[tenant]:
            return False
        del self._unfinished[tenant]
        return True

    def start(self, tenant: str) -> None:
        self._running[tenant] += 1

    def stop(self, tenant: str) -> None:
        self._running[tenant] -= 1
        if not self._running[tenant]:
            del self._running[tenant]

    def running(self, tenant: str) -> int:
        return self._running[tenant]

    @property
    def fair_share(self) -> int:
        """Running slots each tenant with unfinished requests may hold for sure."""
        return -(-self.max_num_seqs // max(len(self._unfinished), 1))

    def below_share(self, tenant: str) -> bool:
        return self._running[tenant] < self.fair_share

    def above_share(self, tenant: str) -> bool:
        return self._running[tenant] > self.fair_share

    def anyone_above_share(self) -> bool:
        share = self.fair_share
        return any(count > share for count in self._running.values())

    def pick_victim(self, running: Sequence[Request]) -> Request | None:
        """Whom to preempt: the least important priority, then the tenant running the most
        requests, then the newest (`running` is in order of admission). None if empty.

        With one tenant this is the newest request of the least important priority.
        """
        return max(reversed(running), default=None,
                   key=lambda r: (r.priority, self._running[r.tenant]))
