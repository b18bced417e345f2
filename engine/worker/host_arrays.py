"""The host arrays of one step, padded to their ladder rungs: the flattened batch, the
sampling and penalty arrays, an open token bitmask (numpy; the runner fills and ships them),
and the history a penalty slot is filled from when a request takes one."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from engine.core.request import PENDING_TOKEN, Request, SchedulerOutput
from engine.structured import bitmask_width
from engine.worker.step import HISTORY_PENDING, PenaltyArrays, SamplingArrays, TokenBitmask
from models.batch import Batch


def rung(ladder: tuple[int, ...], value: int) -> int:
    """The smallest rung of `ladder` that holds `value`."""
    for size in ladder:
        if size >= value:
            return size
    raise ValueError(f"{value} is beyond the largest ladder rung {ladder[-1]}")


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


def step_batch(scheduler_output: SchedulerOutput, chosen: list[Request],
               empty: tuple[Batch, np.ndarray], page_size: int,
               previous_rows: Mapping[str, int] | None) -> tuple[Batch, np.ndarray, np.ndarray]:
    """Fills `empty` (empty_batch's, of the step's token rung) with the scheduled rows:
    (the flattened batch, logits_indices i32[max_num_seqs], previous_rows i32[T]). A
    PENDING_TOKEN input takes its request's own token when it has come back since (a step run
    again), else row previous_rows[request_id] of the previous step's draws, on the device
    (engine/worker/step.py: forward_step).

    Each column is gathered as a Python list and copied in once: a few numpy calls a step,
    whatever its size, and no small numpy call per row (each costs more than the row)."""
    batch, logits_indices = empty
    scheduled = scheduler_output.scheduled
    num_seqs, num_real = len(scheduled), scheduler_output.num_batched_tokens
    input_ids, positions, slots, ends, kv_lens, num_pages = [], [], [], [], [], []
    pending = []   # (row s, its position) of each PENDING_TOKEN, only ever a last token
    for s, item in enumerate(scheduled):
        start, table, token_ids = item.start_position, item.page_table, item.token_ids
        stop = start + len(token_ids)
        if len(table) * page_size < stop:
            raise ValueError(f"request {item.request_id!r}: page_table={table} covers "
                             f"{len(table) * page_size} positions; expected at least {stop}")
        input_ids += token_ids
        positions += range(start, stop)
        position = start
        while position < stop:   # a page at a time: slot = page * page_size + offset
            index = position // page_size
            page_stop = min(stop, (index + 1) * page_size)
            offset = (table[index] - index) * page_size
            slots += range(offset + position, offset + page_stop)
            position = page_stop
        ends.append(len(input_ids))
        kv_lens.append(stop)
        num_pages.append(len(table))
        if token_ids and token_ids[-1] == PENDING_TOKEN:
            pending.append((s, stop - 1))
    batch.input_ids[:num_real] = input_ids
    batch.positions[:num_real] = positions
    batch.slot_mapping[:num_real] = slots
    batch.cu_q_lens[:num_seqs + 1] = [0, *ends]
    batch.cu_q_lens[num_seqs + 1:] = num_real   # padding sequences own no rows
    batch.kv_lens[:num_seqs] = kv_lens
    logits_indices[:num_seqs] = ends
    logits_indices[:num_seqs] -= 1
    batch.num_seqs[0] = num_seqs
    page_indices = batch.page_indices[:num_seqs]   # each table in its row, row-major
    page_indices[np.arange(page_indices.shape[1]) < np.array(num_pages)[:, None]] = list(
        itertools.chain.from_iterable(item.page_table for item in scheduled))
    rows_before = np.full(batch.input_ids.shape[0], -1, np.int32)
    for s, position in pending:
        row = ends[s] - 1
        batch.input_ids[row], rows_before[row] = _pending_input(chosen[s], position,
                                                                previous_rows)
    return batch, logits_indices, rows_before


def _pending_input(request: Request, position: int, previous_rows: Mapping[str, int] | None
                   ) -> tuple[int, int]:
    """(input id, previous row) of a PENDING_TOKEN at `position`."""
    if position < request.num_tokens:
        return request.token_ids_between(position, position + 1)[0], -1
    if previous_rows is None or request.request_id not in previous_rows:
        raise RuntimeError(f"request {request.request_id!r}: its token at position "
                           f"{position} is neither known nor being drawn")
    return 0, previous_rows[request.request_id]


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
        seeds=np.asarray([divmod(r.seed, 1 << 32) for r in chosen] + [(0, 0)] * pad,
                         np.uint32).reshape(num_seqs, 2),
        positions=column(map(output_position, chosen), np.int32, 0),
        num_rows=np.asarray([len(chosen)], np.int32))
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
    if missing != 1:
        raise RuntimeError(f"request {request.request_id!r}: its penalty counts for output "
                           f"position {position} need outputs 0..{position - 1}, but "
                           f"{request.num_output_tokens} are known: expected all, or all "
                           "but the one the previous step draws")
    tokens[len(known)] = HISTORY_PENDING
    # The one output not on the host: the previous step's draw, as a forward input takes it.
    return tokens, _pending_input(request, len(known), previous_rows)[1]


def forbid_tokens(row: np.ndarray, token_ids: Iterable[int]) -> None:
    """Clears the bits of `token_ids` (ids past the row's width ignored) in one bitmask row
    (u32[ceil(V/32)]: token t is bit t % 32 of word t // 32)."""
    ids = np.fromiter((t for t in token_ids if 0 <= t < row.shape[0] * 32), np.int64)
    np.bitwise_and.at(row, ids // 32, ~(np.uint32(1) << (ids % 32).astype(np.uint32)))


def open_bitmask(num_seqs: int, vocab_size: int) -> TokenBitmask:
    """A token bitmask of sequence rung `num_seqs`, every token allowed and every row
    disabled: the runner fills and enables the constrained rows."""
    return TokenBitmask(
        bitmask=np.full((num_seqs, bitmask_width(vocab_size)), 0xFFFFFFFF, np.uint32),
        enabled=np.zeros(num_seqs, np.bool_))
