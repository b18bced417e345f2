"""Every kernel lowers for its accelerator at production-like shapes, without one: the GPU
kernels to Triton IR for CUDA (verified as XLA will verify it), the TPU kernel to Mosaic.

Interpret mode checks what a kernel computes; this checks what only the real lowering
rejects (non-power-of-2 tiles, unsupported primitives or indexing) before a device sees it.
It does not run the compilers behind them (Triton to PTX, Mosaic to TPU code). These pin the
Triton decode kernel; test_mosaic_gpu.py lowers the Mosaic GPU one.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels
from pallas_kernels.compat import cuda_lowering_target
from pallas_kernels.gpu.kernel_choice import GPU_KERNELS_VARIABLE

TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, "triton")


@pytest.fixture(autouse=True)
def verify_triton_modules(monkeypatch):
    """Runs the MLIR verifier on each Triton module, as XLA does when it parses one.

    Reaches into jax's private lowering module; skipped if a jax release moves it.
    """
    try:
        from jax._src.pallas.triton import lowering
        lower = lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError):
        yield
        return

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises with the offending op
        return result
    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    yield


def lower_for(platform, fn, *args):
    with cuda_lowering_target() if platform == "cuda" else contextlib.nullcontext():
        exported = export.export(
            jax.jit(fn), platforms=[platform],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    return exported.mlir_module()


lower_for_cuda = functools.partial(lower_for, "cuda")


def attention_args(head_dim, num_q_heads, num_kv_heads, page_size):
    tokens, seqs, pages, max_pages = 512, 64, 4096, 256
    return (spec((tokens, num_q_heads, head_dim), jnp.bfloat16),
            spec((pages, page_size, 2 * num_kv_heads, head_dim), jnp.bfloat16),
            spec((seqs,), jnp.int32), spec((seqs, max_pages), jnp.int32),
            spec((seqs + 1,), jnp.int32), spec((1,), jnp.int32))


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("head_dim,num_q_heads,num_kv_heads,page_size,soft_cap,window", [
    (128, 32, 8, 16, None, None),
    (64, 16, 16, 32, 30.0, None),
    (256, 16, 2, 64, None, 4096),
    (128, 28, 4, 16, None, None),     # group 7: padded to 8
])
def test_attention_lowers(head_dim, num_q_heads, num_kv_heads, page_size, soft_cap, window):
    attention = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=0.1,
                                  soft_cap=soft_cap, sliding_window=window, backend="gpu")
    module = lower_for_cuda(attention,
                            *attention_args(head_dim, num_q_heads, num_kv_heads, page_size))
    assert module.count(TRITON_CALL) == 2  # the prefill and the decode kernel


@pytest.mark.parametrize("head_dim,num_q_heads,num_kv_heads,page_size,soft_cap,window", [
    (128, 32, 8, 16, None, None),
    (64, 8, 8, 32, 30.0, 1024),
])
def test_tpu_attention_lowers_to_mosaic(head_dim, num_q_heads, num_kv_heads, page_size,
                                        soft_cap, window):
    attention = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=0.1,
                                  soft_cap=soft_cap, sliding_window=window, backend="tpu")
    module = lower_for("tpu", attention,
                       *attention_args(head_dim, num_q_heads, num_kv_heads, page_size))
    assert "tpu_custom_call" in module


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("kv_dtype", [jnp.float8_e4m3fn, jnp.int8])
def test_attention_over_8_bit_caches_lowers(platform, kv_dtype):
    q, kv_pages, *metadata = attention_args(128, 32, 8, 16)
    kv_pages = spec(kv_pages.shape, kv_dtype)
    kv_scales = spec(kv_pages.shape[:3], jnp.float32)   # both 8-bit caches carry scales

    def attention(q, kv_pages, kv_scales, *metadata):
        return pallas_kernels.ragged_paged_attention(
            q, kv_pages, *metadata, kv_scales=kv_scales, sm_scale=0.1,
            backend="gpu" if platform == "cuda" else "tpu")
    module = lower_for(platform, attention, q, kv_pages, kv_scales, *metadata)
    if platform == "cuda":
        assert module.count(TRITON_CALL) == 2  # the prefill and the decode kernel
    else:
        assert "tpu_custom_call" in module


@pytest.mark.parametrize("kv_dtype", [jnp.float8_e4m3fn, jnp.int8])
def test_write_kv_pages_into_8_bit_caches_lowers(kv_dtype):
    kv_pages = spec((4096, 16, 16, 128), kv_dtype)
    kv_scales = spec((4096, 16, 16), jnp.float32)   # both 8-bit caches carry scales
    write = functools.partial(pallas_kernels.write_kv_pages, backend="gpu")
    rows = spec((512, 8, 128), jnp.bfloat16)
    module = lower_for_cuda(lambda *args: write(*args[:4], kv_scales=args[4]), kv_pages, rows,
                            rows, spec((512,), jnp.int32), kv_scales)
    assert TRITON_CALL in module


def test_write_kv_pages_and_sample_lower():
    write = functools.partial(pallas_kernels.write_kv_pages, backend="gpu")
    module = lower_for_cuda(write, spec((4096, 16, 16, 128), jnp.bfloat16),
                            spec((512, 8, 128), jnp.bfloat16), spec((512, 8, 128), jnp.bfloat16),
                            spec((512,), jnp.int32))
    assert TRITON_CALL in module
    sample = functools.partial(pallas_kernels.sample, backend="gpu")
    rows, vocab = 256, 128256
    module = lower_for_cuda(sample, spec((rows, vocab), jnp.float32), spec((rows,), jnp.float32),
                            spec((rows,), jnp.int32), spec((rows,), jnp.float32),
                            spec((rows,), jnp.float32), spec((rows, 2), jnp.uint32))
    assert TRITON_CALL in module


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_layer_matmul_lowers(dtype):
    from pallas_kernels.gpu.layer_matmul import layer_matmul_gpu
    for rows, in_features, out_features in ((1, 4096, 14336), (64, 14336, 4096),
                                            (256, 4096, 14336)):
        module = lower_for_cuda(layer_matmul_gpu, spec((rows, in_features), dtype),
                                spec((32, in_features, out_features), dtype),
                                spec((), jnp.int32))
        assert TRITON_CALL in module
    from pallas_kernels.gpu.layer_matmul import grouped_layer_matmul_gpu
    for rows in (1, 64):   # q, k and v of Llama-3-8B in one call
        module = lower_for_cuda(
            lambda x, layer, *stacks: grouped_layer_matmul_gpu(x, stacks, layer),
            spec((rows, 4096), dtype), spec((), jnp.int32),
            *(spec((32, 4096, width), dtype) for width in (4096, 1024, 1024)))
        assert TRITON_CALL in module


@pytest.mark.parametrize("kind,scale_rows", [("int8", 1), ("int8", 128), ("int4", 128)])
def test_quantized_layer_matmul_lowers(kind, scale_rows):
    from pallas_kernels.gpu.layer_matmul import quantized_layer_matmul_gpu
    in_features, out_features = 4096, 14336
    weight = ((spec((32, in_features, out_features), jnp.int8),) if kind == "int8"
              else (spec((32, in_features // 2, out_features), jnp.uint8),))
    scales = (spec((32, scale_rows, out_features), jnp.float16),) * (1 if kind == "int8" else 2)
    for rows in (1, 64, 256):
        module = lower_for_cuda(
            lambda x, layer, *arrays: quantized_layer_matmul_gpu(x, arrays, layer, kind=kind),
            spec((rows, in_features), jnp.bfloat16), spec((), jnp.int32), *weight, *scales)
        assert TRITON_CALL in module
