"""The scheduler: which requests run each step, how many tokens each, in which pages (no JAX).

One rule drives everything: a request's num_computed_tokens catches up with its num_tokens.
Each step spends one token budget (max_num_batched_tokens) on running decodes first, then on
prefill chunks: running requests part-way through their prompt, then waiting requests in
order of (priority, preempted first, arrival). Chunked prefill, prefix caching and
preemption (free a request's pages, recompute its tokens later) fall out of that rule.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from engine.core.page_manager import PageManager
from engine.core.request import (ModelOutput, Request, RequestStatus, ScheduledRequest,
                                 SchedulerOutput, check_stop)
from engine.sampling_params import is_int


@dataclass(slots=True)
class SchedulerConfig:
    """Limits of one engine.

    Attributes:
      max_num_seqs: most sequences in one step (and running at once).
      max_num_batched_tokens: token budget of one step.
      max_model_len: most tokens (prompt + output) of one sequence.
      page_size: token slots per KV page.
      num_pages: KV pages, page 0 included (it is reserved for padding).
      enable_prefix_caching: reuse computed full pages across requests.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    page_size: int = 16
    num_pages: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "page_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if not is_int(self.num_pages) or self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages!r}: expected an integer >= 2 "
                             "(page 0 is reserved for padding)")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r}: "
                             "expected a bool")


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_free_pages: int
    page_usage: float                # fraction of usable pages held by requests
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_hit_rate: float
    num_preemptions: int             # since start


@dataclass(slots=True)
class _Step:
    """What one schedule() call has decided so far."""

    budget: int
    scheduled: dict[str, ScheduledRequest] = field(default_factory=dict)  # in feed order
    preempted_ids: list[str] = field(default_factory=list)


