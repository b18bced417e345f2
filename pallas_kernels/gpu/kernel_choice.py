"""Which GPU decode kernel runs: Mosaic GPU (Hopper and newer) or Triton.

EMBER_GPU_KERNELS, read when the step is traced:
  auto (default)  Mosaic GPU for decode on a GPU of compute capability >= 9.0 when this jax
                  has Mosaic GPU and the kernel covers the batch (mosaic_decode_supported),
                  once MOSAIC_DECODE_BY_DEFAULT is set; Triton everywhere else, and always
                  for prefill.
  triton          Triton only (the Pallas Triton lowering is deprecated since jax 0.11).
  mosaic          Mosaic GPU wherever it covers the batch, whatever the device: lowering for
                  a GPU from a CPU, GPU interpret mode, timing both kernels.
"""

from __future__ import annotations

import os

from pallas_kernels.compat import cuda_compute_capability, has_mosaic_gpu
from pallas_kernels.gpu.mosaic_decode_attention import mosaic_decode_supported

GPU_KERNELS_VARIABLE = "EMBER_GPU_KERNELS"
GPU_KERNEL_CHOICES = ("auto", "triton", "mosaic")
MOSAIC_MIN_COMPUTE_CAPABILITY = 9.0
# The Mosaic kernel has been lowered and interpreted, never compiled nor run on a GPU: until
# scripts/device_check.sh has checked it natively, "auto" keeps Triton and "mosaic" opts in.
MOSAIC_DECODE_BY_DEFAULT = False


def decode_kernel_for(q, kv_pages, kv_scales) -> str:
    """"mosaic" or "triton" for this batch (q [T, Hq, D], kv_pages [pages, page_size,
    2 * Hkv, D], kv_scales or None), by EMBER_GPU_KERNELS and the device."""
    choice = os.environ.get(GPU_KERNELS_VARIABLE, "auto")
    if choice not in GPU_KERNEL_CHOICES:
        raise ValueError(f"{GPU_KERNELS_VARIABLE}={choice!r}: expected one of "
                         f"{GPU_KERNEL_CHOICES}")
    if choice == "triton" or not has_mosaic_gpu():
        return "triton"
    _, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    if not mosaic_decode_supported(q.dtype, kv_pages.dtype, num_q_heads, two_kv_heads // 2,
                                   head_dim, page_size, kv_scales is not None):
        return "triton"
    if choice == "mosaic":
        return "mosaic"
    if not MOSAIC_DECODE_BY_DEFAULT:
        return "triton"
    capability = cuda_compute_capability()
    hopper_or_newer = capability is not None and capability >= MOSAIC_MIN_COMPUTE_CAPABILITY
    return "mosaic" if hopper_or_newer else "triton"
