"""In-kernel pieces shared by the GPU decode and prefill attention kernels.

K/V tiles are gathered token by token through the page table, so a tile's size does not
depend on the page size, and tokens at or past `limit` are masked loads: they read nothing,
so pages a sequence does not own are never touched.

Tiles are converted to the compute dtype on load (kv_cache.compute_dtype: bf16 or fp8 or
int8 caches under bf16 q stay bf16 MMAs). An 8-bit cache's scales are applied in f32 where
they cost least and round least: K's to the scores (s = (q . k_int8) * k_scale), V's to the
softmax weights (acc += (w * v_scale) @ v_int8).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.compat import gpu_load

LOG2E = math.log2(math.e)
# Finite, so masked rows never produce inf - inf; weights of masked keys are zeroed explicitly.
MASK_VALUE = -1e30
# f32 operands multiply in full f32 (Triton's default for them is TF32); bf16 ones are unaffected.
EXACT = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def kv_tile(kv_pages_ref, kv_scales_ref, page_indices_ref, seq, kv_head, first_token, limit,
            block_kv, dtype):
    """Gathers K and V of tokens first_token .. first_token + block_kv of one sequence.

    kv_pages_ref: [num_pages, page_size, 2 * num_kv_heads, head_dim]
    kv_scales_ref: f32[num_pages, page_size, 2 * num_kv_heads] (8-bit caches), or None
    page_indices_ref: i32[S, P]
    Returns tokens i32[block_kv], k and v [block_kv, head_dim] in `dtype`, and k_scale and
    v_scale f32[block_kv] (None without kv_scales_ref); rows of tokens >= limit are zeros.
    """
    page_size, head_dim = kv_pages_ref.shape[1], kv_pages_ref.shape[3]
    tokens = first_token + jnp.arange(block_kv, dtype=jnp.int32)           # i32[BK]
    live = tokens < limit                                                   # bool[BK]
    pages = gpu_load(page_indices_ref.at[seq, tokens // page_size], mask=live, other=0)
    rows = (pages[:, None], (tokens % page_size)[:, None])
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    # other=0.0, not 0: Triton casts the fill to the cache's dtype, and has no int -> fp8 cast.
    k = gpu_load(kv_pages_ref.at[(*rows, 2 * kv_head, dims)], mask=live[:, None], other=0.0)
    v = gpu_load(kv_pages_ref.at[(*rows, 2 * kv_head + 1, dims)], mask=live[:, None], other=0.0)
    k_scale = v_scale = None
    if kv_scales_ref is not None:
        slots = (pages, tokens % page_size)
        k_scale = gpu_load(kv_scales_ref.at[(*slots, 2 * kv_head)], mask=live, other=0.0)
        v_scale = gpu_load(kv_scales_ref.at[(*slots, 2 * kv_head + 1)], mask=live, other=0.0)
        # int8 -> f32 -> dtype: the conversions every Triton target has (both exact).
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    return tokens, k.astype(dtype), v.astype(dtype), k_scale, v_scale


def tile_scores(q, k, k_scale, *, sm_scale, soft_cap):
    """Scores of q [M, D] against k [BK, D] (times k_scale f32[BK] if given) in log2 units:
    f32[M, BK]."""
    scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=EXACT,
                                 preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale[None, :]
    if soft_cap is None:
        return scores * (sm_scale * LOG2E)
    return jnp.tanh(scores * (sm_scale / soft_cap)) * (soft_cap * LOG2E)


def online_softmax_step(carry, scores, visible, v, v_scale=None):
    """One flash-attention update of (row max, row sum, accumulator) with a new K/V tile.

    scores f32[M, BK] in log2 units; visible bool[M, BK], or None for a tile every row sees
    whole (no masking work); v [BK, D], its rows times v_scale f32[BK] if given.
    carry: m f32[M], l f32[M], acc f32[M, D].
    """
    m_prev, l_prev, acc = carry
    if visible is not None:
        scores = jnp.where(visible, scores, MASK_VALUE)
    m_next = jnp.maximum(m_prev, scores.max(axis=1))
    rescale = jnp.exp2(m_prev - m_next)
    weights = jnp.exp2(scores - m_next[:, None])
    if visible is not None:  # a row that has seen nothing yet has m_next == MASK_VALUE
        weights = jnp.where(visible, weights, 0.0)
    l_next = l_prev * rescale + weights.sum(axis=1)
    value_weights = weights if v_scale is None else weights * v_scale[None, :]
    acc = acc * rescale[:, None] + jax.lax.dot_general(
        value_weights.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=EXACT,
        preferred_element_type=jnp.float32)
    return m_next, l_next, acc


def initial_carry(block_m, head_dim):
    return (jnp.full((block_m,), MASK_VALUE, jnp.float32), jnp.zeros((block_m,), jnp.float32),
            jnp.zeros((block_m, head_dim), jnp.float32))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
