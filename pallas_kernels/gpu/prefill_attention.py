"""Flash-style paged attention for prefill chunks on the GPU (Pallas, Triton lowering).

The rows of every sequence with more than one query row this step are cut into query blocks
of `block_q` rows; a program takes one query block and one kv head, and walks that
sequence's pages in tiles of `block_kv` tokens with an online softmax, stopping at the
block's last causal position (and starting at the sliding window's first). The block's rows
times the query heads of the kv head form the M dimension of the MMA.

Which rows belong to which block is worked out in jnp before the call (`query_blocks`), so
the kernel reads plain per-block scalars. Rows of no block (decode rows, padding) are left
as they were in `out_init` (zeros).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import gpu_load, gpu_store, triton_compiler_params
from pallas_kernels.gpu.attention_tiles import (initial_carry, kv_tile, next_power_of_2,
                                                online_softmax_step, tile_scores)
from pallas_kernels.gpu.block_sizes import AttentionBlockSizes
from pallas_kernels.kv_cache import compute_dtype
from pallas_kernels.ragged_rows import query_blocks


def _tile_ranges(first_pos, num_rows, hi, block_kv, sliding_window):
    """Three runs of KV tiles for a query block: window edge (masked), interior (no mask),
    diagonal (masked). Interior tiles hold only keys every row of the block may see."""
    last_pos = first_pos + num_rows - 1
    end = pl.cdiv(hi, block_kv)
    interior_end = jnp.minimum((first_pos + 1) // block_kv, end)  # keys <= the first row's
    if sliding_window is None:
        zero = jnp.int32(0)
        return (zero, zero), (zero, interior_end), (interior_end, end)
    start = jnp.maximum(first_pos - sliding_window + 1, 0) // block_kv
    # keys > the last row's position - window: inside every row's window
    interior_start = jnp.clip(pl.cdiv(last_pos - sliding_window + 1, block_kv), start, end)
    interior_end = jnp.maximum(interior_end, interior_start)
    return (start, interior_start), (interior_start, interior_end), (interior_end, end)


def _prefill_kernel(block_seq_ref,     # i32[NQB]
                    block_row_ref,     # i32[NQB]
                    block_len_ref,     # i32[NQB]
                    kv_lens_ref,       # i32[S]
                    page_indices_ref,  # i32[S, P]
                    cu_q_lens_ref,     # i32[S + 1]
                    q_ref,             # [T, Hq, D]
                    kv_pages_ref,      # [num_pages, page_size, 2 * Hkv, D]
                    *refs,             # kv_scales_ref f32[num_pages, page_size, 2 * Hkv] if
                                       # quantized; out_init [T, Hq, D] (aliased with out);
                                       # out [T, Hq, D]
                    group, group_pad, block_q, block_kv, sm_scale, soft_cap, sliding_window,
                    quantized, dtype):
    kv_scales_ref = refs[0] if quantized else None
    out_ref = refs[-1]
    query_block, kv_head = pl.program_id(0), pl.program_id(1)
    num_rows = block_len_ref[query_block]

    @pl.when(num_rows > 0)
    def _():
        seq, first_row = block_seq_ref[query_block], block_row_ref[query_block]
        head_dim = q_ref.shape[2]
        kv_len = kv_lens_ref[seq]
        seq_start = cu_q_lens_ref[seq]
        first_pos = kv_len - (cu_q_lens_ref[seq + 1] - seq_start) + (first_row - seq_start)

        block_m = block_q * group_pad
        m = jnp.arange(block_m, dtype=jnp.int32)        # row-major over (row, head in group)
        row, head = m // group_pad, m % group_pad
        live = (row < num_rows) & (head < group)                           # bool[M]
        index = (first_row + row[:, None], kv_head * group + head[:, None],
                 jnp.arange(head_dim, dtype=jnp.int32)[None, :])
        q = gpu_load(q_ref.at[index], mask=live[:, None], other=0).astype(dtype)  # [M, D]
        position = first_pos + row                                        # i32[M]

        hi = jnp.minimum(kv_len, first_pos + num_rows)  # one past the last row's position
        tiles = _tile_ranges(first_pos, num_rows, hi, block_kv, sliding_window)

        def body(masked, tile, carry):
            tokens, k, v, k_scale, v_scale = kv_tile(kv_pages_ref, kv_scales_ref,
                                                     page_indices_ref, seq, kv_head,
                                                     tile * block_kv, hi, block_kv, dtype)
            scores = tile_scores(q, k, k_scale, sm_scale=sm_scale, soft_cap=soft_cap)
            visible = None
            if masked:  # rows past num_rows may see extra keys: their output is dropped
                visible = tokens[None, :] <= position[:, None]
                if sliding_window is not None:
                    visible &= tokens[None, :] > position[:, None] - sliding_window
            return online_softmax_step(carry, scores, visible, v, v_scale)

        carry = initial_carry(block_m, head_dim)
        for (lo, hi_tile), masked in zip(tiles, (True, False, True)):
            carry = jax.lax.fori_loop(lo, hi_tile, functools.partial(body, masked), carry)
        _, row_sum, acc = carry
        out = acc / jnp.maximum(row_sum, 1e-30)[:, None]
        gpu_store(out_ref.at[index], out.astype(out_ref.dtype), mask=live[:, None])


def prefill_attention(q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                      sm_scale, sliding_window, soft_cap,
                      block_sizes: AttentionBlockSizes, interpret: bool):
    """Attention of every row of a multi-row sequence; other rows are zeros. [T, Hq, D].

    kv_scales: f32[num_pages, page_size, 2 * Hkv] for an 8-bit kv_pages, else None."""
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_pages.shape[2] // 2
    max_seqs = page_indices.shape[0]
    group = num_q_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    block_q = max(1, block_sizes.prefill_block_m // group_pad)
    # Each sequence boundary can leave one partial block; a prefill sequence has >= 2 rows.
    num_blocks = pl.cdiv(num_rows, block_q) + min(max_seqs, num_rows // 2)
    blocks = query_blocks(cu_q_lens, num_seqs, block_q=block_q, num_blocks=num_blocks)
    kernel = functools.partial(
        _prefill_kernel, group=group, group_pad=group_pad, block_q=block_q,
        block_kv=block_sizes.prefill_block_kv, sm_scale=sm_scale, soft_cap=soft_cap,
        sliding_window=sliding_window, quantized=kv_scales is not None,
        dtype=compute_dtype(q.dtype, kv_pages.dtype))
    inputs = (*blocks, kv_lens, page_indices, cu_q_lens, q, kv_pages,
              *(() if kv_scales is None else (kv_scales,)), jnp.zeros_like(q))
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={len(inputs) - 1: 0},
        compiler_params=triton_compiler_params(num_warps=block_sizes.prefill_num_warps,
                                               num_stages=block_sizes.prefill_num_stages),
        interpret=interpret,
        name="ember_prefill_attention",
    )(*inputs)
