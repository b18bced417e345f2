"""Split-K paged decode attention for the GPU (Pallas, Triton lowering).

Each program takes one decode sequence (a sequence with exactly one query row this step),
one kv head and one split: the split's share of the sequence's context, read through the
page table in tiles of `block_kv` tokens. The query heads that share the kv head form the
M dimension of the MMA (padded to 16), so K and V are read once per kv head. Programs write
an unnormalised partial (acc, max, sum) per split; `combine_splits` merges them.
Sequences that are not decode sequences (or are padding) leave empty partials.
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


def _decode_kernel(kv_lens_ref,       # i32[S]
                   page_indices_ref,  # i32[S, P]
                   cu_q_lens_ref,     # i32[S + 1]
                   num_seqs_ref,      # i32[1]
                   q_ref,             # [T, Hq, D]
                   kv_pages_ref,      # [num_pages, page_size, 2 * Hkv, D]
                   *refs,             # kv_scales_ref f32[num_pages, page_size, 2 * Hkv] if
                                      # quantized, then the outputs:
                                      # acc f32[splits, S, Hq, D]  unnormalised output
                                      # max f32[splits, S, Hq]     row max (log2 units)
                                      # sum f32[splits, S, Hq]     row sum
                   group, block_m, block_kv, sm_scale, soft_cap, sliding_window, quantized,
                   dtype):
    kv_scales_ref = refs[0] if quantized else None
    acc_ref, max_ref, sum_ref = refs[-3:]
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_splits = pl.num_programs(2)
    head_dim = q_ref.shape[2]
    first_row = cu_q_lens_ref[seq]
    is_decode = (seq < num_seqs_ref[0]) & (cu_q_lens_ref[seq + 1] - first_row == 1)
    kv_len = jnp.where(is_decode, kv_lens_ref[seq], 0)

    # Context this split covers: whole tiles, in order, from the window's first tile.
    window_start = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
    start = window_start // block_kv * block_kv
    tiles_per_split = pl.cdiv(pl.cdiv(kv_len - start, block_kv), num_splits)
    lo = start + split * tiles_per_split * block_kv
    hi = jnp.minimum(kv_len, lo + tiles_per_split * block_kv)

    heads = jnp.arange(block_m, dtype=jnp.int32)                           # i32[M]
    head_live = heads < group
    q_heads = kv_head * group + heads
    dims = jnp.arange(head_dim, dtype=jnp.int32)
    q = gpu_load(q_ref.at[first_row, q_heads[:, None], dims[None, :]],
                 mask=(head_live & is_decode)[:, None], other=0).astype(dtype)  # [M, D]

    def body(tile, carry):
        tokens, k, v, k_scale, v_scale = kv_tile(kv_pages_ref, kv_scales_ref, page_indices_ref,
                                                 seq, kv_head, lo + tile * block_kv, hi,
                                                 block_kv, dtype)
        visible = tokens >= window_start                                   # causal: all < kv_len
        visible = jnp.broadcast_to((visible & (tokens < hi))[None, :], (block_m, block_kv))
        scores = tile_scores(q, k, k_scale, sm_scale=sm_scale, soft_cap=soft_cap)
        return online_softmax_step(carry, scores, visible, v, v_scale)

    num_tiles = jnp.maximum(pl.cdiv(hi - lo, block_kv), 0)
    row_max, row_sum, acc = jax.lax.fori_loop(0, num_tiles, body, initial_carry(block_m, head_dim))
    gpu_store(acc_ref.at[split, seq, q_heads[:, None], dims[None, :]], acc,
              mask=head_live[:, None])
    gpu_store(max_ref.at[split, seq, q_heads], row_max, mask=head_live)
    gpu_store(sum_ref.at[split, seq, q_heads], row_sum, mask=head_live)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_pages: int, page_size: int,
                      block_sizes: AttentionBlockSizes) -> int:
    """Splits per sequence: enough programs to fill the GPU, never more than tiles exist."""
    programs = num_seqs * num_kv_heads
    wanted = next_power_of_2(pl.cdiv(block_sizes.decode_target_programs, programs))
    most_tiles = pl.cdiv(max_pages * page_size, block_sizes.decode_block_kv)
    return max(1, min(wanted, block_sizes.decode_max_splits, most_tiles))


def decode_attention_partials(q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens,
                              num_seqs, *, sm_scale, sliding_window, soft_cap,
                              block_sizes: AttentionBlockSizes, interpret: bool):
    """Runs the split-K kernel (kv_scales: f32[num_pages, page_size, 2 * Hkv] or None).

    Returns acc f32[splits, S, Hq, D] (unnormalised), max and sum f32[splits, S, Hq].
    """
    _, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    num_kv_heads = two_kv_heads // 2
    max_seqs, max_pages = page_indices.shape
    group = num_q_heads // num_kv_heads
    splits = decode_num_splits(max_seqs, num_kv_heads, max_pages, page_size, block_sizes)
    block_kv = block_sizes.decode_block_kv
    kernel = functools.partial(
        _decode_kernel, group=group, block_m=max(16, next_power_of_2(group)),
        block_kv=block_kv, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        quantized=kv_scales is not None, dtype=compute_dtype(q.dtype, kv_pages.dtype))
    scales = () if kv_scales is None else (kv_scales,)
    partial_shape = (splits, max_seqs, num_q_heads)
    return pl.pallas_call(
        kernel,
        grid=(max_seqs, num_kv_heads, splits),
        out_shape=(jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32)),
        compiler_params=triton_compiler_params(num_warps=block_sizes.decode_num_warps,
                                               num_stages=block_sizes.decode_num_stages),
        interpret=interpret,
        name="ember_decode_attention",
    )(kv_lens, page_indices, cu_q_lens, num_seqs, q, kv_pages, *scales)


def combine_splits(acc, row_max, row_sum):
    """Merges split partials into f32[S, Hq, D].

    acc f32[splits, S, Hq, D]; row_max, row_sum f32[splits, S, Hq].
    """
    overall_max = row_max.max(axis=0)
    weight = jnp.exp2(row_max - overall_max[None])                         # f32[splits, S, Hq]
    total = (row_sum * weight).sum(axis=0)
    out = (acc * weight[..., None]).sum(axis=0)
    return out / jnp.maximum(total, 1e-30)[..., None]
