"""One K/V block of the TPU attention kernel: scores, masks and the online-softmax update.

Shapes stay 2-D with the row dimension first ([M, 1] running statistics, 2-D iotas), the
layout Mosaic handles best.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -1e30
_EXACT = jax.lax.Precision.HIGHEST  # f32 operands in full f32; bf16 operands are unaffected


def attend_block(carry, q_ref, k_ref, v_ref, scale_refs, first_token, first_pos, hi, *,
                 sm_scale, soft_cap, sliding_window, dtype):
    """Folds one K/V block into (row max, row sum, accumulator).

    q_ref [G, BQ, D]; k_ref, v_ref [pages_per_block, page_size, D] (tokens first_token on;
    slots at or past `hi` may hold anything, even NaN, and are masked), multiplied in `dtype`
    (kv_cache.compute_dtype). scale_refs: (k_scale, v_scale) f32[pages_per_block, page_size]
    for an 8-bit cache, applied to the scores and to the weights; or None.
    carry: m f32[M, 1], l f32[M, 1], acc f32[M, D] with M = G * BQ, row m = (g, m % BQ).
    """
    m_prev, l_prev, acc = carry
    group, block_q, head_dim = q_ref.shape
    pages, page_size, _ = k_ref.shape
    block_kv = pages * page_size
    q = q_ref[...].reshape(group * block_q, head_dim).astype(dtype)
    k = k_ref[...].reshape(block_kv, head_dim).astype(dtype)
    v = v_ref[...].reshape(block_kv, head_dim).astype(dtype)

    shape = (group * block_q, block_kv)
    tokens = first_token + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    positions = first_pos + jax.lax.broadcasted_iota(jnp.int32, shape, 0) % block_q
    visible = (tokens <= positions) & (tokens < hi)
    if sliding_window is not None:
        visible &= tokens > positions - sliding_window
    token_live = first_token + jax.lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0) < hi
    v = jnp.where(token_live, v, 0)  # unfetched slots: a zero weight times NaN is NaN

    scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_EXACT,
                                 preferred_element_type=jnp.float32) * sm_scale
    if scale_refs is not None:
        k_scale, v_scale = (ref[...].reshape(1, block_kv) for ref in scale_refs)
        scores = scores * k_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    scores = jnp.where(visible, scores, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
    weights = jnp.where(visible, jnp.exp(scores - m_next), 0.0)
    rescale = jnp.exp(m_prev - m_next)
    l_next = l_prev * rescale + weights.sum(axis=1, keepdims=True)
    if scale_refs is not None:
        scale_live = first_token + jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1) < hi
        weights = weights * jnp.where(scale_live, v_scale, 0.0)
    acc = acc * rescale + jax.lax.dot_general(
        weights.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=_EXACT,
        preferred_element_type=jnp.float32)
    return m_next, l_next, acc
