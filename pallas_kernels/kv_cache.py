"""What a KV cache holds in each of its dtypes, and how a row gets there and back.

A cache's pages are `kv_pages [num_pages, page_size, 2 * Hkv, D]` (K of head h at 2h, V at
2h + 1) in one of KV_PAGE_DTYPES, whatever q's dtype:

  float32, bfloat16, float16   written with a plain cast
  int8, float8_e4m3fn          with `kv_scales f32[num_pages, page_size, 2 * Hkv]`, one scale
                               per token per K or V head, at the same [page, offset, 2h (+1)]
                               index as its row; the row reads back as q * scale.
                               int8, symmetric per row of head_dim values:
                                 scale = max|x| / 127,  q = clip(floor(x / scale + 0.5), +-127)
                               float8_e4m3fn, the row scaled onto e4m3's whole range:
                                 scale = max|x| / 448,  q = e4m3(clip(x / scale, +-448))
                               (scale 0 where the row is all zeros). Without its scale, e4m3
                               rounds values below 2^-6 to few bits (subnormals): on the
                               default model perplexity rose 1.10% unscaled, 0.69% scaled.

Reads upcast a tile to `compute_dtype` (exact for both: |q| <= 448 and 3 mantissa bits fit
bf16) and apply the scales to the scores (K) and the softmax weights (V), in f32. These
functions are plain jnp, so the reference and the Pallas kernels share them and quantize
identically.
"""

from __future__ import annotations

import jax.numpy as jnp

# The engine's choices (`kv_cache_dtype`): "auto" is the model's dtype.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float8_e4m3fn", "int8")
# What kv_pages may hold (float16 and float32: a model's own dtype under "auto").
KV_PAGE_DTYPES = tuple(jnp.dtype(name) for name in ("float32", "bfloat16", "float16",
                                                     "float8_e4m3fn", "int8"))
FLOAT8_E4M3_MAX = 448.0
INT8_MAX = 127
SCALE_DTYPE = jnp.dtype(jnp.float32)


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype) -> jnp.dtype:
    """The dtype of kv_pages for the engine's `kv_cache_dtype` setting."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {KV_CACHE_DTYPES}")
    return jnp.dtype(model_dtype if kv_cache_dtype == "auto" else kv_cache_dtype)


def is_quantized(dtype) -> bool:
    """True for caches that carry kv_scales (int8, float8_e4m3fn)."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def kv_cache_bytes_per_token(num_kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes one token's K and V take in one layer's cache, scales included."""
    dtype = jnp.dtype(dtype)
    per_head = head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if is_quantized(dtype) else 0)
    return 2 * num_kv_heads * per_head


def kv_scales_shape(kv_pages_shape) -> tuple[int, ...]:
    """[num_pages, page_size, 2 * Hkv] for kv_pages [num_pages, page_size, 2 * Hkv, D]."""
    return tuple(kv_pages_shape[:3])


def compute_dtype(q_dtype, kv_dtype) -> jnp.dtype:
    """The dtype q and the K/V tiles are multiplied in: q's, widened to the cache's when the
    cache holds wider floats (a f32 cache is not rounded to q's bf16). 8-bit caches, float
    or int, convert exactly to any q dtype."""
    q_dtype, kv_dtype = jnp.dtype(q_dtype), jnp.dtype(kv_dtype)
    if kv_dtype.itemsize == 1:
        return q_dtype
    return jnp.promote_types(q_dtype, kv_dtype)


def to_float_cache(x, dtype):
    """x cast to a float cache dtype; float8_e4m3fn saturates at +-448 (NaN stays NaN): e4m3fn
    has no inf, so a cast of anything larger would give NaN."""
    if jnp.dtype(dtype) == jnp.float8_e4m3fn:
        x = jnp.clip(x.astype(jnp.float32), -FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX)
    return x.astype(dtype)


def quantize_int8(x):
    """Symmetric int8 over the last axis: (q int8[..., D], scale f32[...]), x ~ q * scale.

    floor(y + 0.5) rather than round-half-even, which the Triton lowering lacks; the
    multiply by 1 / 127 (not a division) keeps the scale bit-identical on every backend.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) * (1.0 / INT8_MAX)
    # An all-zero row has scale 0: divide by the smallest normal instead, giving q = 0.
    scaled = x / jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)[..., None]
    q = jnp.clip(jnp.floor(scaled + 0.5), -INT8_MAX, INT8_MAX)
    return q.astype(jnp.int8), scale


def quantize_float8(x):
    """e4m3 over the last axis, scaled onto its range: (q float8_e4m3fn[..., D], scale
    f32[...]), x ~ q * scale."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) * (1.0 / FLOAT8_E4M3_MAX)
    scaled = x / jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)[..., None]
    return to_float_cache(scaled, jnp.float8_e4m3fn), scale


def quantize(x, dtype):
    """(q, scale) for a cache of `dtype` that carries scales (is_quantized)."""
    return quantize_int8(x) if jnp.dtype(dtype) == jnp.int8 else quantize_float8(x)


def dequantize(kv_pages, kv_scales=None):
    """The cache's values in f32: [num_pages, page_size, 2 * Hkv, D] (for references, tests)."""
    values = kv_pages.astype(jnp.float32)
    return values if kv_scales is None else values * kv_scales[..., None]
