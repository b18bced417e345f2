"""Split-K paged decode attention on Mosaic GPU (Hopper and newer: TMA and wgmma).

The same work split and partials as the Triton decode kernel (decode_attention.py): each
program (CUDA block, one warpgroup) takes one sequence, one kv head and one split of the
context, and writes an unnormalised (acc, max, sum) that `combine_splits` merges. The query
heads that share the kv head are the M rows of the wgmmas, zero-padded to 64; the tile walk,
its TMA pipeline and what it declines are mosaic_tiles.py's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import mosaic_gpu_interpret_params
from pallas_kernels.gpu.block_sizes import AttentionBlockSizes
from pallas_kernels.gpu.decode_attention import decode_num_splits
from pallas_kernels.gpu.mosaic_tiles import (BLOCK_KV, BLOCK_M, MosaicBlockSizes, TileBuffers,
                                             attend_tiles, fetch_kv_tile, scratch_types)


def _split_bounds(kv_len, split, num_splits, sliding_window):
    """The split's share of the context: whole tiles, in order, from the window's first tile.

    Returns (window_start, lo, hi, num_tiles): keys from window_start on are visible; this
    split reads tokens lo .. hi in num_tiles tiles.
    """
    window_start = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
    start = window_start // BLOCK_KV * BLOCK_KV
    tiles_per_split = pl.cdiv(pl.cdiv(kv_len - start, BLOCK_KV), num_splits)
    lo = start + split * tiles_per_split * BLOCK_KV
    hi = jnp.minimum(kv_len, lo + tiles_per_split * BLOCK_KV)
    return window_start, lo, hi, jnp.maximum(pl.cdiv(hi - lo, BLOCK_KV), 0)


def _decode_kernel(kv_lens_ref,       # i32[S] context of decode sequences, 0 for the others
                   page_indices_ref,  # i32[S, P]
                   q_ref,             # [S, Hkv, BLOCK_M, D] query heads per kv head, 0-padded
                   kv_pages_ref,      # [num_pages, page_size, 2 * Hkv, D]
                   acc_ref,           # f32[splits, S, Hkv, BLOCK_M, D] unnormalised output
                   max_ref,           # f32[splits, S, Hkv, BLOCK_M] row max (log2 units)
                   sum_ref,           # f32[splits, S, Hkv, BLOCK_M] row sum
                   q_smem,            # [BLOCK_M, D]
                   k_smem, v_smem,    # [num_slots, BLOCK_KV, D] each
                   p_smem,            # [BLOCK_M, BLOCK_KV] softmax weights of a tile
                   out_smem,          # f32[BLOCK_M, D]
                   stat_smem,         # f32[2, BLOCK_M]
                   q_barrier, kv_barriers,
                   *, num_splits, num_slots, sm_scale, soft_cap, sliding_window, interpret):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    seq, kv_head = jax.lax.axis_index("seq"), jax.lax.axis_index("kv_head")
    split = jax.lax.axis_index("split")
    window_start, lo, hi, num_tiles = _split_bounds(kv_lens_ref[seq], split, num_splits,
                                                    sliding_window)

    def fetch(tile, slot):
        fetch_kv_tile(kv_pages_ref, page_indices_ref, k_smem.at[slot], v_smem.at[slot],
                      kv_barriers.at[slot], seq, kv_head, lo + tile * BLOCK_KV)

    buffers = TileBuffers(q_smem, k_smem, v_smem, p_smem, q_barrier, kv_barriers)
    row_max, row_sum, acc = attend_tiles(
        buffers, fetch, q_ref.at[seq, kv_head], lo=lo, hi=hi, num_tiles=num_tiles,
        visible=lambda tokens: tokens >= window_start, num_slots=num_slots,
        sm_scale=sm_scale, soft_cap=soft_cap, interpret=interpret)
    out_smem[...] = acc
    stat_smem[0] = row_max
    stat_smem[1] = row_sum
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, acc_ref.at[split, seq, kv_head])
    plgpu.copy_smem_to_gmem(stat_smem.at[0], max_ref.at[split, seq, kv_head])
    plgpu.copy_smem_to_gmem(stat_smem.at[1], sum_ref.at[split, seq, kv_head])
    plgpu.wait_smem_to_gmem(0)


def decode_queries(q, cu_q_lens, num_kv_heads):
    """Each sequence's last query row, its heads grouped by kv head and zero-padded to
    BLOCK_M: [S, Hkv, BLOCK_M, D] (non-decode sequences get some row; their context is 0)."""
    _, num_q_heads, head_dim = q.shape
    rows = q[jnp.minimum(cu_q_lens[:-1], q.shape[0] - 1)]                  # [S, Hq, D]
    grouped = rows.reshape(rows.shape[0], num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    padding = BLOCK_M - grouped.shape[2]
    return jnp.pad(grouped, ((0, 0), (0, 0), (0, padding), (0, 0)))


def mosaic_decode_attention_partials(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                     *, sm_scale, sliding_window, soft_cap,
                                     block_sizes: AttentionBlockSizes,
                                     mosaic_sizes: MosaicBlockSizes | None = None,
                                     interpret: bool):
    """The Mosaic GPU twin of decode_attention.decode_attention_partials (same partials).

    Returns acc f32[splits, S, Hq, D] (unnormalised), max and sum f32[splits, S, Hq].
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    mosaic_sizes = mosaic_sizes or MosaicBlockSizes()
    _, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    num_kv_heads = two_kv_heads // 2
    max_seqs, max_pages = page_indices.shape
    group = num_q_heads // num_kv_heads
    splits = decode_num_splits(max_seqs, num_kv_heads, max_pages, page_size,
                               dataclasses.replace(block_sizes, decode_block_kv=BLOCK_KV))
    is_decode = (jnp.arange(max_seqs) < num_seqs[0]) & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)
    decode_kv_lens = jnp.where(is_decode, kv_lens, 0)
    kernel = functools.partial(_decode_kernel, num_splits=splits,
                               num_slots=mosaic_sizes.num_slots, sm_scale=sm_scale,
                               soft_cap=soft_cap, sliding_window=sliding_window,
                               interpret=interpret)
    stats = jax.ShapeDtypeStruct((splits, max_seqs, num_kv_heads, BLOCK_M), jnp.float32)
    acc, row_max, row_sum = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((*stats.shape, head_dim), jnp.float32), stats, stats),
        scratch_types=scratch_types(head_dim, page_size, q.dtype, mosaic_sizes.num_slots,
                                    plgpu.SMEM((BLOCK_M, head_dim), jnp.float32),
                                    plgpu.SMEM((2, BLOCK_M), jnp.float32)),
        grid=(max_seqs, num_kv_heads, splits),
        grid_names=("seq", "kv_head", "split"),
        interpret=mosaic_gpu_interpret_params() if interpret else None,
    )(decode_kv_lens, page_indices, decode_queries(q, cu_q_lens, num_kv_heads), kv_pages)
    partial_shape = (splits, max_seqs, num_q_heads)
    return (acc[:, :, :, :group].reshape(*partial_shape, head_dim),
            row_max[:, :, :, :group].reshape(partial_shape),
            row_sum[:, :, :, :group].reshape(partial_shape))
