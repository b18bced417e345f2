"""Flash-style paged prefill attention on Mosaic GPU (Hopper and newer: TMA and wgmma).

The Mosaic GPU twin of prefill_attention.py (Triton): the rows of every sequence with more
than one query row this step are cut into query blocks (ragged_rows.query_blocks); a program
(one warpgroup) takes one query block and one kv head and walks that sequence's K/V tiles with
an online softmax, from the sliding window's first tile to the block's last causal position.

The M rows of the wgmmas are the block's query rows times the query heads of the kv head,
row-major (m = row * group + head), so a block holds 64 // group rows; the queries are laid
out that way in jnp before the call (`block_queries`) and the normalised output scattered back
after it, so the kernel moves whole 64-row tiles by TMA. The tile walk, its TMA pipeline and
what it declines are mosaic_tiles.py's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import mosaic_gpu_interpret_params
from pallas_kernels.gpu.mosaic_tiles import (BLOCK_KV, BLOCK_M, MosaicBlockSizes, TileBuffers,
                                             attend_tiles, fetch_kv_tile, row_iota,
                                             scratch_types)
from pallas_kernels.ragged_rows import query_blocks


def _prefill_kernel(block_seq_ref,        # i32[NQB] the block's sequence
                    block_first_pos_ref,  # i32[NQB] position of the block's first row
                    block_len_ref,        # i32[NQB] rows in the block, 0 past the last block
                    page_indices_ref,     # i32[S, P]
                    q_ref,                # [NQB, Hkv, BLOCK_M, D] rows x heads, 0-padded
                    kv_pages_ref,         # [num_pages, page_size, 2 * Hkv, D]
                    out_ref,              # [NQB, Hkv, BLOCK_M, D] normalised output
                    q_smem,               # [BLOCK_M, D] q, then the output
                    k_smem, v_smem,       # [num_slots, BLOCK_KV, D] each
                    p_smem,               # [BLOCK_M, BLOCK_KV] softmax weights of a tile
                    q_barrier, kv_barriers,
                    *, group, num_slots, sm_scale, soft_cap, sliding_window, interpret):
    block, kv_head = jax.lax.axis_index("block"), jax.lax.axis_index("kv_head")
    num_rows = block_len_ref[block]
    # Blocks past the last (most of them in a decode step) copy and write nothing: the
    # scatter after the kernel reads no row of theirs.
    pl.when(num_rows > 0)(functools.partial(
        _attend_block, block_seq_ref, block_first_pos_ref, page_indices_ref, q_ref,
        kv_pages_ref, out_ref,
        TileBuffers(q_smem, k_smem, v_smem, p_smem, q_barrier, kv_barriers),
        block, kv_head, num_rows, group=group, num_slots=num_slots, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret))


def _attend_block(block_seq_ref, block_first_pos_ref, page_indices_ref, q_ref, kv_pages_ref,
                  out_ref, buffers, block, kv_head, num_rows, *, group, num_slots, sm_scale,
                  soft_cap, sliding_window, interpret):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    seq, first_pos = block_seq_ref[block], block_first_pos_ref[block]
    hi = first_pos + num_rows       # one past the last row's position: no later key is seen
    window_start = (0 if sliding_window is None
                    else jnp.maximum(first_pos - sliding_window + 1, 0))  # the first row's
    lo = window_start // BLOCK_KV * BLOCK_KV

    def fetch(tile, slot):
        fetch_kv_tile(kv_pages_ref, page_indices_ref, buffers.k.at[slot], buffers.v.at[slot],
                      buffers.kv_barriers.at[slot], seq, kv_head, lo + tile * BLOCK_KV)

    row = jax.lax.div(row_iota(interpret), group)   # the query row of each M row
    position = first_pos + row

    def visible(tokens):
        seen = (tokens <= position) & (row < num_rows)
        if sliding_window is not None:
            seen &= tokens > position - sliding_window
        return seen

    _, row_sum, acc = attend_tiles(
        buffers, fetch, q_ref.at[block, kv_head], lo=lo, hi=hi,
        num_tiles=pl.cdiv(hi - lo, BLOCK_KV), visible=visible, num_slots=num_slots,
        sm_scale=sm_scale, soft_cap=soft_cap, interpret=interpret)
    inverse = 1.0 / jnp.maximum(row_sum, 1e-30)    # padding M rows see nothing: they stay 0
    # q's tile is free once the last wgmma has read it: the output leaves through it.
    buffers.q[...] = (acc * jax.lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(
        buffers.q.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(buffers.q, out_ref.at[block, kv_head])
    plgpu.wait_smem_to_gmem(0)


def block_rows(block_first_row, block_len, rows_per_block, num_rows):
    """i32[NQB, rows_per_block]: each block's rows of q, num_rows (past the end) where the
    block has fewer."""
    rows = block_first_row[:, None] + jnp.arange(rows_per_block, dtype=jnp.int32)
    return jnp.where(jnp.arange(rows_per_block) < block_len[:, None], rows, num_rows)


def block_queries(q, rows, num_kv_heads):
    """q [T, Hq, D] at rows i32[NQB, R] -> [NQB, Hkv, BLOCK_M, D]: M row = row * group + head
    of the kv head's query heads, zero past the block's rows and past R * group."""
    num_blocks, rows_per_block = rows.shape
    _, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    taken = q.at[rows].get(mode="fill", fill_value=0)                    # [NQB, R, Hq, D]
    taken = taken.reshape(num_blocks, rows_per_block, num_kv_heads, group, head_dim)
    taken = taken.transpose(0, 2, 1, 3, 4).reshape(num_blocks, num_kv_heads, -1, head_dim)
    return jnp.pad(taken, ((0, 0), (0, 0), (0, BLOCK_M - taken.shape[2]), (0, 0)))


def scatter_block_outputs(out_blocks, rows, num_rows, num_q_heads):
    """The inverse of block_queries: [NQB, Hkv, BLOCK_M, D] -> [T, Hq, D], rows of no block
    zero."""
    num_blocks, num_kv_heads, _, head_dim = out_blocks.shape
    rows_per_block = rows.shape[1]
    group = num_q_heads // num_kv_heads
    used = out_blocks[:, :, :rows_per_block * group]
    used = used.reshape(num_blocks, num_kv_heads, rows_per_block, group, head_dim)
    used = used.transpose(0, 2, 1, 3, 4).reshape(num_blocks, rows_per_block, num_q_heads,
                                                 head_dim)
    out = jnp.zeros((num_rows, num_q_heads, head_dim), out_blocks.dtype)
    return out.at[rows].set(used, mode="drop")       # rows == num_rows: dropped


def mosaic_prefill_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                             sm_scale, sliding_window, soft_cap,
                             mosaic_sizes: MosaicBlockSizes | None = None, interpret: bool):
    """The Mosaic GPU twin of prefill_attention.prefill_attention (16-bit caches only).

    Attention of every row of a multi-row sequence; other rows are zeros. [T, Hq, D].
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    mosaic_sizes = mosaic_sizes or MosaicBlockSizes()
    num_rows, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    num_kv_heads = two_kv_heads // 2
    group = num_q_heads // num_kv_heads
    rows_per_block = BLOCK_M // group
    max_seqs = page_indices.shape[0]
    # Each sequence boundary can leave one partial block; a prefill sequence has >= 2 rows.
    num_blocks = pl.cdiv(num_rows, rows_per_block) + min(max_seqs, num_rows // 2)
    block_seq, block_first_row, block_len = query_blocks(
        cu_q_lens, num_seqs, block_q=rows_per_block, num_blocks=num_blocks)
    q_len = cu_q_lens[block_seq + 1] - cu_q_lens[block_seq]
    block_first_pos = kv_lens[block_seq] - q_len + (block_first_row - cu_q_lens[block_seq])
    rows = block_rows(block_first_row, block_len, rows_per_block, num_rows)
    kernel = functools.partial(_prefill_kernel, group=group, num_slots=mosaic_sizes.num_slots,
                               sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, interpret=interpret)
    out_blocks = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((num_blocks, num_kv_heads, BLOCK_M, head_dim), q.dtype),
        scratch_types=scratch_types(head_dim, page_size, q.dtype, mosaic_sizes.num_slots),
        grid=(num_blocks, num_kv_heads),
        grid_names=("block", "kv_head"),
        interpret=mosaic_gpu_interpret_params() if interpret else None,
    )(block_seq, block_first_pos, block_len, page_indices,
      block_queries(q, rows, num_kv_heads), kv_pages)
    return scatter_block_outputs(out_blocks, rows, num_rows, num_q_heads)
