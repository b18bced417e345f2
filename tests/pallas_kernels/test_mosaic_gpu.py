"""The Mosaic GPU attention kernels (pallas_kernels/gpu/mosaic_decode_attention.py,
mosaic_prefill_attention.py) and the choice between them and the Triton ones
(gpu/kernel_choice.py).

On a CPU the kernels run in Mosaic GPU interpret mode (TMA copies, barriers and wgmma
simulated) and lower for CUDA through the real Mosaic GPU lowering; natively on a GPU of
compute capability >= 9.0 (the device check) they run compiled. Batches hold NaN in every slot
a sequence does not own, including the tail of its last page, which TMA copies do read.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallas_kernels
from pallas_kernels.compat import (cuda_compute_capability, cuda_lowering_target, has_mosaic_gpu,
                                   has_pallas_triton)
from pallas_kernels.gpu import kernel_choice
from pallas_kernels.gpu.kernel_choice import (GPU_KERNELS_VARIABLE, decode_kernel_for,
                                              prefill_kernel_for)
from tests.pallas_kernels.common import GPU_INTERPRET, ON_GPU
from tests.pallas_kernels.test_ragged_paged_attention import (TOLERANCE, Case, make_batch,
                                                              options_for)

pytestmark = pytest.mark.skipif(not has_mosaic_gpu(), reason="this jax has no Mosaic GPU")
MOSAIC_CALL = "mosaic_gpu_v2"
TRITON_CALL = "__gpu$xla.gpu.triton"
HOPPER = (cuda_compute_capability() or 0) >= 9.0

CASES = {
    "decode-page16-gqa4-d128": Case([1, 1, 1, 1], [37, 5, 300, 130], 16, 8, 2, 128,
                                    jnp.bfloat16, None, None),
    "decode-page32-gqa8-d64-cap-window": Case([1, 1, 1], [70, 1, 200], 32, 8, 1, 64,
                                              jnp.bfloat16, 30.0, 45),
    # Pages larger than a tile (two tiles a page), decode and prefill rows in one batch.
    "mixed-page128-mha-d64-f16": Case([1, 17, 1], [200, 0, 64], 128, 2, 2, 64,
                                      jnp.float16, None, None),
    "mixed-page8-gqa3-d64-window": Case([1, 9, 1], [20, 11, 90], 8, 6, 2, 64,
                                        jnp.bfloat16, None, 30),
    # Prefill: 64 // group rows a block, so 8 (gqa 8), 21 (gqa 3, one padding M row), 64
    # (mha: one block spans two tiles of keys), 1 (64 query heads a kv head); chunks after a
    # long cached prefix; a window that starts mid-tile; a soft cap.
    "prefill-page16-gqa8-d128-cached": Case([19, 40], [200, 0], 16, 8, 1, 128,
                                            jnp.bfloat16, None, None),
    "prefill-page8-gqa3-d64-window-cap": Case([50, 7], [30, 90], 8, 6, 2, 64,
                                              jnp.bfloat16, 20.0, 37),
    "prefill-page64-mha-d128-f16": Case([70, 3], [61, 5], 64, 2, 2, 128,
                                        jnp.float16, None, None),
    "prefill-page32-group64-d64": Case([5, 1], [33, 9], 32, 64, 1, 64,
                                       jnp.bfloat16, None, 20),
}


@pytest.fixture
def force_mosaic(monkeypatch):
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, "mosaic")


def attention(interpret, **options):
    """A fresh jit: the kernel choice is read when it traces."""
    return jax.jit(functools.partial(pallas_kernels.ragged_paged_attention, backend="gpu",
                                     interpret=interpret, **options))


@pytest.mark.skipif(ON_GPU and not HOPPER, reason="Mosaic GPU kernel needs compute 9.0")
@pytest.mark.skipif(os.environ.get(GPU_KERNELS_VARIABLE) == "triton",
                    reason="EMBER_GPU_KERNELS=triton (the device check sets it when the Mosaic "
                           "GPU kernel failed its first stage)")
@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_matches_reference(force_mosaic, name):
    case = CASES[name]
    batch = make_batch(5, case)
    options = options_for(case)
    out = np.asarray(attention(GPU_INTERPRET, **options)(*batch.args()), np.float32)
    expected = jax.jit(functools.partial(pallas_kernels.ragged_paged_attention,
                                         backend="reference", **options))(*batch.args())
    assert not np.isnan(out).any(), "a slot the sequence does not own reached the output"
    np.testing.assert_array_equal(out[int(np.sum(case.q_lens)):], 0.0)     # padding rows
    np.testing.assert_allclose(out, np.asarray(expected, np.float32), **TOLERANCE[jnp.bfloat16])


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("head_dim,num_q_heads,num_kv_heads,page_size,soft_cap,window", [
    (128, 32, 8, 16, None, None),
    (64, 16, 16, 128, 30.0, 1024),
    (128, 28, 4, 32, None, None),     # group 7: padded to 64 rows
])
def test_mosaic_lowers_for_cuda(force_mosaic, head_dim, num_q_heads, num_kv_heads, page_size,
                                soft_cap, window):
    """The Pallas-to-Mosaic-GPU lowering runs on a CPU (ptxas does not: that is the device
    check's): one Mosaic GPU call for decode, one for prefill, no Triton."""
    tokens, seqs, pages, max_pages = 512, 64, 4096, 256
    args = (spec((tokens, num_q_heads, head_dim), jnp.bfloat16),
            spec((pages, page_size, 2 * num_kv_heads, head_dim), jnp.bfloat16),
            spec((seqs,), jnp.int32), spec((seqs, max_pages), jnp.int32),
            spec((seqs + 1,), jnp.int32), spec((1,), jnp.int32))
    fn = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=0.1,
                           soft_cap=soft_cap, sliding_window=window, backend="gpu")
    with cuda_lowering_target():
        text = export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    assert text.count(MOSAIC_CALL) == 2 and text.count(TRITON_CALL) == 0


