"""Prompt logprobs (evaluations score prompts): which prompt token each row of a step
predicts, and the unpacking of the scored rows. The device side is step.py's
prompt_logprobs_step; the runner dispatches it and collects its one packed transfer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.request import Request, ScheduledRequest, SchedulerOutput
from engine.worker.step import TOP_LOGPROBS

# (row s of the step, its scheduled item) for each request that asked for prompt logprobs
Wanted = list[tuple[int, ScheduledRequest]]


@dataclass(slots=True, frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens at `positions` (the position of each scored token)."""

    positions: np.ndarray     # i32[N]
    logprobs: np.ndarray      # f32[N]
    ranks: np.ndarray         # i32[N]
    top_ids: np.ndarray       # i32[N, K]
    top_logprobs: np.ndarray  # f32[N, K]


def prompt_targets(scheduler_output: SchedulerOutput, chosen: list[Request], num_rows: int
                   ) -> tuple[np.ndarray, Wanted, dict[str, tuple[int, int]]] | None:
    """For a step feeding prompt tokens of requests that asked for prompt_logprobs: (the
    token each input row predicts, i32[num_rows]; the rows wanted; each request's
    (first row, rows)), or None when no request of the step asked."""
    wanted = [(s, item) for s, (item, r) in enumerate(zip(scheduler_output.scheduled, chosen))
              if r.sampling_params.prompt_logprobs is not None and item.is_prefill]
    if not wanted:
        return None
    targets = np.zeros(num_rows, np.int32)
    spans = {}
    row = 0
    for item, request in zip(scheduler_output.scheduled, chosen):
        count = len(item.token_ids)
        spans[item.request_id] = (row, count)
        # Row at position p predicts the token at p + 1, when that token is in the prompt.
        following = request.token_ids_between(
            item.start_position + 1,
            min(item.start_position + count + 1, request.num_prompt_tokens))
        targets[row:row + len(following)] = following
        row += count
    return targets, wanted, spans


def unpack_prompt_logprobs(packed: np.ndarray, wanted: Wanted,
                           spans: dict[str, tuple[int, int]], chosen: list[Request]
                           ) -> dict[str, PromptLogprobs]:
    """packed f32[T, 3 + 2 * TOP_LOGPROBS] (prompt_logprobs_step's) -> each wanted
    request's PromptLogprobs."""
    result = {}
    for s, item in wanted:
        request = chosen[s]
        first, count = spans[item.request_id]
        # Scored positions: p + 1 for rows whose next token is still a prompt token.
        positions = np.arange(item.start_position + 1, item.start_position + count + 1)
        keep = positions < request.num_prompt_tokens
        rows = packed[first:first + count][keep]
        result[item.request_id] = PromptLogprobs(
            positions=positions[keep].astype(np.int32), logprobs=rows[:, 1],
            ranks=rows[:, 2].astype(np.int32),
            top_ids=rows[:, 3:3 + TOP_LOGPROBS].astype(np.int32),
            top_logprobs=rows[:, 3 + TOP_LOGPROBS:])
    return result
