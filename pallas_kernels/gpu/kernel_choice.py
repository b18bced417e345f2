"""Which GPU kernels run: attention on Mosaic GPU (Hopper and newer) or Triton, and a scanned
layer's small products on the Pallas layer matmul or XLA's dot.

EMBER_GPU_KERNELS, read when the step is traced:
  auto (default)  Mosaic GPU for decode (prefill) on a GPU of compute capability >= 9.0 when
                  this jax has Mosaic GPU and the kernels cover the batch (mosaic_supported),
                  if MOSAIC_DECODE_BY_DEFAULT (MOSAIC_PREFILL_BY_DEFAULT) is set or this jax
                  has no Pallas Triton lowering; Triton everywhere else.
  triton          Triton only (the Pallas Triton lowering is deprecated since jax 0.11).
  mosaic          Mosaic GPU wherever it covers the batch, whatever the device: lowering for
                  a GPU from a CPU, GPU interpret mode, timing both kernels.

EMBER_GPU_LAYER_MATMUL, read when the step is traced:
  auto (default)  the Pallas layer matmul (gpu/layer_matmul.py) for the products of a scanned
                  layer with few rows (LAYER_MATMUL_BY_DEFAULT), XLA's dot for the rest.
  pallas          the layer matmul wherever it covers the product.
  xla             XLA's dot (it copies a scanned layer's weight out of its stack first).

On a jax without the Pallas Triton lowering (compat.has_pallas_triton: removed in some
release after 0.12), "reference" (XLA's attention) takes Triton's place wherever Mosaic GPU
does not run, and "triton" is refused; pallas_kernels/__init__.py then samples and writes
the KV cache with the reference too.
"""

from __future__ import annotations

import os

import jax

from pallas_kernels.compat import cuda_compute_capability, has_mosaic_gpu, has_pallas_triton
from pallas_kernels.gpu import layer_matmul
from pallas_kernels.gpu.mosaic_tiles import mosaic_supported

GPU_KERNELS_VARIABLE = "EMBER_GPU_KERNELS"
GPU_KERNEL_CHOICES = ("auto", "triton", "mosaic")
MOSAIC_MIN_COMPUTE_CAPABILITY = 9.0
# The Mosaic kernels match the reference natively (H200, 2026-11-30, docs/perf.md) but are
# slower than Triton's: decode 1.7x at 64 sequences of 4k context (par at 8 of 1k),
# prefill 2.8x. So "auto" keeps Triton where this jax has it; without it, Mosaic GPU on
# Hopper and newer (its decode 16x the XLA reference's speed at 4k context).
MOSAIC_DECODE_BY_DEFAULT = False
MOSAIC_PREFILL_BY_DEFAULT = False
LAYER_MATMUL_VARIABLE = "EMBER_GPU_LAYER_MATMUL"
LAYER_MATMUL_CHOICES = ("auto", "pallas", "xla")
# On by the device check of 2026-11-30 (H200, docs/perf.md): Llama-3-8B bf16 batch-1 decode
# 81.6 -> 186 tok/s, the kernel 2.6x XLA's dot over a scanned stack at 64 rows.
LAYER_MATMUL_BY_DEFAULT = True
# The rows up to which it runs: measured there at 1 and 64 rows; 128 and 256 (the kernel
# takes them, in programs of 64 rows) are for `bench_kernels.py --layer-matmul --sweep`.
LAYER_MATMUL_MAX_ROWS = 64


def layer_matmul_wanted(rows: int) -> bool:
    """Whether scanned layers' products of `rows` rows run on the Pallas layer matmul where it
    covers them (layer_matmul.supported, supported_quantized), by EMBER_GPU_LAYER_MATMUL,
    LAYER_MATMUL_MAX_ROWS, the device and this jax."""
    choice = os.environ.get(LAYER_MATMUL_VARIABLE, "auto")
    if choice not in LAYER_MATMUL_CHOICES:
        raise ValueError(f"{LAYER_MATMUL_VARIABLE}={choice!r}: expected one of "
                         f"{LAYER_MATMUL_CHOICES}")
    wanted = choice == "pallas" or (choice == "auto" and LAYER_MATMUL_BY_DEFAULT)
    return (wanted and rows <= LAYER_MATMUL_MAX_ROWS and jax.default_backend() == "gpu"
            and has_pallas_triton())


def uses_layer_matmul(rows: int, stack_shape: tuple[int, ...]) -> bool:
    """Whether a scanned layer's product of `rows` rows against its float [layers, in, out]
    stack runs on the Pallas layer matmul."""
    return layer_matmul_wanted(rows) and layer_matmul.supported(rows, stack_shape)


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
    if not mosaic_by_default and fallback == "triton":
        return fallback
    capability = cuda_compute_capability()
    hopper_or_newer = capability is not None and capability >= MOSAIC_MIN_COMPUTE_CAPABILITY
    return "mosaic" if hopper_or_newer else fallback
