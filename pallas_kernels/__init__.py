"""Ember's kernels behind one contract (docs/design.md), dispatched by backend.

backend: "auto" (by jax.default_backend()), "reference" (plain jnp), "cpu" (attention in
C++ through the XLA FFI, built on first use: cpu/; the CPU default where it builds, else the
reference; the KV write and sampling are the reference's), "gpu" (Pallas Triton; attention
on Mosaic GPU on Hopper and newer, as gpu/kernel_choice.py and EMBER_GPU_KERNELS decide; on
a jax without Pallas Triton, the reference wherever Mosaic GPU does not run), "tpu" (Pallas
Mosaic). interpret=True runs a Pallas kernel in interpret mode, so the GPU and TPU kernels
can be checked on a CPU.

These run inside a jitted step: `backend`, `interpret`, `sm_scale`, `sliding_window` and
`soft_cap` are Python values; every array is traced. Shapes and dtypes are checked here,
once, for every backend.

The KV cache may hold another dtype than q (kv_cache.py: bf16, fp8, int8 with kv_scales);
KV_CACHE_DTYPES, resolve_kv_cache_dtype and kv_cache_bytes_per_token size it for the engine.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.compat import has_pallas_triton
from pallas_kernels.kv_cache import (KV_CACHE_DTYPES, KV_PAGE_DTYPES, is_quantized,
                                     kv_cache_bytes_per_token, kv_scales_shape,
                                     resolve_kv_cache_dtype)
from pallas_kernels.reference import (ragged_paged_attention_reference, sample_reference,
                                      write_kv_pages_reference)

BACKENDS = ("auto", "reference", "cpu", "gpu", "tpu")
__all__ = ["BACKENDS", "KV_CACHE_DTYPES", "resolve_backend", "resolve_kv_cache_dtype",
           "kv_cache_bytes_per_token", "kv_scales_shape", "ragged_paged_attention",
           "write_kv_pages", "sample"]


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    import jax
    platform = jax.default_backend()
    if platform == "cpu":
        from pallas_kernels.cpu import available
        return "cpu" if available() else "reference"
    return {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform, "reference")


def _expect(name, x, shape, dtypes):
    """Raises ValueError unless x has `shape` (None matches any size) and a dtype in dtypes."""
    if len(x.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        wanted = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}.shape={tuple(x.shape)}: expected {wanted}")
    if not any(jnp.issubdtype(x.dtype, d) for d in dtypes):
        wanted = ", ".join("a float" if d is jnp.floating else jnp.dtype(d).name for d in dtypes)
        raise ValueError(f"{name}.dtype={x.dtype}: expected {wanted}")


def _check_kv_cache(kv_pages, kv_scales, head_dim=None):
    """kv_pages in one of KV_PAGE_DTYPES; kv_scales exactly when it is int8 or float8."""
    _expect("kv_pages", kv_pages, (None, None, None, head_dim), KV_PAGE_DTYPES)
    if is_quantized(kv_pages.dtype) and kv_scales is None:
        raise ValueError(f"kv_scales=None with kv_pages.dtype={kv_pages.dtype}: expected "
                         "kv_scales f32[num_pages, page_size, 2 * num_kv_heads] for an 8-bit cache")
    if not is_quantized(kv_pages.dtype) and kv_scales is not None:
        raise ValueError(f"kv_scales given with kv_pages.dtype={kv_pages.dtype}: expected "
                         "kv_scales=None (scales are for int8 and float8_e4m3fn caches only)")
    if kv_scales is not None:
        _expect("kv_scales", kv_scales, kv_scales_shape(kv_pages.shape), (jnp.float32,))


def _check_attention_args(q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens, num_seqs):
    _expect("q", q, (None, None, None), (jnp.floating,))
    _check_kv_cache(kv_pages, kv_scales, q.shape[2])
    num_seqs_max = kv_lens.shape[0] if kv_lens.ndim == 1 else None
    _expect("kv_lens", kv_lens, (None,), (jnp.int32,))
    _expect("page_indices", page_indices, (num_seqs_max, None), (jnp.int32,))
    _expect("cu_q_lens", cu_q_lens, (num_seqs_max + 1,), (jnp.int32,))
    _expect("num_seqs", num_seqs, (1,), (jnp.int32,))
    two_kv_heads = kv_pages.shape[2]
    if two_kv_heads % 2 or q.shape[1] % (two_kv_heads // 2):
        raise ValueError(f"q.shape={tuple(q.shape)}, kv_pages.shape={tuple(kv_pages.shape)}: "
                         "expected kv_pages.shape[2] = 2 * num_kv_heads with num_q_heads "
                         "a multiple of num_kv_heads")


def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                           sliding_window=None, soft_cap=None, kv_scales=None, backend="auto",
                           interpret=False):
    """Causal attention of the flattened ragged batch over the paged KV cache.

    Args:
      q: [T, num_q_heads, head_dim] query rows, sequence after sequence.
      kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]; K of head h at 2h, V at 2h+1;
        any of kv_cache.KV_PAGE_DTYPES, whatever q's dtype.
      kv_lens: i32[S] context length of each sequence after this step.
      page_indices: i32[S, P] page table of each sequence.
      cu_q_lens: i32[S + 1] sequence s owns rows cu_q_lens[s]:cu_q_lens[s+1].
      num_seqs: i32[1] live sequences; rows from cu_q_lens[num_seqs] on are padding.
      sm_scale: score scale (Python float); sliding_window: keys within this many positions
        (Python int or None); soft_cap: scores become soft_cap * tanh(s / soft_cap) (or None).
      kv_scales: f32[num_pages, page_size, 2 * num_kv_heads] for an int8 or fp8 kv_pages (required
        then, refused otherwise); K/V read as int8 * scale.
    Returns:
      [T, num_q_heads, head_dim] in q's dtype; padding rows are zeros.
    """
    _check_attention_args(q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens, num_seqs)
    backend = resolve_backend(backend)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                   kv_scales=kv_scales)
    if backend == "gpu":
        from pallas_kernels.gpu.ragged_paged_attention import ragged_paged_attention_gpu
        return ragged_paged_attention_gpu(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                          num_seqs, interpret=interpret, **options)
    if backend == "tpu":
        from pallas_kernels.tpu.ragged_paged_attention import ragged_paged_attention_tpu
        return ragged_paged_attention_tpu(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                          num_seqs, interpret=interpret, **options)
    if backend == "cpu":
        from pallas_kernels.cpu import ragged_paged_attention_cpu
        return ragged_paged_attention_cpu(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                          num_seqs, **options)
    return ragged_paged_attention_reference(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                            num_seqs, **options)


def write_kv_pages(kv_pages, k, v, slot_mapping, *, kv_scales=None, backend="auto",
                   interpret=False):
    """Writes this step's K/V rows into the cache, in the cache's dtype (kv_cache.py: fp8
    saturates at +-448; int8 stores round(x / scale) and scale = max|x| / 127 per row).

    Args:
      kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim] (donate it in the step).
      k, v: [T, num_kv_heads, head_dim], any float dtype.
      slot_mapping: i32[T] page * page_size + offset; padding rows point into page 0.
      kv_scales: f32[num_pages, page_size, 2 * num_kv_heads] for an int8 kv_pages (required
        then, refused otherwise; donate it too).
    Returns:
      kv_pages with row t's K at [slot // page_size, slot % page_size, 2h] and V at 2h + 1;
      (kv_pages, kv_scales) when kv_scales is given, its scales at [slot..., 2h] and 2h + 1.
    """
    _check_kv_cache(kv_pages, kv_scales)
    num_kv_heads, head_dim = kv_pages.shape[2] // 2, kv_pages.shape[3]
    _expect("k", k, (None, num_kv_heads, head_dim), (jnp.floating,))
    _expect("v", v, k.shape, (jnp.floating,))
    _expect("slot_mapping", slot_mapping, (k.shape[0],), (jnp.int32,))
    backend = resolve_backend(backend)
    if backend == "gpu" and has_pallas_triton():
        from pallas_kernels.gpu.write_kv_pages import write_kv_pages_gpu
        return write_kv_pages_gpu(kv_pages, k, v, slot_mapping, kv_scales, interpret=interpret)
    # On "cpu", "tpu" (and a GPU without Pallas Triton) XLA's scatter into the donated cache is the
    # write (no Mosaic kernel).
    return write_kv_pages_reference(kv_pages, k, v, slot_mapping, kv_scales)


def sample(logits, temperature, top_k, top_p, min_p, keys, *, backend="auto", interpret=False):
    """Draws one token per row; semantics in reference.sample_reference.

    Args:
      logits: [S, V] float. temperature: f32[S] (0 = greedy); top_k: i32[S] (<= 0 or >= V
        off); top_p: f32[S] (>= 1 off); min_p: f32[S] (<= 0 off).
      keys: u32[S, 2], jax.random.key_data(fold_in(PRNGKey(seed), output_position)).
    Returns:
      (token_ids i32[S], logprobs f32[S]); logprobs are of the tempered distribution at the
      chosen token, before masks. Every backend draws the same token for the same key. On
      "tpu" this is the reference (XLA fuses it well enough there; no Mosaic kernel yet), and
      on a GPU whose jax has no Pallas Triton.
    """
    _expect("logits", logits, (None, None), (jnp.floating,))
    rows = logits.shape[0]
    _expect("temperature", temperature, (rows,), (jnp.float32,))
    _expect("top_k", top_k, (rows,), (jnp.int32,))
    _expect("top_p", top_p, (rows,), (jnp.float32,))
    _expect("min_p", min_p, (rows,), (jnp.float32,))
    _expect("keys", keys, (rows, 2), (jnp.uint32,))
    backend = resolve_backend(backend)
    if backend == "gpu" and has_pallas_triton():
        from pallas_kernels.gpu.sampling import sample_gpu
        return sample_gpu(logits, temperature, top_k, top_p, min_p, keys, interpret=interpret)
    return sample_reference(logits, temperature, top_k, top_p, min_p, keys)
