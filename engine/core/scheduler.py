"""The scheduler: which requests run each step, how many tokens each, in which pages (no JAX).

One rule drives everything: a request's num_computed_tokens catches up with its num_tokens.
Each step spends one token budget (max_num_batched_tokens) on running decodes first, then on
prefill chunks: running requests part-way through their prompt, then waiting requests in
order of priority, then turns between tenants, then (preempted first, arrival) within a
tenant (engine/core/fair_queue.py; with one tenant: (priority, preempted first, arrival)).
Chunked prefill, prefix caching and preemption (free a request's pages, recompute its
tokens later) fall out of that rule.

schedule() counts each scheduled step as run (num_computed_tokens advances, a drawn token
is pending), so with async scheduling the next step is planned while this one runs: a
request whose token is pending feeds PENDING_TOKEN, which the runner takes from the device.
update() then appends the drawn tokens; a request that finished meanwhile (EOS, a stop
string, an abort) has its planned row in the next step ignored. Pages are committed to the
prefix cache only once their tokens are known.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engine.core.fair_queue import FairQueue, TenantShares
from engine.core.page_manager import PageManager
from engine.core.request import (ModelOutput, Request, RequestStatus, ScheduledRequest,
                                 SchedulerOutput, check_stop, planned_token_ids)
# The engine imports both from here; they live apart to keep this file to the scheduling.
from engine.core.scheduler_config import SchedulerConfig, SchedulerStats

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Step:
    """What one schedule() call has decided so far."""

    budget: int
    scheduled: dict[str, ScheduledRequest] = field(default_factory=dict)  # in feed order
    preempted: list[Request] = field(default_factory=list)   # queued again once planned
    admitted: dict[str, Request] = field(default_factory=dict)   # by id, in admission order


class Scheduler:
    """Admits requests, plans each step and applies its results.

    Usage, once per step: `out = schedule()`; run the model on it; `update(out, model_out)`.
    With async scheduling the next schedule() comes before this update(): at most one step
    is in flight. A step that fails is undone with `rollback(out)` instead of update().
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.page_manager = PageManager(config.num_pages, config.page_size,
                                        config.enable_prefix_caching)
        self._requests: dict[str, Request] = {}   # unfinished requests by id
        self._waiting = FairQueue()                # in order of admission to come
        self._running: list[Request] = []          # in order of admission
        self._tenants = TenantShares(config.max_num_seqs)
        self._finished_ids: list[str] = []         # since the last schedule()
        self._num_arrivals = 0
        self._num_preemptions = 0

    def add_request(self, request: Request) -> None:
        """Queue a new request; raises ValueError (before taking any page) if it can never run.

        Resolves request.max_tokens (None means up to max_model_len) and assigns arrival_index.
        """
        self._validate(request)
        if request.wait_for is not None and request.wait_for not in self._requests:
            request.wait_for = None   # the sibling is done or unknown: nothing to wait for
        request.arrival_index = self._num_arrivals
        self._num_arrivals += 1
        self._requests[request.request_id] = request
        self._tenants.add(request.tenant)
        self._waiting.add(request)

    def _validate(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id={request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} has already been scheduled")
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = request.sampling_params.max_tokens
        request.max_tokens = self.config.resolve_max_tokens(request.num_prompt_tokens,
                                                            max_tokens)

    def finish_request(self, request_id: str, status: RequestStatus,
                       stop_reason: int | str | None = None) -> None:
        """End a request now (stop string, abort) and free its pages; unknown ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"status={status}: expected a FINISHED_* status")
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
            self._tenants.stop(request.tenant)
        else:
            self._waiting.remove(request)
        if self._tenants.finish(request.tenant):
            self._waiting.forget(request.tenant)
        self.page_manager.free(request)
        request.status = status
        request.stop_reason = stop_reason
        request.num_pending = 0   # a draw still in flight is discarded, never appended
        self._finished_ids.append(request_id)

    def abort(self, request_id: str) -> None:
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def preempt_all(self) -> list[str]:
        """Take back every running request's pages, as a preemption does (for a KV cache
        whose contents were lost): each waits again, keeps its output and recomputes its
        tokens. Call with no step in flight (each updated or rolled back). Returns their
        ids."""
        step = _Step(budget=0)
        for request in list(self._running):
            self._preempt(request, step)
        for request in step.preempted:
            self._waiting.add(request)
        return [request.request_id for request in step.preempted]

    def reset_prefix_cache(self) -> None:
        """No cached page is reused from now on (their KV was lost)."""
        self.page_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def stats(self) -> SchedulerStats:
        cache = self.page_manager.stats
        return SchedulerStats(
            num_running=len(self._running), num_waiting=len(self._waiting),
            num_free_pages=self.page_manager.num_free_pages,
            page_usage=self.page_manager.usage,
            prefix_cache_queried_tokens=cache.queried_tokens,
            prefix_cache_hit_tokens=cache.hit_tokens,
            prefix_cache_hit_rate=cache.hit_rate, num_preemptions=self._num_preemptions)

    def schedule(self) -> SchedulerOutput:
        """Plan one step: running decodes, then running prefill chunks, then admissions."""
        step = _Step(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted:   # under page pressure, admitting more would only thrash
            self._schedule_waiting(step)
        # Queued only now, so that no victim is admitted again in the step that preempted it.
        for request in step.preempted:
            self._waiting.add(request)
        finished_ids, self._finished_ids = tuple(self._finished_ids), []
        scheduled = tuple(step.scheduled.values())
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=sum(len(entry.token_ids) for entry in scheduled),
            preempted_ids=tuple(r.request_id for r in step.preempted),
            finished_ids=finished_ids)

    def _schedule_running(self, step: _Step) -> None:
        # Snapshot: preemption removes requests from _running while we iterate. A request
        # sure to end with its pending token (max_tokens, max_model_len) gets no more.
        decodes, prefills = [], []
        for request in self._running:
            if not self._ends_when_pending_arrives(request):
                remaining = request.num_planned_tokens - request.num_computed_tokens
                if remaining == 1:
                    decodes.append(request)
                elif remaining > 1:
                    prefills.append(request)
        for request in decodes + prefills:
            if step.budget == 0:
                return
            if request.status is RequestStatus.RUNNING:   # else preempted in this loop
                self._schedule_or_preempt(request, step)

    def _ends_when_pending_arrives(self, request: Request) -> bool:
        return request.num_pending > 0 and (
            request.num_output_tokens + request.num_pending >= request.max_tokens
            or request.num_planned_tokens >= self.config.max_model_len)

    def _schedule_or_preempt(self, request: Request, step: _Step) -> None:
        """Schedule the request's next chunk, preempting until its pages fit: the
        lowest-priority request of the tenant running the most, most recently admitted
        (TenantShares.pick_victim); that victim may be the request itself."""
        while True:
            # Recomputed each try: preempting a request scheduled earlier returns its tokens.
            num_new = min(request.num_planned_tokens - request.num_computed_tokens, step.budget)
            page_table = self.page_manager.allocate(request, num_new)
            if page_table is not None:
                self._add_to_step(step, request, num_new, page_table)
                return
            victim = self._tenants.pick_victim(self._running)
            self._preempt(victim, step)
            if victim is request:
                return

    def _preempt(self, request: Request, step: _Step) -> None:
        entry = step.scheduled.pop(request.request_id, None)
        if entry is not None:   # already planned this step: take back its tokens
            step.budget += len(entry.token_ids)
            request.num_pending -= entry.sample
        self._running.remove(request)
        self._tenants.stop(request.tenant)
        self.page_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        step.preempted.append(request)

    def _schedule_waiting(self, step: _Step) -> None:
        full_tenants: set[str] = set()   # at or above their share, and do not fit
        blocked_priority = 0
        for request in self._waiting.in_order(skipped=full_tenants):
            if step.budget == 0 or (full_tenants and request.priority > blocked_priority):
                break   # priorities are strict: nothing less important overtakes
            if self._must_wait_for_sibling(request) or request.num_pending:
                continue   # skipped, but does not hold back the requests behind it
                           # (a request preempted in flight waits for its drawn token)
            if self._try_admit(request, step):
                continue
            if self._tenants.below_share(request.tenant):
                break   # FCFS: later requests may not overtake one entitled to its slot
            # Its tenant holds its share: other tenants' requests may go first.
            full_tenants.add(request.tenant)
            blocked_priority = request.priority
        for request in step.admitted.values():
            self._waiting.remove(request, admitted=True)

    def _try_admit(self, request: Request, step: _Step) -> bool:
        """Admit the waiting request into this step if a slot and its pages are free; while
        they are not and its tenant is below its fair share, preempt a request of a tenant
        above its share. False when it does not fit."""
        while True:
            if len(self._running) < self.config.max_num_seqs:
                prefix = self.page_manager.get_computed_prefix(request)
                num_new = min(request.num_tokens - prefix.num_tokens, step.budget)
                page_table = self.page_manager.allocate(request, num_new, prefix)
                if page_table is not None:
                    self._admit(request, step, prefix.num_tokens, num_new, page_table)
                    return True
            victim = self._fair_share_victim(request, step)
            if victim is None:
                return False
            self._preempt(victim, step)

    def _fair_share_victim(self, request: Request, step: _Step) -> Request | None:
        tenants = self._tenants
        if not (tenants.below_share(request.tenant) and tenants.anyone_above_share()):
            return None   # the common case, and always so with one tenant
        candidates = [r for r in self._running
                      if r.priority >= request.priority and tenants.above_share(r.tenant)
                      and r.request_id not in step.admitted]
        return tenants.pick_victim(candidates)

    def _admit(self, request: Request, step: _Step, num_cached: int, num_new: int,
               page_table: list[int]) -> None:
        if request.status is RequestStatus.WAITING:   # first admission: what is billed
            request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_cached
        self._running.append(request)
        self._tenants.start(request.tenant)
        step.admitted[request.request_id] = request
        self._add_to_step(step, request, num_new, page_table)

    def _must_wait_for_sibling(self, request: Request) -> bool:
        sibling = self._requests.get(request.wait_for) if request.wait_for else None
        if sibling is None:
            return False
        # An output token means the prompt was computed once and its pages committed, even
        # if the sibling has been preempted since.
        return sibling.num_output_tokens == 0

    def _add_to_step(self, step: _Step, request: Request, num_new: int,
                     page_table: list[int]) -> None:
        start = request.num_computed_tokens
        sample = start + num_new == request.num_planned_tokens
        has_output = request.num_output_tokens + request.num_pending > 0
        is_decode = sample and num_new == 1 and has_output
        step.scheduled[request.request_id] = ScheduledRequest(
            request_id=request.request_id,
            token_ids=planned_token_ids(request, start, start + num_new),
            start_position=start, page_table=page_table,
            sample=sample, is_prefill=not is_decode, arrival_index=request.arrival_index)
        step.budget -= num_new
        # Counted as run: the next schedule() may come before this step's update().
        request.num_computed_tokens = start + num_new
        request.num_pending += sample

    def update(self, scheduler_output: SchedulerOutput,
               model_output: ModelOutput) -> list[Request]:
        """Apply one step's results.

        Commits the pages its tokens filled to the prefix cache, appends each sampled token
        and checks the stop conditions; finished requests get their status and stop_reason,
        and their pages are freed. A request preempted since the step was scheduled still
        gets its token (drawn from its whole context); it recomputes it with the rest.

        Returns:
          The requests that got a new token this step, finished ones included (a request
          with max_tokens=0 is returned once its prompt is computed, with no new token).
          Entries of requests that finished since schedule() (abort, stop string) are
          skipped: their tokens are never emitted.
        """
        changed: list[Request] = []
        sampled = model_output.sampled_token_ids.tolist()   # Python ints, read once
        for row, entry in enumerate(scheduler_output.scheduled):
            request = self._scheduled_request(entry)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.page_manager.commit(request, entry.start_position + len(entry.token_ids))
            if entry.sample:
                request.num_pending -= 1
                self._append_token(request, sampled[row])
                changed.append(request)
        return changed

    def rollback(self, scheduler_output: SchedulerOutput) -> None:
        """Undo what schedule() counted for a step that did not run (it failed, or ran on
        the results of one that failed): its requests compute those tokens again. Two
        steps in flight may be rolled back in either order (each request goes back to the
        earliest start_position, and each pending draw is taken back once)."""
        for entry in scheduler_output.scheduled:
            request = self._scheduled_request(entry)
            if request is None:
                continue
            request.num_pending -= entry.sample
            if request.status is RequestStatus.RUNNING:
                request.num_computed_tokens = min(request.num_computed_tokens,
                                                  entry.start_position)

    def _scheduled_request(self, entry: ScheduledRequest) -> Request | None:
        """The unfinished request `entry` was scheduled for; None once it has finished, even
        if a new request has taken its id since."""
        request = self._requests.get(entry.request_id)
        if request is None or request.arrival_index != entry.arrival_index:
            return None
        return request

    def _append_token(self, request: Request, token_id: int) -> None:
        if request.max_tokens == 0:   # prompt only (e.g. scoring): nothing to append
            self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
            return
        request.output_token_ids.append(token_id)
        if request.matcher is not None and not request.matcher.accept(token_id):
            # Drawn under the request's mask, so the grammar takes it; if not, its output can
            # no longer match: end it rather than generate text the grammar refuses.
            logger.error("request %s: token %d is outside its grammar; finished",
                         request.request_id, token_id)
            self.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            return
        status, stop_reason = check_stop(request, self.config.max_model_len)
        if status is not None:
            self.finish_request(request.request_id, status, stop_reason)

