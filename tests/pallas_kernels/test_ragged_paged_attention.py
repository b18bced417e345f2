"""ragged_paged_attention and write_kv_pages: the reference against dense attention, and
every kernel against the reference on random ragged batches with NaN in every unused slot."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from tests.pallas_kernels.common import GPU_INTERPRET, NATIVE_GPU, TPU_INTERPRET
from tests.pallas_kernels.ragged_batches import dense_attention, random_batch

TOLERANCE = {jnp.float32: dict(atol=3e-5, rtol=3e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}



class Case(NamedTuple):
    q_lens: list            # new rows per live sequence
    cached: list            # cached tokens before them
    page_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: type
    soft_cap: float | None
    window: int | None


CASES = {
    "decode-page16-gqa4-f32": Case([1, 1, 1, 1], [37, 5, 300, 130], 16, 8, 2, 128,
                                   jnp.float32, None, None),
    "decode-page32-gqa8-bf16-cap-window": Case([1, 1, 1], [70, 1, 200], 32, 8, 1, 64,
                                               jnp.bfloat16, 30.0, 45),
    # Chunks after a long cached prefix: some KV tiles need no causal mask.
    "prefill-page64-mha-f32-cap": Case([19, 7, 33], [130, 0, 70], 64, 2, 2, 64,
                                       jnp.float32, 20.0, None),
    "prefill-page16-gqa8-bf16-window": Case([21, 40], [200, 9], 16, 8, 1, 128,
                                            jnp.bfloat16, None, 100),
    "mixed-page32-gqa4-d256-bf16-cap": Case([1, 1, 13, 26], [50, 3, 17, 40], 32, 8, 2, 256,
                                            jnp.bfloat16, 50.0, None),
    "mixed-page64-mha-f32-window": Case([1, 17, 2, 30], [61, 0, 33, 5], 64, 2, 2, 64,
                                        jnp.float32, None, 30),
    "mixed-page16-gqa3-f32": Case([1, 9, 1], [20, 11, 90], 16, 6, 2, 64,
                                  jnp.float32, None, None),
}


@functools.cache
def jitted_attention(backend, interpret, sm_scale, sliding_window, soft_cap):
    return jax.jit(functools.partial(
        pallas_kernels.ragged_paged_attention, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap, backend=backend, interpret=interpret))


def make_batch(seed, case: Case, dtype=None):
    return random_batch(np.random.default_rng(seed), case.q_lens, case.cached,
                        page_size=case.page_size, num_q_heads=case.num_q_heads,
                        num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                        dtype=dtype or case.dtype)


def options_for(case: Case):
    return dict(sm_scale=case.head_dim ** -0.5, sliding_window=case.window,
                soft_cap=case.soft_cap)


class TestReferenceAttention:
    @pytest.mark.parametrize("name", ["decode-page16-gqa4-f32", "prefill-page16-gqa8-bf16-window",
                                      "mixed-page32-gqa4-d256-bf16-cap"])
    def test_reference_matches_dense_causal_attention(self, name):
        batch = make_batch(0, CASES[name], jnp.float32)
        options = options_for(CASES[name])
        out = jitted_attention("reference", False, **options)(*batch.args())
        np.testing.assert_allclose(np.asarray(out), dense_attention(batch, **options),
                                   atol=1e-5, rtol=1e-5)


class TestGpuAttention:
    BACKEND = "gpu"
    INTERPRET = GPU_INTERPRET

    @pytest.mark.parametrize("name", list(CASES))
    def test_kernel_matches_reference(self, name):
        case = CASES[name]
        batch = make_batch(1, case)
        options = options_for(case)
        out = jitted_attention(self.BACKEND, self.INTERPRET, **options)(*batch.args())
        expected = jitted_attention("reference", False, **options)(*batch.args())
        assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
        out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
        assert not np.isnan(out).any(), "the kernel read a slot it does not own"
        live_rows = int(np.sum(case.q_lens))
        np.testing.assert_array_equal(out[live_rows:], 0.0)                # padding rows
        np.testing.assert_allclose(out, expected, **TOLERANCE[case.dtype])

    @pytest.mark.skipif(not NATIVE_GPU, reason="long contexts only natively on a GPU")
    def test_long_context_decode_and_prefill(self):
        batch = make_batch(2, Case([1] * 6 + [300, 129], [4000, 17, 2500, 999, 64, 8191, 700, 1500],
                                   16, 32, 8, 128, jnp.bfloat16, None, None))
        options = dict(sm_scale=128 ** -0.5, sliding_window=None, soft_cap=None)
        out = jitted_attention(self.BACKEND, self.INTERPRET, **options)(*batch.args())
        expected = jitted_attention("reference", False, **options)(*batch.args())
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                                   **TOLERANCE[jnp.bfloat16])

    def test_write_kv_pages_matches_reference(self):
        rng = np.random.default_rng(3)
        num_pages, page_size, num_kv_heads, head_dim, tokens = 7, 16, 2, 64, 37
        kv_pages = jnp.asarray(rng.normal(size=(num_pages, page_size, 2 * num_kv_heads, head_dim)),
                               jnp.bfloat16)
        k, v = (jnp.asarray(rng.normal(size=(tokens, num_kv_heads, head_dim)), jnp.bfloat16)
                for _ in range(2))
        live_slots = rng.permutation(np.arange(page_size, num_pages * page_size))[:tokens - 5]
        slots = jnp.asarray(np.concatenate([live_slots, np.zeros(5, int)]), jnp.int32)
        write = functools.partial(pallas_kernels.write_kv_pages, kv_pages, k, v, slots)
        expected = np.asarray(jax.jit(functools.partial(write, backend="reference"))(), np.float32)
        out = np.asarray(jax.jit(functools.partial(write, backend=self.BACKEND,
                                                   interpret=self.INTERPRET))(), np.float32)
        np.testing.assert_array_equal(out[1:], expected[1:])  # page 0 takes racing padding rows


@pytest.mark.skipif(NATIVE_GPU, reason="TPU interpret mode is for CPU runs")
class TestTpuAttention(TestGpuAttention):
    BACKEND = "tpu"
    INTERPRET = TPU_INTERPRET


ON_CPU = jax.default_backend() == "cpu"


@pytest.mark.skipif(not ON_CPU, reason="the C++ kernel is registered for the CPU only")
class TestCpuAttention(TestGpuAttention):
    """The C++ kernel (pallas_kernels/cpu): built on first use, the CPU's "auto"."""
    BACKEND = "cpu"
    INTERPRET = False

    def test_long_context_decode_and_prefill(self):   # fast enough here, unlike interpret mode
        TestGpuAttention.test_long_context_decode_and_prefill(self)

    def test_auto_is_the_kernel_on_the_cpu(self):
        assert pallas_kernels.resolve_backend("auto") == "cpu"

    @pytest.mark.parametrize("num_seqs", [1, 2, 9])
    def test_float16_and_few_sequences_split_over_heads(self, num_seqs):
        # One or two sequences are cut by kv head across threads; nine are not.
        rng = np.random.default_rng(num_seqs)
        case = Case([1] * (num_seqs - 1) + [5], list(rng.integers(1, 400, num_seqs)), 16, 12, 4,
                    64, jnp.float16, None, 50)
        batch = make_batch(7, case)
        options = options_for(case)
        out = jitted_attention("cpu", False, **options)(*batch.args())
        expected = jitted_attention("reference", False, **options)(*batch.args())
        assert out.dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                                   atol=2e-3, rtol=2e-3)

    def test_bad_page_table_and_lengths_read_nothing_outside_the_cache(self):
        # A page-table entry outside the cache, and a context longer than the page table,
        # must neither crash nor touch another sequence's rows.
        case = CASES["mixed-page16-gqa3-f32"]
        batch = make_batch(8, case)
        options = options_for(case)
        expected = np.asarray(jitted_attention("reference", False, **options)(*batch.args()))
        page_indices = np.asarray(batch.page_indices).copy()
        page_indices[0, 0], page_indices[0, 1] = 10 ** 6, -7
        kv_lens = np.asarray(batch.kv_lens).copy()
        kv_lens[1] = page_indices.shape[1] * case.page_size + 1000
        args = list(batch.args())
        args[2], args[3] = jnp.asarray(kv_lens), jnp.asarray(page_indices)
        out = np.asarray(jitted_attention("cpu", False, **options)(*args))
        third = slice(int(np.sum(case.q_lens[:2])), int(np.sum(case.q_lens)))
        np.testing.assert_allclose(out[third], expected[third], **TOLERANCE[case.dtype])
        np.testing.assert_array_equal(out[int(np.sum(case.q_lens)):], 0.0)

    @pytest.mark.parametrize("head_dim,page_size,soft_cap,window", [
        (16, 8, None, None), (32, 24, 30.0, 20), (48, 16, None, 9), (80, 40, 25.0, None),
        (96, 16, None, None), (40, 16, 30.0, 20), (40, 24, None, None)])
    def test_every_head_size_and_page_size(self, head_dim, page_size, soft_cap, window):
        # Head sizes of 16 to 256 in steps of 16 take the kernel's vector path, 16 keys at a
        # time (a page of 8, or the 8 left of a page of 24 or 40, fill a part of those 16);
        # any other head size (40) takes its any-size path.
        case = Case([1, 1, 13, 26, 1], [50, 3, 17, 40, 95], page_size, 6, 2, head_dim,
                    jnp.float32, soft_cap, window)
        batch = make_batch(9, case)
        options = options_for(case)
        out = np.asarray(jitted_attention("cpu", False, **options)(*batch.args()))
        expected = np.asarray(jitted_attention("reference", False, **options)(*batch.args()))
        assert not np.isnan(out).any(), "the kernel read a slot it does not own"
        np.testing.assert_allclose(out, expected, **TOLERANCE[case.dtype])


def test_bad_attention_arguments_name_the_argument():
    batch = make_batch(4, Case([1, 5], [10, 0], 16, 4, 2, 64, jnp.float32, None, None))
    args = list(batch.args())
    with pytest.raises(ValueError, match=r"kv_lens.dtype=float32"):
        pallas_kernels.ragged_paged_attention(*args[:2], args[2].astype(jnp.float32), *args[3:],
                                              sm_scale=0.1)
    with pytest.raises(ValueError, match=r"cu_q_lens.shape=\(2,\)"):
        pallas_kernels.ragged_paged_attention(*args[:4], args[4][:2], args[5], sm_scale=0.1)
    with pytest.raises(ValueError, match=r"num_q_heads a multiple of num_kv_heads"):
        pallas_kernels.ragged_paged_attention(args[0][:, :3], *args[1:], sm_scale=0.1)
    with pytest.raises(ValueError, match=r"slot_mapping.shape=\(3,\)"):
        k = jnp.ones((4, 2, 64))
        pallas_kernels.write_kv_pages(args[1], k, k, jnp.zeros(3, jnp.int32))
