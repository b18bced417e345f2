"""Ragged paged attention on the GPU: decode rows by split-K, prefill rows flash-style.

A step's batch mixes sequences with one query row (decode) and sequences with many
(prefill chunks). Both kernels run on every step; each skips the other's sequences:

  prefill_attention         rows of multi-row sequences; every other row stays zero
  decode_attention_partials one row per decode sequence, context split over programs
                            (each Triton, or its Mosaic GPU twin on Hopper and newer:
                            kernel_choice.py)
  combine_splits            merges the splits, scattered into the decode rows

Padding rows (from cu_q_lens[num_seqs] on) belong to neither and stay zero. On a jax without
Pallas Triton, a batch the Mosaic GPU kernels do not take runs the reference (kernel_choice.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.block_sizes import AttentionBlockSizes, attention_block_sizes
from pallas_kernels.gpu.decode_attention import combine_splits, decode_attention_partials
from pallas_kernels.gpu.kernel_choice import decode_kernel_for, prefill_kernel_for
from pallas_kernels.gpu.mosaic_decode_attention import mosaic_decode_attention_partials
from pallas_kernels.gpu.mosaic_prefill_attention import mosaic_prefill_attention
from pallas_kernels.gpu.prefill_attention import prefill_attention
from pallas_kernels.kv_cache import compute_dtype
from pallas_kernels.reference import ragged_paged_attention_reference


def ragged_paged_attention_gpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale, sliding_window=None, soft_cap=None, kv_scales=None,
                               block_sizes: AttentionBlockSizes | None = None,
                               interpret=False, decode_kernel: str | None = None,
                               prefill_kernel: str | None = None):
    """Same contract as pallas_kernels.ragged_paged_attention (arguments checked there).

    q [T, Hq, D]; kv_pages [num_pages, page_size, 2 * Hkv, D]; kv_lens i32[S];
    page_indices i32[S, P]; cu_q_lens i32[S + 1]; num_seqs i32[1];
    kv_scales f32[num_pages, page_size, 2 * Hkv] (8-bit caches) or None -> [T, Hq, D].
    decode_kernel, prefill_kernel: "triton", "mosaic" or "reference"; None chooses
    (kernel_choice.py), here outside the jit, so that EMBER_GPU_KERNELS is read on every trace.
    """
    decode_kernel = decode_kernel or decode_kernel_for(q, kv_pages, kv_scales)
    prefill_kernel = prefill_kernel or prefill_kernel_for(q, kv_pages, kv_scales)
    if "reference" in (decode_kernel, prefill_kernel):   # no Pallas kernel takes this batch
        return ragged_paged_attention_reference(
            q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, kv_scales=kv_scales)
    return _ragged_paged_attention_gpu(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, kv_scales=kv_scales,
        block_sizes=block_sizes, interpret=interpret, decode_kernel=decode_kernel,
        prefill_kernel=prefill_kernel)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "block_sizes", "interpret", "decode_kernel",
                                             "prefill_kernel"))
def _ragged_paged_attention_gpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                                sm_scale, sliding_window, soft_cap, kv_scales, block_sizes,
                                interpret, decode_kernel, prefill_kernel):
    if block_sizes is None:  # tiles are held in the compute dtype, whatever the cache's
        itemsize = compute_dtype(q.dtype, kv_pages.dtype).itemsize
        block_sizes = attention_block_sizes(q.shape[2], itemsize)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                   block_sizes=block_sizes, interpret=interpret)
    if prefill_kernel == "mosaic":
        out = mosaic_prefill_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                       sm_scale=sm_scale, sliding_window=sliding_window,
                                       soft_cap=soft_cap, interpret=interpret)
    else:
        out = prefill_attention(q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens,
                                num_seqs, **options)
    if decode_kernel == "mosaic":
        partials = mosaic_decode_attention_partials(q, kv_pages, kv_lens, page_indices,
                                                    cu_q_lens, num_seqs, **options)
    else:
        partials = decode_attention_partials(q, kv_pages, kv_scales, kv_lens, page_indices,
                                             cu_q_lens, num_seqs, **options)
    decoded = combine_splits(*partials).astype(q.dtype)                   # [S, Hq, D]
    max_seqs = kv_lens.shape[0]
    is_decode = ((jnp.arange(max_seqs) < num_seqs[0])
                 & (cu_q_lens[1:] - cu_q_lens[:-1] == 1))
    decode_rows = jnp.where(is_decode, cu_q_lens[:-1], q.shape[0])        # past the end: dropped
    return out.at[decode_rows].set(decoded, mode="drop")
