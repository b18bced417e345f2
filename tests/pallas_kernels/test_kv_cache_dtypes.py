"""KV caches in bf16, fp8 (e4m3fn) and int8 (with kv_scales) under f32 and bf16 queries:
written and read by every backend, checked against the reference, the dequantized values and
the unquantized float K/V.

Unused slots stay poisoned: a float cache keeps the batch's NaN, an 8-bit cache's NaN rows
quantize to NaN scales, so a kernel that reads a slot it does not own returns NaN.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.kv_cache import dequantize, is_quantized, quantize, to_float_cache
from tests.pallas_kernels.common import GPU_INTERPRET, NATIVE_GPU, TPU_INTERPRET
from tests.pallas_kernels.ragged_batches import dense_attention
from tests.pallas_kernels.test_ragged_paged_attention import (TOLERANCE, Case, jitted_attention,
                                                              make_batch, options_for)

KV_DTYPES = ("bfloat16", "float8_e4m3fn", "int8")
# The most a written value moves: relative to itself for the floats (bf16 keeps 8 significant
# bits, e4m3 4: rounding is off by at most 2^-8, 2^-4; fp8 rows are scaled onto e4m3's range
# first), relative to its row's max|x| for int8 (127 steps; off by at most half a step).
# Attention over the cache stays within 2 * ROUNDING * max|K, V| of attention over the float
# K/V (measured on these cases and others: bf16 <= 0.25, fp8 <= 0.3, int8 <= 0.55 of that
# bound).
ROUNDING = {"bfloat16": 2.0 ** -8, "float8_e4m3fn": 2.0 ** -4, "int8": 1 / 254}
# Tiny shapes: interpret mode is slow. Decode and prefill rows in each; bf16 q with cap and
# window in the second.
CASES = {
    "mixed-page16-gqa2-f32": Case([1, 9, 1], [20, 11, 40], 16, 4, 2, 64,
                                  jnp.float32, None, None),
    "mixed-page16-gqa4-bf16-cap-window": Case([1, 17, 2], [45, 5, 30], 16, 8, 2, 64,
                                              jnp.bfloat16, 30.0, 24),
}


def quantized_cache(kv_pages, kv_dtype):
    """(kv_pages in kv_dtype, kv_scales or None) holding the f32 kv_pages' values."""
    if is_quantized(kv_dtype):
        return quantize(kv_pages.astype(jnp.float32), kv_dtype)
    return to_float_cache(kv_pages, kv_dtype), None


def attention(backend, interpret, case, batch, kv_pages, kv_scales):
    return jitted_attention(backend, interpret, **options_for(case))(
        batch.q, kv_pages, *batch.args()[2:], kv_scales=kv_scales)


@functools.cache
def jitted_write(backend, interpret):
    return jax.jit(functools.partial(pallas_kernels.write_kv_pages, backend=backend,
                                     interpret=interpret))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_reference_reads_the_dequantized_values_close_to_float(name, kv_dtype):
    case = CASES[name]
    batch = make_batch(5, case)
    kv_pages, kv_scales = quantized_cache(batch.kv_pages, kv_dtype)
    out = attention("reference", False, case, batch, kv_pages, kv_scales)
    same_values = attention("reference", False, case, batch, dequantize(kv_pages, kv_scales), None)
    out, same_values = np.asarray(out, np.float32), np.asarray(same_values, np.float32)
    np.testing.assert_allclose(out, same_values, atol=1e-6, rtol=1e-6)
    live_rows = int(np.sum(case.q_lens))
    exact = dense_attention(batch, **options_for(case))[:live_rows]    # float64, from q's dtype
    largest = np.nanmax(np.abs(np.asarray(batch.kv_pages, np.float32)))
    rounding = np.abs(exact).max() * float(jnp.finfo(case.dtype).eps)  # the output's own
    np.testing.assert_allclose(out[:live_rows], exact,
                               atol=2 * ROUNDING[kv_dtype] * largest + rounding, rtol=0)


