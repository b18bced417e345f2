"""Request state and the types that cross the scheduler seams (no JAX).

One step of the engine:

    Scheduler.schedule()             -> SchedulerOutput  (what to feed, where its KV goes)
    Runner.execute(SchedulerOutput)  -> ModelOutput      (sampled ids, numpy, one transfer)
    Scheduler.update(SchedulerOutput, ModelOutput) -> list[Request]

A request has no prefill or decode phase: its `num_computed_tokens` (tokens whose KV is in
its pages) catches up with `num_tokens` (prompt + output). When they meet after a step, the
last row's logits are sampled and the request grows by one token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from engine.sampling_params import SamplingParams
from engine.structured import Matcher


# A token id the host does not know yet: the runner feeds the step before's draw instead,
# straight from the device (engine/worker/runner.py).
PENDING_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"                    # never admitted yet
    RUNNING = "running"                    # holds pages, scheduled each step
    PREEMPTED = "preempted"                # pages taken back; waits to recompute its tokens
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "finished_length"    # max_tokens or max_model_len reached
    FINISHED_ABORTED = "finished_aborted"  # client gone, or aborted by the caller

    @property
    def is_finished(self) -> bool:
        # By the value's prefix: an Enum member hashes in Python, and this is read several
        # times a request a step.
        return self._value_.startswith("finished")

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason ("stop", "length", "abort"), None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated. Compared by identity: two requests are never equal.

    Attributes:
      request_id: unique among unfinished requests.
      prompt_token_ids: the prompt; at least one token.
      sampling_params: how to sample; `max_tokens` below is the resolved limit.
      eos_token_ids: tokens that end generation unless `sampling_params.ignore_eos`.
      priority: lower runs first; FCFS (arrival_index) within one priority and tenant.
      wait_for: id of a sibling sample of the same prompt; this request is not admitted
        until that sibling has computed its whole prompt, so it reuses the prompt's pages
        through the prefix cache instead of computing them again.
      tenant: the fair-share group (the server passes the API key's id as a string; ""
        for offline use). Waiting requests of one priority are admitted round-robin between
        tenants, and a tenant below its fair share of running sequences may preempt one
        above it (see engine/core/fair_queue.py). One tenant alone runs as if there were none.
      cache_salt: salts the root of the chained prefix-cache hash: requests share cached
        pages only with requests of the same salt (None shares with other None requests),
        so num_cached_tokens cannot reveal another salt's prompts. A non-empty str or None.
      skip_prefix_cache: never look this request up in the prefix cache nor count it in the
        hit rate. Set at creation, and always for requests asking for prompt logprobs (cached
        tokens produce no logits).
      seed: the draws' key is fold_in(PRNGKey(seed), output_position): the engine sets it
        from sampling_params.seed (or at random), so a request draws the same tokens
        whatever else shares its batch.
      max_tokens: most output tokens; Scheduler.add_request resolves None (sampling_params'
        None means up to max_model_len).
      arrival_index: assigned by Scheduler.add_request, increasing.
      status: see RequestStatus.
      output_token_ids: generated tokens; kept across preemption (and recomputed then).
      num_computed_tokens: leading tokens of all_token_ids whose KV is in the request's pages.
      num_cached_tokens: prompt tokens served from the prefix cache at the FIRST admission,
        the number billed as cached; a re-admission after preemption does not change it.
      num_preemptions: how often the request lost its pages.
      stop_reason: the stop token id or stop string that ended it; None for EOS or length.
      matcher: the grammar state of a request with sampling_params.structured_output (its
        own, also for each of n samples), else None. It has accepted exactly
        output_token_ids, so preemption (which keeps them) leaves it as it is; the runner
        fills the request's bitmask row from it and the scheduler advances it.
      num_pending: tokens drawn by scheduled steps whose results have not come back yet
        (0 or 1 between steps; async scheduling plans the next step before they arrive).
        Scheduler.schedule() counts them and num_computed_tokens on as if each step had
        run; update() appends the drawn token; rollback() undoes a step that never ran.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    wait_for: str | None = None
    tenant: str = ""
    cache_salt: str | None = None
    skip_prefix_cache: bool = False
    seed: int = 0
    max_tokens: int | None = None
    arrival_index: int = -1
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    matcher: Matcher | None = None
    num_pending: int = 0

    def __post_init__(self) -> None:
        # Accepts tuples or numpy arrays; stored as plain ints so hashing and slicing are cheap.
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        self.eos_token_ids = frozenset(int(t) for t in self.eos_token_ids)
        self.skip_prefix_cache |= self.sampling_params.prompt_logprobs is not None
        if not isinstance(self.tenant, str):
            raise ValueError(f"tenant={self.tenant!r}: expected a str")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not self.cache_salt):
            raise ValueError(f"cache_salt={self.cache_salt!r}: expected a non-empty str "
                             "or None")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """num_tokens plus the tokens being drawn: what the next step computes up to."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_between(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list (decode reads one)."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - num_prompt]


