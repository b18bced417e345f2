"""Writes this step's K/V rows into the paged cache on the GPU (Pallas, Triton lowering).

A program takes `block_tokens` rows and one kv head and stores K and V at their slots, in the
cache's dtype (kv_cache.py: a float cast; int8 and fp8 rows quantized with one scale per
row, computed here). The cache (and the scales) are aliased to the outputs, so with them
donated to the step the write is in place. Padding rows all point into page 0, so their
racing writes land where nothing reads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import gpu_load, gpu_store, triton_compiler_params
from pallas_kernels.kv_cache import quantize, to_float_cache

BLOCK_TOKENS = 16


def _write_kernel(slot_mapping_ref,  # i32[T]
                  k_ref,             # [T, Hkv, D]
                  v_ref,             # [T, Hkv, D]
                  *refs,             # inputs aliased with the outputs, then the outputs:
                                     # kv [num_pages, page_size, 2 * Hkv, D]
                                     # and if quantized kv_scales f32[num_pages, page_size, 2 * Hkv]
                  block_tokens, quantized):
    kv_ref, scales_ref = (refs[-2], refs[-1]) if quantized else (refs[-1], None)
    first, kv_head = pl.program_id(0) * block_tokens, pl.program_id(1)
    num_tokens, _, head_dim = k_ref.shape
    page_size = kv_ref.shape[1]
    tokens = first + jnp.arange(block_tokens, dtype=jnp.int32)             # i32[BT]
    live = tokens < num_tokens
    slots = gpu_load(slot_mapping_ref.at[tokens], mask=live, other=0)
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    source = (tokens[:, None], kv_head, dims)
    target = ((slots // page_size)[:, None], (slots % page_size)[:, None])
    for part, rows_ref in ((0, k_ref), (1, v_ref)):                         # K at 2h, V at 2h+1
        rows = gpu_load(rows_ref.at[source], mask=live[:, None], other=0)  # [BT, D]
        if quantized:
            rows, scales = quantize(rows, kv_ref.dtype)                     # 8-bit[BT, D], f32[BT]
            gpu_store(scales_ref.at[slots // page_size, slots % page_size, 2 * kv_head + part],
                      scales, mask=live)
        else:
            rows = to_float_cache(rows, kv_ref.dtype)
        gpu_store(kv_ref.at[(*target, 2 * kv_head + part, dims)], rows, mask=live[:, None])


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_pages_gpu(kv_pages, k, v, slot_mapping, kv_scales=None, *, interpret=False):
    """kv_pages [num_pages, page_size, 2 * Hkv, D]; k, v [T, Hkv, D]; slot_mapping i32[T];
    kv_scales f32[num_pages, page_size, 2 * Hkv] for an int8 or fp8 kv_pages, else None.

    Returns kv_pages, or (kv_pages, kv_scales) when kv_scales is given.
    """
    num_tokens, num_kv_heads, _ = k.shape
    caches = (kv_pages,) if kv_scales is None else (kv_pages, kv_scales)
    written = pl.pallas_call(
        functools.partial(_write_kernel, block_tokens=BLOCK_TOKENS,
                          quantized=kv_scales is not None),
        grid=(pl.cdiv(num_tokens, BLOCK_TOKENS), num_kv_heads),
        out_shape=tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches),
        input_output_aliases={3 + i: i for i in range(len(caches))},
        compiler_params=triton_compiler_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name="ember_write_kv_pages",
    )(slot_mapping, k, v, *caches)
    return written[0] if kv_scales is None else tuple(written)
