"""The step's host arrays (engine/worker/host_arrays.py), built a column at a time, equal
a plain row-by-row build on fresh random steps: decodes, prefill chunks, recomputes after a
preemption, pending tokens known and drawn, every token rung; and a step that cannot be
built fails before the forward runs."""

import numpy as np
import pytest

from engine.core.request import (PENDING_TOKEN, Request, ScheduledRequest, SchedulerOutput,
                                 planned_token_ids)
from engine.worker.host_arrays import empty_batch, rung, step_batch

PAGE_SIZE, MAX_NUM_SEQS, MAX_PAGES = 4, 8, 16
TOKEN_LADDER = (1, 2, 4, 8, 16, 32, 64)


def row_by_row(scheduler_output, chosen, num_tokens, previous_rows):
    """The batch built one scheduled row at a time, straight from design.md's contract."""
    batch, logits_indices = empty_batch(num_tokens, MAX_NUM_SEQS, MAX_PAGES)
    rows_before = np.full(num_tokens, -1, np.int32)
    batch.cu_q_lens[:] = scheduler_output.num_batched_tokens
    row = 0
    for s, item in enumerate(scheduler_output.scheduled):
        batch.cu_q_lens[s] = row
        for offset, token in enumerate(item.token_ids):
            position = item.start_position + offset
            if token == PENDING_TOKEN:
                request = chosen[s]
                if position < request.num_tokens:
                    token = request.token_ids_between(position, position + 1)[0]
                else:
                    token, rows_before[row] = 0, previous_rows[request.request_id]
            batch.input_ids[row] = token
            batch.positions[row] = position
            batch.slot_mapping[row] = (item.page_table[position // PAGE_SIZE] * PAGE_SIZE
                                       + position % PAGE_SIZE)
            row += 1
        batch.kv_lens[s] = item.start_position + len(item.token_ids)
        batch.page_indices[s, :len(item.page_table)] = item.page_table
        logits_indices[s] = row - 1
    batch.num_seqs[0] = len(scheduler_output.scheduled)
    return batch, logits_indices, rows_before


def random_step(rng):
    """A SchedulerOutput of random requests, their Requests and the previous step's rows."""
    pages = iter(rng.permutation(np.arange(1, 200)).tolist())
    scheduled, chosen, previous_rows = [], [], {}
    for s in range(int(rng.integers(1, MAX_NUM_SEQS + 1))):
        num_prompt = int(rng.integers(1, 20))
        request = Request(f"r{s}", rng.integers(3, 500, num_prompt).tolist())
        request.output_token_ids = rng.integers(3, 500, int(rng.integers(0, 8))).tolist()
        request.num_pending = int(rng.integers(0, 2))   # a draw in flight
        num_planned = request.num_planned_tokens
        if rng.random() < 0.5:   # a decode, or the last token of a chunked prompt
            start = num_planned - 1
        else:                    # a chunk, or a recompute after a preemption
            start = int(rng.integers(0, num_planned))
        stop = int(rng.integers(start + 1, num_planned + 1))
        if request.num_pending and rng.random() < 0.3:
            previous_rows[request.request_id] = int(rng.integers(0, MAX_NUM_SEQS))
        elif request.num_pending:   # its token came back since (a step run again)
            request.output_token_ids.append(int(rng.integers(3, 500)))
            request.num_pending = 0
            stop = min(stop, request.num_tokens)
            start = min(start, stop - 1)
        token_ids = planned_token_ids(request, start, stop)
        if request.num_pending == 0 and stop == request.num_tokens and rng.random() < 0.5:
            token_ids[-1] = PENDING_TOKEN   # scheduled before its token came back
        page_table = [next(pages) for _ in range(-(-stop // PAGE_SIZE))]
        scheduled.append(ScheduledRequest(request.request_id, token_ids, start, page_table,
                                          sample=stop == num_planned, is_prefill=True))
        chosen.append(request)
    num_batched = sum(len(item.token_ids) for item in scheduled)
    return SchedulerOutput(tuple(scheduled), num_batched), chosen, previous_rows


@pytest.mark.parametrize("seed", range(40))
def test_step_batch_equals_a_row_by_row_build(seed):
    rng = np.random.default_rng(seed)
    scheduler_output, chosen, previous_rows = random_step(rng)
    num_tokens = rung(TOKEN_LADDER, scheduler_output.num_batched_tokens)
    batch, logits_indices, rows_before = step_batch(
        scheduler_output, chosen, empty_batch(num_tokens, MAX_NUM_SEQS, MAX_PAGES), PAGE_SIZE,
        previous_rows)
    want, want_indices, want_rows = row_by_row(scheduler_output, chosen, num_tokens,
                                               previous_rows)
    for name in ("input_ids", "positions", "slot_mapping", "cu_q_lens", "kv_lens",
                 "page_indices", "num_seqs"):
        got, expected = getattr(batch, name), getattr(want, name)
        assert got.dtype == expected.dtype == np.int32, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    np.testing.assert_array_equal(logits_indices, want_indices)
    np.testing.assert_array_equal(rows_before, want_rows)


def test_a_pending_token_neither_known_nor_drawn_fails():
    request = Request("a", [5, 6, 7])
    request.num_pending = 1
    item = ScheduledRequest("a", [PENDING_TOKEN], 3, [9], sample=True, is_prefill=False)
    with pytest.raises(RuntimeError, match="'a'.*position 3"):
        step_batch(SchedulerOutput((item,), 1), [request], empty_batch(1, 2, 4), PAGE_SIZE,
                   previous_rows={})


def test_a_page_table_too_short_fails():
    item = ScheduledRequest("a", [5, 6, 7, 8, 9], 0, [9], sample=True, is_prefill=True)
    with pytest.raises(ValueError, match="page_table=.*expected at least 5"):
        step_batch(SchedulerOutput((item,), 5), [Request("a", [5, 6, 7, 8, 9])],
                   empty_batch(8, 2, 4), PAGE_SIZE, previous_rows=None)


def test_a_token_id_beyond_int32_fails():
    item = ScheduledRequest("a", [2 ** 40], 0, [9], sample=True, is_prefill=True)
    with pytest.raises(OverflowError):
        step_batch(SchedulerOutput((item,), 1), [None], empty_batch(1, 2, 4), PAGE_SIZE,
                   previous_rows=None)
