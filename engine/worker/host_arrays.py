"""The host arrays of one step, padded to their ladder rungs: an all-padding batch, the
sampling and penalty arrays, an open token bitmask (numpy; the runner fills and ships them),
and the history a penalty slot is filled from when a request takes one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine.core.request import Request
from engine.structured import bitmask_width
from engine.worker.step import HISTORY_PENDING, PenaltyArrays, SamplingArrays, TokenBitmask
from models.batch import Batch


def empty_batch(num_tokens: int, max_num_seqs: int, max_pages_per_seq: int
                ) -> tuple[Batch, np.ndarray]:
    """An all-padding Batch of token rung `num_tokens`, and logits_indices i32[max_num_seqs]."""
    batch = Batch(input_ids=np.zeros(num_tokens, np.int32),
                  positions=np.zeros(num_tokens, np.int32),
                  slot_mapping=np.zeros(num_tokens, np.int32),
                  cu_q_lens=np.zeros(max_num_seqs + 1, np.int32),
                  kv_lens=np.zeros(max_num_seqs, np.int32),
                  page_indices=np.zeros((max_num_seqs, max_pages_per_seq), np.int32),
                  num_seqs=np.zeros(1, np.int32))
    return batch, np.zeros(max_num_seqs, np.int32)


def output_position(request: Request) -> int:
    """The output position a row of `request` draws: num_output_tokens + num_pending - 1
    (its own draw is pending since it was scheduled; the one before may be too)."""
    return request.num_output_tokens + max(request.num_pending - 1, 0)


def sampling_arrays(chosen: list[Request], num_seqs: int, with_penalties: bool,
                    slots: Sequence[int] = ()) -> tuple[SamplingArrays, PenaltyArrays | None]:
    """The sampling (and penalty) arrays of `chosen`, padded to the sequence rung.

    `slots`: each row's PenaltyState slot (-1 or missing: none), which the runner assigns
    (engine/worker/penalty_slots.py); the token counts themselves stay on the device.
    """
    params = [r.sampling_params for r in chosen]
    pad = num_seqs - len(chosen)

    def column(values, dtype, fill):
        return np.asarray(list(values) + [fill] * pad, dtype)

    sampling = SamplingArrays(
        temperature=column((p.temperature for p in params), np.float32, 0.0),
        top_k=column((p.top_k for p in params), np.int32, 0),
        top_p=column((p.top_p for p in params), np.float32, 1.0),
        min_p=column((p.min_p for p in params), np.float32, 0.0),
        seeds=column((r.seed for r in chosen), np.uint32, 0),
        positions=column(map(output_position, chosen), np.int32, 0))
    if not with_penalties:
        return sampling, None
    penalties = PenaltyArrays(
        slots=np.full(num_seqs, -1, np.int32),
        repetition=column((p.repetition_penalty for p in params), np.float32, 1.0),
        presence=column((p.presence_penalty for p in params), np.float32, 0.0),
        frequency=column((p.frequency_penalty for p in params), np.float32, 0.0))
    penalties.slots[:len(slots)] = slots
    return sampling, penalties


def empty_slot_history(max_model_len: int) -> tuple[np.ndarray, ...]:
    """init_penalty_slot's host arrays, filling slot 0 with nothing: (slot i32[],
    tokens i32[max_model_len], num_prompt i32[], pending_row i32[])."""
    return (np.zeros((), np.int32), np.full(max_model_len, -1, np.int32),
            np.zeros((), np.int32), np.full((), -1, np.int32))


def slot_history(request: Request, position: int, max_model_len: int,
                 previous_rows: Mapping[str, int]) -> tuple[np.ndarray, int]:
    """What init_penalty_slot fills a slot from, for a row of `request` drawing output
    `position`: (tokens i32[max_model_len], the prompt then the outputs before `position`,
    -1 padded; the row of the previous step's draws holding a still pending last output,
    or -1). Only that last output may be missing from the host.

    Raises:
      RuntimeError naming the request when an output before `position` is neither known
      nor being drawn by the previous step.
    """
    tokens = np.full(max_model_len, -1, np.int32)
    known = request.all_token_ids
    tokens[:len(known)] = known
    missing = position - request.num_output_tokens
    if missing == 0:
        return tokens, -1
    if missing != 1 or request.request_id not in previous_rows:
        raise RuntimeError(f"request {request.request_id!r}: its penalty counts for output "
                           f"position {position} need outputs 0..{position - 1}, but "
                           f"{request.num_output_tokens} are known: expected all, or all "
                           "but the one the previous step draws")
    tokens[len(known)] = HISTORY_PENDING
    return tokens, previous_rows[request.request_id]


def open_bitmask(num_seqs: int, vocab_size: int) -> TokenBitmask:
    """A token bitmask of sequence rung `num_seqs`, every token allowed and every row
    disabled: the runner fills and enables the constrained rows."""
    return TokenBitmask(
        bitmask=np.full((num_seqs, bitmask_width(vocab_size)), 0xFFFFFFFF, np.uint32),
        enabled=np.zeros(num_seqs, np.bool_))