@pytest.mark.parametrize("kernel_for", [decode_kernel_for, prefill_kernel_for])
def test_kernel_choice(monkeypatch, kernel_for):
    q = spec((8, 8, 128), jnp.bfloat16)
    kv_pages = spec((32, 16, 4, 128), jnp.bfloat16)
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, "mosaic")
    assert kernel_for(q, kv_pages, None) == "mosaic"
    # What the Mosaic kernels decline runs on Triton, whatever the setting.
    assert kernel_for(spec(q.shape, jnp.float32), spec(kv_pages.shape, jnp.float32),
                      None) == "triton"
    assert kernel_for(q, spec(kv_pages.shape, jnp.float8_e4m3fn), None) == "triton"
    assert kernel_for(q, spec(kv_pages.shape, jnp.int8),
                      spec(kv_pages.shape[:3], jnp.float32)) == "triton"
    assert kernel_for(spec((8, 8, 256), jnp.bfloat16), spec((32, 16, 4, 256), jnp.bfloat16),
                      None) == "triton"
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, "triton")
    assert kernel_for(q, kv_pages, None) == "triton"
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, "cuda")
    with pytest.raises(ValueError, match="EMBER_GPU_KERNELS='cuda'"):
        kernel_for(q, kv_pages, None)


@pytest.mark.parametrize("kernel_for,flag", [(decode_kernel_for, "MOSAIC_DECODE_BY_DEFAULT"),
                                             (prefill_kernel_for, "MOSAIC_PREFILL_BY_DEFAULT")])
@pytest.mark.parametrize("capability", [None, 8.0, 9.0])
def test_auto_choice_needs_the_flag_and_hopper(monkeypatch, kernel_for, flag, capability):
    """"auto" runs Mosaic GPU only once its flag is set, and then only on compute >= 9.0."""
    q, kv_pages = spec((8, 8, 128), jnp.bfloat16), spec((32, 16, 4, 128), jnp.bfloat16)
    monkeypatch.delenv(GPU_KERNELS_VARIABLE, raising=False)
    monkeypatch.setattr(kernel_choice, "cuda_compute_capability", lambda: capability)
    for by_default in (False, True):
        monkeypatch.setattr(kernel_choice, flag, by_default)
        expected = "mosaic" if by_default and capability == 9.0 else "triton"
        assert kernel_for(q, kv_pages, None) == expected


