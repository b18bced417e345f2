"""The host arrays of one step, padded to their ladder rungs: an all-padding batch, the
sampling and penalty arrays, an open token bitmask (numpy; the runner fills and ships them)."""

from __future__ import annotations

from collections.abc import Mapping

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


def sampling_arrays(chosen: list[Request], num_seqs: int, with_penalties: bool,
                    max_model_len: int, previous_rows: Mapping[str, int] | None = None
                    ) -> tuple[SamplingArrays, PenaltyArrays | None]:
    """The sampling (and penalty) arrays of `chosen`, padded to the sequence rung.

    Each row draws the request's output position num_output_tokens + num_pending - 1 (its
    own draw is pending since it was scheduled); a token still pending from the previous
    step enters the penalty history as HISTORY_PENDING, read on the device from that step's
    row `previous_rows[request_id]`.
    """
    params = [r.sampling_params for r in chosen]
    pad = num_seqs - len(chosen)
    previous_rows = previous_rows or {}

    def column(values, dtype, fill):
        return np.asarray(list(values) + [fill] * pad, dtype)

    sampling = SamplingArrays(
        temperature=column((p.temperature for p in params), np.float32, 0.0),
        top_k=column((p.top_k for p in params), np.int32, 0),
        top_p=column((p.top_p for p in params), np.float32, 1.0),
        min_p=column((p.min_p for p in params), np.float32, 0.0),
        seeds=column((r.seed for r in chosen), np.uint32, 0),
        positions=column((r.num_output_tokens + max(r.num_pending - 1, 0) for r in chosen),
                         np.int32, 0))
    if not with_penalties:
        return sampling, None
    history = np.full((num_seqs, max_model_len), -1, np.int32)
    pending_rows = np.full(num_seqs, -1, np.int32)
    for s, request in enumerate(chosen):
        if request.sampling_params.has_penalties:
            tokens = request.all_token_ids
            history[s, :len(tokens)] = tokens
            if request.num_pending > 1 and request.request_id in previous_rows:
                history[s, len(tokens)] = HISTORY_PENDING
                pending_rows[s] = previous_rows[request.request_id]
    penalties = PenaltyArrays(
        history=history, pending_rows=pending_rows,
        num_prompt=column((r.num_prompt_tokens for r in chosen), np.int32, 0),
        repetition=column((p.repetition_penalty for p in params), np.float32, 1.0),
        presence=column((p.presence_penalty for p in params), np.float32, 0.0),
        frequency=column((p.frequency_penalty for p in params), np.float32, 0.0))
    return sampling, penalties


def open_bitmask(num_seqs: int, vocab_size: int) -> TokenBitmask:
    """A token bitmask of sequence rung `num_seqs`, every token allowed and every row
    disabled: the runner fills and enables the constrained rows."""
    return TokenBitmask(
        bitmask=np.full((num_seqs, bitmask_width(vocab_size)), 0xFFFFFFFF, np.uint32),
        enabled=np.zeros(num_seqs, np.bool_))
