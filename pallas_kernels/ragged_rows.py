"""Which query row of a flattened ragged batch belongs to which sequence, position and block.

Shared by every attention backend (the reference, the GPU prefill kernel, the TPU kernel), so
they all cut the batch the same way. Array shapes follow docs/design.md's kernel contract.
"""

from __future__ import annotations

import jax.numpy as jnp


def row_metadata(kv_lens, cu_q_lens, num_seqs, num_rows):
    """For each query row: its sequence, its position in that sequence, and if it is live.

    Returns:
      seq_of_row i32[T], position_of_row i32[T], live_row bool[T]
    """
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    # Sequence s owns rows [cu_q_lens[s], cu_q_lens[s+1]); searchsorted finds s for each row.
    seq_of_row = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    num_live_seqs = num_seqs[0]
    live_row = (seq_of_row < num_live_seqs) & (rows < cu_q_lens[num_live_seqs])
    seq_of_row = jnp.minimum(seq_of_row, kv_lens.shape[0] - 1)
    q_len = cu_q_lens[seq_of_row + 1] - cu_q_lens[seq_of_row]
    offset_in_chunk = rows - cu_q_lens[seq_of_row]
    position_of_row = kv_lens[seq_of_row] - q_len + offset_in_chunk
    return seq_of_row, position_of_row, live_row


def query_blocks(cu_q_lens, num_seqs, *, block_q: int, num_blocks: int, min_rows: int = 2,
                 max_rows: int | None = None):
    """Cuts the rows of live sequences with min_rows..max_rows rows into blocks of at most
    block_q rows; a block never straddles two sequences. Shared by every backend: the GPU
    prefill kernel takes min_rows=2 (decode rows have their own kernel), the TPU kernel
    min_rows=1, the reference both halves.

    cu_q_lens i32[S + 1], num_seqs i32[1]. Returns, per block, i32[num_blocks] each:
    its sequence, its first row and its number of rows (0 for blocks past the last).
    """
    max_seqs = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]                                # i32[S]
    chosen = (jnp.arange(max_seqs) < num_seqs[0]) & (q_lens >= min_rows)
    if max_rows is not None:
        chosen &= q_lens <= max_rows
    blocks_per_seq = jnp.where(chosen, (q_lens + block_q - 1) // block_q, 0)
    block_ends = jnp.cumsum(blocks_per_seq)                                # i32[S]
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(block_ends, blocks, side="right"), max_seqs - 1)
    first_row = cu_q_lens[seq] + (blocks - (block_ends[seq] - blocks_per_seq[seq])) * block_q
    num_rows = jnp.clip(cu_q_lens[seq + 1] - first_row, 0, block_q)
    num_rows = jnp.where(blocks < block_ends[-1], num_rows, 0)
    return seq.astype(jnp.int32), first_row.astype(jnp.int32), num_rows.astype(jnp.int32)