@pytest.fixture
def jax_without_triton(monkeypatch):
    """This jax as a release without the Pallas Triton lowering: `pallas.triton` will not
    import (the name the lazy imports look up is gone too)."""
    from jax.experimental import pallas as pallas_package
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
    monkeypatch.delattr(pallas_package, "triton", raising=False)
    has_pallas_triton.cache_clear()
    yield
    has_pallas_triton.cache_clear()


def test_kernel_choice_without_triton(monkeypatch, jax_without_triton):
    assert not has_pallas_triton()
    q, kv_pages = spec((8, 8, 128), jnp.bfloat16), spec((32, 16, 4, 128), jnp.bfloat16)
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, "mosaic")
    assert decode_kernel_for(q, kv_pages, None) == prefill_kernel_for(q, kv_pages, None) == "mosaic"
    f32 = (spec(q.shape, jnp.float32), spec(kv_pages.shape, jnp.float32), None)
    assert decode_kernel_for(*f32) == prefill_kernel_for(*f32) == "reference"
    monkeypatch.delenv(GPU_KERNELS_VARIABLE)     # auto: Mosaic GPU on Hopper and newer
    for capability, expected in ((None, "reference"), (8.0, "reference"), (9.0, "mosaic")):
        monkeypatch.setattr(kernel_choice, "cuda_compute_capability", lambda: capability)
        assert decode_kernel_for(q, kv_pages, None) == expected
        assert prefill_kernel_for(q, kv_pages, None) == expected
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, "triton")
    with pytest.raises(ValueError, match="EMBER_GPU_KERNELS=triton: jax .* no Pallas Triton"):
        decode_kernel_for(q, kv_pages, None)


@pytest.mark.parametrize("kernels,dtype,mosaic_calls", [("mosaic", jnp.bfloat16, 2),
                                                        ("mosaic", jnp.float32, 0),
                                                        ("auto", jnp.bfloat16, 0)])
def test_a_jax_without_triton_still_runs_backend_gpu(monkeypatch, jax_without_triton, kernels,
                                                     dtype, mosaic_calls):
    """A step's three kernels lower for CUDA with no Triton call: attention on Mosaic GPU
    where it runs, else XLA's reference, as are sampling and the KV write."""
    monkeypatch.setenv(GPU_KERNELS_VARIABLE, kernels)
    tokens, seqs, heads, kv_heads, head_dim, page_size = 64, 8, 8, 2, 64, 16

    def step(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, k, v, slot_mapping,
             logits, keys):
        kv_pages = pallas_kernels.write_kv_pages(kv_pages, k, v, slot_mapping, backend="gpu")
        out = pallas_kernels.ragged_paged_attention(
            q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=0.125,
            backend="gpu")
        rows = logits.shape[0]
        ones, zeros = jnp.ones((rows,), jnp.float32), jnp.zeros((rows,), jnp.int32)
        return out, pallas_kernels.sample(logits, ones, zeros, ones, 0 * ones, keys,
                                          backend="gpu")

    args = (spec((tokens, heads, head_dim), dtype),
            spec((64, page_size, 2 * kv_heads, head_dim), dtype),
            spec((seqs,), jnp.int32), spec((seqs, 8), jnp.int32), spec((seqs + 1,), jnp.int32),
            spec((1,), jnp.int32), spec((tokens, kv_heads, head_dim), dtype),
            spec((tokens, kv_heads, head_dim), dtype), spec((tokens,), jnp.int32),
            spec((seqs, 1000), jnp.float32), spec((seqs, 2), jnp.uint32))
    with cuda_lowering_target():
        text = export.export(jax.jit(step), platforms=["cuda"])(*args).mlir_module()
    assert text.count(TRITON_CALL) == 0 and text.count(MOSAIC_CALL) == mosaic_calls
