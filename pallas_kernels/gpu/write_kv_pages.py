"""Writes this step's K/V rows into the paged cache on the GPU (Pallas, Triton lowering).

A program takes `block_tokens` rows and one kv head and stores K and V at their slots. The
cache is aliased to the output, so with the cache donated to the step the write is in place.
Padding rows all point into page 0, so their racing writes land where nothing reads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import gpu_load, gpu_store, triton_compiler_params

BLOCK_TOKENS = 16


def _write_kernel(slot_mapping_ref,  # i32[T]
                  k_ref,             # [T, Hkv, D]
                  v_ref,             # [T, Hkv, D]
                  _kv_in_ref,        # [num_pages, page_size, 2 * Hkv, D]  aliased with kv_ref
                  kv_ref,            # [num_pages, page_size, 2 * Hkv, D]
                  *, block_tokens):
    first, kv_head = pl.program_id(0) * block_tokens, pl.program_id(1)
    num_tokens, _, head_dim = k_ref.shape
    page_size = kv_ref.shape[1]
    tokens = first + jnp.arange(block_tokens, dtype=jnp.int32)             # i32[BT]
    live = tokens < num_tokens
    slots = gpu_load(slot_mapping_ref.at[tokens], mask=live, other=0)
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    source = (tokens[:, None], kv_head, dims)
    target = ((slots // page_size)[:, None], (slots % page_size)[:, None])
    k = gpu_load(k_ref.at[source], mask=live[:, None], other=0)            # [BT, D]
    v = gpu_load(v_ref.at[source], mask=live[:, None], other=0)
    gpu_store(kv_ref.at[(*target, 2 * kv_head, dims)], k.astype(kv_ref.dtype), mask=live[:, None])
    gpu_store(kv_ref.at[(*target, 2 * kv_head + 1, dims)], v.astype(kv_ref.dtype),
              mask=live[:, None])


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_pages_gpu(kv_pages, k, v, slot_mapping, *, interpret=False):
    """kv_pages [num_pages, page_size, 2 * Hkv, D]; k, v [T, Hkv, D]; slot_mapping i32[T]."""
    num_tokens, num_kv_heads, _ = k.shape
    return pl.pallas_call(
        functools.partial(_write_kernel, block_tokens=BLOCK_TOKENS),
        grid=(pl.cdiv(num_tokens, BLOCK_TOKENS), num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
        input_output_aliases={3: 0},
        compiler_params=triton_compiler_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name="ember_write_kv_pages",
    )(slot_mapping, k, v, kv_pages)