class Scheduler:
    """Admits requests, plans each step and applies its results.

    Usage, once per step: `out = schedule()`; run the model on it; `update(out, model_out)`.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.page_manager = PageManager(config.num_pages, config.page_size,
                                        config.enable_prefix_caching)
        self._requests: dict[str, Request] = {}   # unfinished requests by id
        self._waiting: list[Request] = []          # sorted by _waiting_key
        self._running: list[Request] = []          # in order of admission
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
        bisect.insort(self._waiting, request, key=_waiting_key)

    def _validate(self, request: Request) -> None:
        max_len = self.config.max_model_len
        num_prompt = request.num_prompt_tokens
        if request.request_id in self._requests:
            raise ValueError(f"request_id={request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} has already been scheduled")
        if num_prompt < 1:
            raise ValueError("prompt has 0 tokens: expected at least 1")
        if num_prompt > max_len:
            raise ValueError(f"prompt has {num_prompt} tokens, beyond max_model_len={max_len}")
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            max_tokens = max_len - num_prompt
        if num_prompt + max_tokens > max_len:
            raise ValueError(f"prompt has {num_prompt} tokens and max_tokens={max_tokens}, "
                             f"beyond max_model_len={max_len}")
        # The last sampled token is never fed, so its KV needs no slot.
        num_pages = self.page_manager.pages_needed(num_prompt + max(max_tokens - 1, 0))
        if num_pages > self.page_manager.num_usable_pages:
            raise ValueError(
                f"prompt has {num_prompt} tokens and max_tokens={max_tokens}: needs "
                f"{num_pages} KV pages of {self.config.page_size} tokens, beyond the "
                f"{self.page_manager.num_usable_pages} usable pages of the cache (num_pages)")
        request.max_tokens = max_tokens

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
        else:
            self._waiting.remove(request)
        self.page_manager.free(request)
        request.status = status
        request.stop_reason = stop_reason
        self._finished_ids.append(request_id)

    def abort(self, request_id: str) -> None:
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

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
        if not step.preempted_ids:   # under page pressure, admitting more would only thrash
            self._schedule_waiting(step)
        finished_ids, self._finished_ids = tuple(self._finished_ids), []
        scheduled = tuple(step.scheduled.values())
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=sum(len(entry.token_ids) for entry in scheduled),
            preempted_ids=tuple(step.preempted_ids), finished_ids=finished_ids)

    def _schedule_running(self, step: _Step) -> None:
        # Snapshot: preemption removes requests from _running while we iterate.
        decodes = [r for r in self._running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self._running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decodes + prefills:
            if step.budget == 0:
                return
            if request.status is RequestStatus.RUNNING:   # else preempted in this loop
                self._schedule_or_preempt(request, step)

    def _schedule_or_preempt(self, request: Request, step: _Step) -> None:
        """Schedule the request's next chunk, preempting the lowest-priority, most recently
        admitted request until its pages fit; that victim may be the request itself."""
        while True:
            # Recomputed each try: preempting a request scheduled earlier returns its tokens.
            num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
            page_table = self.page_manager.allocate(request, num_new)
            if page_table is not None:
                self._add_to_step(step, request, num_new, page_table)
                return
            # max() keeps the first maximum: iterating newest first picks the newest.
            victim = max(reversed(self._running), key=lambda r: r.priority)
            self._preempt(victim, step)
            if victim is request:
                return

    def _preempt(self, request: Request, step: _Step) -> None:
        entry = step.scheduled.pop(request.request_id, None)
        if entry is not None:   # already planned this step: take back its tokens
            step.budget += len(entry.token_ids)
        self._running.remove(request)
        self.page_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        bisect.insort(self._waiting, request, key=_waiting_key)
        step.preempted_ids.append(request.request_id)

    def _schedule_waiting(self, step: _Step) -> None:
        admitted: list[int] = []
        for index, request in enumerate(self._waiting):
            if step.budget == 0 or len(self._running) >= self.config.max_num_seqs:
                break
            if self._must_wait_for_sibling(request):
                continue   # skipped, but does not hold back the requests behind it
            prefix = self.page_manager.get_computed_prefix(request)
            num_new = min(request.num_tokens - prefix.num_tokens, step.budget)
            page_table = self.page_manager.allocate(request, num_new, prefix)
            if page_table is None:
                break   # FCFS: later requests may not overtake one that does not fit
            if request.status is RequestStatus.WAITING:   # first admission: what is billed
                request.num_cached_tokens = prefix.num_tokens
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = prefix.num_tokens
            self._running.append(request)
            self._add_to_step(step, request, num_new, page_table)
            admitted.append(index)
        for index in reversed(admitted):
            del self._waiting[index]

    def _must_wait_for_sibling(self, request: Request) -> bool:
        sibling = self._requests.get(request.wait_for) if request.wait_for else None
        if sibling is None:
            return False
        # Output tokens mean the prompt was computed once (and its pages committed), even
        # if the sibling has been preempted since.
        return (sibling.num_output_tokens == 0
                and sibling.num_computed_tokens < sibling.num_prompt_tokens)

    def _add_to_step(self, step: _Step, request: Request, num_new: int,
                     page_table: list[int]) -> None:
        start = request.num_computed_tokens
        sample = start + num_new == request.num_tokens
        is_decode = sample and num_new == 1 and request.num_output_tokens > 0
        step.scheduled[request.request_id] = ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids_between(start, start + num_new),
            start_position=start, page_table=page_table,
            sample=sample, is_prefill=not is_decode)
        step.budget -= num_new

    def update(self, scheduler_output: SchedulerOutput,
               model_output: ModelOutput) -> list[Request]:
        """Apply one step's results.

        Advances num_computed_tokens by the tokens fed, commits newly full pages to the
        prefix cache, appends each sampled token and checks the stop conditions; finished
        requests get their status and stop_reason, and their pages are freed.

        Returns:
          The requests that got a new token this step, finished ones included (a request
          with max_tokens=0 is returned once its prompt is computed, with no new token).
          Entries aborted between schedule() and update() are skipped.
        """
        changed: list[Request] = []
        for row, entry in enumerate(scheduler_output.scheduled):
            request = self._requests.get(entry.request_id)
            if (request is None or request.status is not RequestStatus.RUNNING
                    or request.num_computed_tokens != entry.start_position):
                continue
            request.num_computed_tokens += len(entry.token_ids)
            self.page_manager.commit(request)
            if entry.sample:
                self._append_token(request, int(model_output.sampled_token_ids[row]))
                changed.append(request)
        return changed

    def _append_token(self, request: Request, token_id: int) -> None:
        if request.max_tokens == 0:   # prompt only (e.g. scoring): nothing to append
            self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
            return
        request.output_token_ids.append(token_id)
        status, stop_reason = check_stop(request, self.config.max_model_len)
        if status is not None:
            self.finish_request(request.request_id, status, stop_reason)


def _waiting_key(request: Request) -> tuple[int, bool, int]:
    # Preempted requests go back to the front of their priority: they were admitted before
    # anything still waiting and the user has seen part of their output.
    return (request.priority, request.status is not RequestStatus.PREEMPTED,
            request.arrival_index)