def planned_token_ids(request: Request, start: int, stop: int) -> list[int]:
    """Tokens at positions [start, stop) of the request, PENDING_TOKEN for those still
    being drawn (only the last position can be: one step is in flight at most)."""
    known = min(stop, request.num_tokens)
    return request.token_ids_between(start, known) + [PENDING_TOKEN] * (stop - max(known, start))


def check_stop(request: Request, max_model_len: int) -> tuple[RequestStatus | None,
                                                             int | None]:
    """Whether the request's newest output token ends it: (status, stop_reason).

    EOS (unless ignore_eos) and stop_token_ids count only from min_tokens on; a stop token
    is reported as the stop_reason. A complete grammar match ends it as "stop" at once
    (only EOS could follow: the step that would draw it is saved, with ignore_eos too).
    Then max_tokens and max_model_len end it as "length". Stop strings are the engine's to
    find (it holds the text).
    """
    params = request.sampling_params
    token_id = request.output_token_ids[-1]
    if request.matcher is not None and request.matcher.is_finished():
        return RequestStatus.FINISHED_STOPPED, None
    if request.num_output_tokens >= params.min_tokens:
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    return None, None


class ScheduledRequest(NamedTuple):
    """What one sequence feeds in one step (immutable: a NamedTuple, which the scheduler
    builds for every running sequence every step at a third of a frozen dataclass's cost).

    Attributes:
      request_id: the request.
      token_ids: tokens fed this step, positions start_position .. start_position + len - 1.
        For a preempted request these are its prompt AND output tokens again (recompute).
        The last may be PENDING_TOKEN: the token the previous step draws for it.
      start_position: the request's num_computed_tokens before this step; tokens before it
        have their KV in page_table already (computed earlier or served from the cache).
      page_table: the request's pages in order, covering every position up to
        start_position + len(token_ids); position p lives in slot
        page_table[p // page_size] * page_size + p % page_size. Never contains page 0.
      sample: True when this step computes the request's last token, so the last row's
        logits are sampled; False for a non-final prefill chunk (its logits are unused,
        except for prompt logprobs).
      is_prefill: False only for a plain decode (one token, the newest output token); a hint
        for metrics and logprob bookkeeping, never needed for correctness.
      arrival_index: the request's (Request.arrival_index): an id may be used again once its
        request has finished, so results are applied only to the request they were for.
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    page_table: list[int]
    sample: bool
    is_prefill: bool
    arrival_index: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step's work: the runner turns it into a flattened ragged batch.

    Attributes:
      scheduled: decodes first, then prefill chunks (running ones, then newly admitted).
      num_batched_tokens: sum of len(token_ids); at most max_num_batched_tokens.
      preempted_ids: requests that lost their pages this step; they come back later with
        start_position 0 (or a cached prefix) and recompute their tokens.
      finished_ids: requests finished or aborted since the previous schedule(); their pages
        are free already, so the runner drops any state it keeps for them.
    """

    scheduled: tuple[ScheduledRequest, ...]
    num_batched_tokens: int
    preempted_ids: tuple[str, ...] = ()
    finished_ids: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def feeds_prompts(self) -> bool:
        """Whether some sequence is fed more than one token (a prefill step), rather than
        one token each (a decode step)."""
        return self.num_batched_tokens > len(self.scheduled)


@dataclass(slots=True)
class ModelOutput:
    """What the runner returns for one SchedulerOutput; row s is `scheduled[s]`.

    The scheduler reads only `sampled_token_ids` (and ignores rows whose `sample` is False);
    the logprob arrays pass through to the engine. Rows beyond len(scheduled) are padding.
    """

    sampled_token_ids: np.ndarray                 # i32[S]
    logprobs: np.ndarray | None = None            # f32[S], the sampled token's logprob
    ranks: np.ndarray | None = None               # i32[S], its rank (1 = most likely)
    top_logprob_ids: np.ndarray | None = None     # i32[S, K]
    top_logprobs: np.ndarray | None = None        # f32[S, K]
    prompt_logprobs: dict[str, object] | None = None  # request id -> runner-defined arrays
