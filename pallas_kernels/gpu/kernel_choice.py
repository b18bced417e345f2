"""Which GPU attention kernels run: Mosaic GPU (Hopper and newer) or Triton.

EMBER_GPU_KERNELS, read when the step is traced:
  auto (default)  Mosaic GPU for decode (prefill) on a GPU of compute capability >= 9.0 when
                  this jax has Mosaic GPU and the kernels cover the batch (mosaic_supported),
                  once MOSAIC_DECODE_BY_DEFAULT (MOSAIC_PREFILL_BY_DEFAULT) is set; Triton
                  everywhere else.
  triton          Triton only (the Pallas Triton lowering is deprecated since jax 0.11).
  mosaic          Mosaic GPU wherever it covers the batch, whatever the device: lowering for
                  a GPU from a CPU, GPU interpret mode, timing both kernels.

On a jax without the Pallas Triton lowering (compat.has_pallas_triton: removed in some
release after 0.12), "reference" (XLA's attention) takes Triton's place wherever Mosaic GPU
does not run, and "triton" is refused; pallas_kernels/__init__.py then samples and writes
the KV cache with the reference too.
"""

from __future__ import annotations

import os

import jax

from pallas_kernels.compat import cuda_compute_capability, has_mosaic_gpu, has_pallas_triton
from pallas_kernels.gpu.mosaic_tiles import mosaic_supported

GPU_KERNELS_VARIABLE = "EMBER_GPU_KERNELS"
GPU_KERNEL_CHOICES = ("auto", "triton", "mosaic")
MOSAIC_MIN_COMPUTE_CAPABILITY = 9.0
# The Mosaic kernels have been lowered and interpreted, never compiled nor run on a GPU: until
# scripts/device_check.sh has checked them natively, "auto" keeps Triton and "mosaic" opts in.
MOSAIC_DECODE_BY_DEFAULT = False
MOSAIC_PREFILL_BY_DEFAULT = False


def decode_kernel_for(q, kv_pages, kv_scales) -> str:
    """"mosaic", "triton" or "reference" for this batch's decode rows (q [T, Hq, D], kv_pages
    [pages, page_size, 2 * Hkv, D], kv_scales or None), by EMBER_GPU_KERNELS, the device and
    this jax."""
    return _kernel_for(q, kv_pages, kv_scales, MOSAIC_DECODE_BY_DEFAULT)


def prefill_kernel_for(q, kv_pages, kv_scales) -> str:
    """The same choice for the batch's prefill rows."""
    return _kernel_for(q, kv_pages, kv_scales, MOSAIC_PREFILL_BY_DEFAULT)


def _kernel_for(q, kv_pages, kv_scales, mosaic_by_default) -> str:
    choice = os.environ.get(GPU_KERNELS_VARIABLE, "auto")
    if choice not in GPU_KERNEL_CHOICES:
        raise ValueError(f"{GPU_KERNELS_VARIABLE}={choice!r}: expected one of "
                         f"{GPU_KERNEL_CHOICES}")
    fallback = "triton" if has_pallas_triton() else "reference"
    if choice == "triton" and fallback != "triton":
        raise ValueError(f"{GPU_KERNELS_VARIABLE}=triton: jax {jax.__version__} has no Pallas "
                         f"Triton lowering; expected auto or mosaic")
    if choice == "triton" or not has_mosaic_gpu():
        return fallback
    _, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    if not mosaic_supported(q.dtype, kv_pages.dtype, num_q_heads, two_kv_heads // 2,
                            head_dim, page_size, kv_scales is not None):
        return fallback
    if choice == "mosaic":
        return "mosaic"
    if not mosaic_by_default:
        return fallback
    capability = cuda_compute_capability()
    hopper_or_newer = capability is not None and capability >= MOSAIC_MIN_COMPUTE_CAPABILITY
    return "mosaic" if hopper_or_newer else fallback