class TestGpuKvDtypes:
    BACKEND = "gpu"
    INTERPRET = GPU_INTERPRET

    # A bf16 cache under bf16 q is test_ragged_paged_attention's; under f32 q it is widened.
    @pytest.mark.parametrize("name,kv_dtype", [
        (name, kv_dtype) for name in CASES for kv_dtype in KV_DTYPES
        if (kv_dtype, CASES[name].dtype) != ("bfloat16", jnp.bfloat16)])
    def test_kernel_matches_reference(self, name, kv_dtype):
        case = CASES[name]
        batch = make_batch(6, case)
        kv_pages, kv_scales = quantized_cache(batch.kv_pages, kv_dtype)
        out = attention(self.BACKEND, self.INTERPRET, case, batch, kv_pages, kv_scales)
        expected = attention("reference", False, case, batch, kv_pages, kv_scales)
        assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
        out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
        assert not np.isnan(out).any(), "the kernel read a slot it does not own"
        np.testing.assert_array_equal(out[int(np.sum(case.q_lens)):], 0.0)  # padding rows
        np.testing.assert_allclose(out, expected, **TOLERANCE[case.dtype])

    @pytest.mark.parametrize("kv_dtype", KV_DTYPES)
    def test_write_matches_reference_and_leaves_other_slots(self, kv_dtype):
        rng = np.random.default_rng(7)
        num_pages, page_size, num_kv_heads, head_dim, tokens = 5, 16, 2, 64, 21
        old = rng.normal(size=(num_pages, page_size, 2 * num_kv_heads, head_dim))
        kv_pages, kv_scales = quantized_cache(jnp.asarray(old, jnp.float32), kv_dtype)
        k, v = (jnp.asarray(rng.normal(size=(tokens, num_kv_heads, head_dim)) * 100,
                            jnp.bfloat16) for _ in range(2))
        live_slots = rng.permutation(np.arange(page_size, num_pages * page_size))[:tokens - 4]
        slots = jnp.asarray(np.concatenate([live_slots, np.zeros(4, int)]), jnp.int32)
        scales = {} if kv_scales is None else dict(kv_scales=kv_scales)
        expected = jitted_write("reference", False)(kv_pages, k, v, slots, **scales)
        out = jitted_write(self.BACKEND, self.INTERPRET)(kv_pages, k, v, slots, **scales)
        out, expected = (x if isinstance(x, tuple) else (x,) for x in (out, expected))
        # Page 0 takes the racing padding rows. Elsewhere the kernel writes what the reference
        # writes, except that on a native GPU an int8 value at a .5 tie may round the other
        # way (Triton's f32 division is not IEEE-exact).
        pages, want = (np.asarray(x[0][1:], np.float32) for x in (out, expected))
        if NATIVE_GPU and kv_scales is not None:
            assert np.abs(pages - want).max() <= 1
        else:
            np.testing.assert_array_equal(pages, want)
        if kv_scales is not None:
            np.testing.assert_array_equal(np.asarray(out[1])[1:], np.asarray(expected[1])[1:])
        untouched = np.ones(num_pages * page_size, bool)
        untouched[np.asarray(slots)] = False
        untouched = untouched.reshape(num_pages, page_size)
        untouched[0] = False
        for written, before in zip(out, (kv_pages, kv_scales)):
            np.testing.assert_array_equal(np.asarray(written, np.float32)[untouched],
                                          np.asarray(before, np.float32)[untouched])

    @pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "int8"])
    def test_write_then_attend_is_close_to_float_attention(self, kv_dtype):
        """A prefill writes every token of two sequences through this backend's write, then
        attends through its attention."""
        case = Case([19, 6], [0, 0], 16, 4, 2, 64, jnp.float32, None, None)
        batch = make_batch(8, case)
        num_pages, page_size, two_kv_heads, head_dim = batch.kv_pages.shape
        cu_q_lens, page_indices = np.asarray(batch.cu_q_lens), np.asarray(batch.page_indices)
        slots = np.zeros(batch.q.shape[0], np.int32)               # padding rows: page 0
        for s, q_len in enumerate(case.q_lens):
            positions = np.arange(q_len)
            slots[cu_q_lens[s]:cu_q_lens[s] + q_len] = (
                page_indices[s, positions // page_size] * page_size + positions % page_size)
        kv_rows = batch.kv_pages.reshape(-1, two_kv_heads, head_dim)[slots]  # padding: NaN
        k, v = kv_rows[:, 0::2], kv_rows[:, 1::2]                  # [T, Hkv, D]
        if is_quantized(kv_dtype):  # NaN scales poison every slot not written
            empty = (jnp.zeros(batch.kv_pages.shape, kv_dtype),
                     jnp.full((num_pages, page_size, two_kv_heads), np.nan, jnp.float32))
            kv_pages, kv_scales = jitted_write(self.BACKEND, self.INTERPRET)(
                empty[0], k, v, jnp.asarray(slots), kv_scales=empty[1])
        else:
            empty = jnp.full(batch.kv_pages.shape, np.nan, kv_dtype)
            kv_pages = jitted_write(self.BACKEND, self.INTERPRET)(empty, k, v, jnp.asarray(slots))
            kv_scales = None
        out = np.asarray(attention(self.BACKEND, self.INTERPRET, case, batch, kv_pages,
                                   kv_scales))
        live_rows = sum(case.q_lens)
        exact = dense_attention(batch, **options_for(case))
        largest = float(jnp.abs(kv_rows[:live_rows]).max())
        assert not np.isnan(out).any(), "the kernel read a slot it does not own"
        np.testing.assert_allclose(out[:live_rows], exact[:live_rows],
                                   atol=2 * ROUNDING[kv_dtype] * largest, rtol=0)


@pytest.mark.skipif(NATIVE_GPU, reason="TPU interpret mode is for CPU runs")
class TestTpuKvDtypes(TestGpuKvDtypes):
    BACKEND = "tpu"
    INTERPRET = TPU_INTERPRET


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernel is for the CPU")
class TestCpuKvDtypes(TestGpuKvDtypes):
    BACKEND = "cpu"
    INTERPRET = False


class TestWriteRoundTrip:
    """What a written row reads back as, per cache dtype (reference write)."""

    def write_and_read(self, kv_dtype, k, v):
        num_kv_heads, head_dim = k.shape[1:]
        kv_pages = jnp.zeros((3, 16, 2 * num_kv_heads, head_dim), kv_dtype)
        slots = jnp.arange(16, 16 + k.shape[0], dtype=jnp.int32)
        if not is_quantized(kv_dtype):
            written = pallas_kernels.write_kv_pages(kv_pages, k, v, slots, backend="reference")
            return np.asarray(dequantize(written)).reshape(48, -1, head_dim)[16:16 + k.shape[0]]
        scales = jnp.zeros(kv_pages.shape[:3], jnp.float32)
        written, scales = pallas_kernels.write_kv_pages(kv_pages, k, v, slots, kv_scales=scales,
                                                        backend="reference")
        stored = np.asarray(scales).reshape(48, -1)[16:16 + k.shape[0]]
        rows = np.asarray(jnp.stack([k, v], 2), np.float32).reshape(k.shape[0], -1, head_dim)
        largest = 127 if kv_dtype == "int8" else 448   # the row's max lands on the top value
        np.testing.assert_allclose(stored, np.abs(rows).max(-1) / largest, rtol=1e-6)
        return np.asarray(dequantize(written, scales)).reshape(48, -1, head_dim)[16:16 + k.shape[0]]

    def rows(self, seed, scale=1.0):
        rng = np.random.default_rng(seed)
        k, v = (jnp.asarray(rng.normal(size=(20, 2, 64)) * scale, jnp.float32) for _ in range(2))
        return k, v, np.asarray(jnp.stack([k, v], 2)).reshape(20, 4, 64)

    @pytest.mark.parametrize("kv_dtype", KV_DTYPES)
    def test_error_within_rounding(self, kv_dtype):
        k, v, rows = self.rows(9)
        read = self.write_and_read(kv_dtype, k, v)
        assert np.all(np.abs(read - rows) <= self.bound(kv_dtype, rows))

    @staticmethod
    def bound(kv_dtype, rows):
        if kv_dtype == "int8":
            return np.abs(rows).max(-1, keepdims=True) * ROUNDING["int8"] * (1 + 1e-5)
        if kv_dtype == "float8_e4m3fn":   # scaled onto e4m3's range, whose subnormals (below
            scale = np.abs(rows).max(-1, keepdims=True) / 448   # 2^-6) are 2^-9 apart
            return (np.abs(rows) * ROUNDING[kv_dtype] + 2.0 ** -10 * scale) * (1 + 1e-5)
        return np.abs(rows) * ROUNDING[kv_dtype]

    @pytest.mark.parametrize("magnitude", [1e-3, 400.0])
    def test_fp8_rows_keep_their_precision_at_any_magnitude(self, magnitude):
        # Unscaled, rows of 1e-3 would all be e4m3 subnormals and rows of 400 would saturate.
        k, v, rows = self.rows(10, scale=magnitude)
        read = self.write_and_read("float8_e4m3fn", k, v)
        assert not np.isnan(read).any()
        assert np.all(np.abs(read - rows) <= self.bound("float8_e4m3fn", rows))

    def test_fp8_cast_saturates_instead_of_nan(self):
        values = jnp.asarray([500.0, -1000.0, 3.0])
        np.testing.assert_array_equal(np.asarray(to_float_cache(values, jnp.float8_e4m3fn),
                                                 np.float32), [448.0, -448.0, 3.0])

    @pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
    def test_zero_row_reads_zero(self, kv_dtype):
        k, v, _ = self.rows(11)
        read = self.write_and_read(kv_dtype, k.at[3].set(0.0), v)
        np.testing.assert_array_equal(read[3, 0::2], 0.0)


def test_cache_sizes_and_dtype_names():
    bytes_per_token = pallas_kernels.kv_cache_bytes_per_token
    assert bytes_per_token(8, 128, jnp.bfloat16) == 2 * 8 * 128 * 2
    assert bytes_per_token(8, 128, jnp.float8_e4m3fn) == 2 * 8 * (128 + 4)
    assert bytes_per_token(8, 128, jnp.int8) == 2 * 8 * (128 + 4)       # + one f32 scale a row
    assert pallas_kernels.KV_CACHE_DTYPES == ("auto", "bfloat16", "float8_e4m3fn", "int8")
    resolve = pallas_kernels.resolve_kv_cache_dtype
    assert resolve("auto", jnp.float32) == jnp.float32
    assert resolve("int8", jnp.bfloat16) == jnp.int8
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4': expected one of"):
        resolve("fp4", jnp.bfloat16)


def test_bad_cache_arguments_name_the_argument():
    batch = make_batch(12, Case([1, 5], [10, 0], 16, 4, 2, 64, jnp.float32, None, None))
    q, kv_pages, *metadata = batch.args()
    int8_pages, scales = quantize(kv_pages, jnp.int8)
    attend = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=0.1)
    with pytest.raises(ValueError, match=r"kv_scales=None with kv_pages.dtype=int8"):
        attend(q, int8_pages, *metadata)
    with pytest.raises(ValueError, match=r"kv_scales given with kv_pages.dtype=float32"):
        attend(q, kv_pages, *metadata, kv_scales=scales)
    with pytest.raises(ValueError, match=r"kv_scales.shape=\(.*\): expected"):
        attend(q, int8_pages, *metadata, kv_scales=scales[:, :, :2])
    with pytest.raises(ValueError, match=r"kv_scales.dtype=bfloat16: expected float32"):
        attend(q, int8_pages, *metadata, kv_scales=scales.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"kv_pages.dtype=float8_e5m2: expected float32, "):
        attend(q, kv_pages.astype(jnp.float8_e5m2), *metadata)
    k = jnp.ones((3, 2, 64))
    slots = jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match=r"kv_scales=None with kv_pages.dtype=int8"):
        pallas_kernels.write_kv_pages(int8_pages, k, k, slots)
    with pytest.raises(ValueError, match=r"kv_scales given with kv_pages.dtype=bfloat16"):
        pallas_kernels.write_kv_pages(kv_pages.astype(jnp.bfloat16), k, k, slots,
                                      kv_scales=scales)
