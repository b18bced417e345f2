"""sample(): the reference's semantics against brute force, and the kernels against it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import pallas_kernels
from pallas_kernels.reference import sampling_threshold
from pallas_kernels.sampling_primitives import first_argmax, ordered_key
from tests.pallas_kernels.common import GPU_INTERPRET, row_keys


def allowed_tokens(logits, temperature, top_k, top_p, min_p, slack=1e-4):
    """bool[V]: the tokens a row may emit, by sorting in float64 (the way the kernels may not).

    slack widens top-p and min-p a little so float32 rounding at a boundary is not a failure.
    """
    x = np.asarray(logits, np.float64) / temperature
    vocab = x.shape[0]
    keep = np.ones(vocab, bool)
    descending = np.sort(x)[::-1]
    if 0 < top_k < vocab:
        keep &= x >= descending[top_k - 1]
    if top_p < 1:
        probs = np.where(keep, np.exp(x - x.max()), 0.0)
        probs /= probs.sum()
        sorted_probs = np.sort(probs)[::-1]
        mass_before = np.cumsum(sorted_probs) - sorted_probs
        last = np.max(np.nonzero(mass_before < top_p * (1 + slack))[0])
        keep &= probs >= sorted_probs[last] * (1 - slack)
    if min_p > 0:
        probs = np.exp(x - x.max())
        keep &= probs >= min_p * (1 - slack)
    return keep


def kept_distribution(logits, temperature, top_k, top_p, min_p):
    keep = allowed_tokens(logits, temperature, top_k, top_p, min_p, slack=0.0)
    x = np.asarray(logits, np.float64) / temperature
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    return probs / probs.sum()


@functools.cache
def jitted_sample(backend, interpret):
    return jax.jit(functools.partial(pallas_kernels.sample, backend=backend, interpret=interpret))


def run_sample(backend, interpret, logits, temperature, top_k, top_p, min_p, keys):
    fn = jitted_sample(backend, interpret)
    args = [jnp.asarray(a) for a in (logits, temperature, top_k, top_p, min_p, keys)]
    tokens, logprobs = fn(*args)
    return np.asarray(tokens), np.asarray(logprobs)


def random_params(rng, rows, vocab):
    temperature = rng.uniform(0.3, 1.5, rows).astype(np.float32)
    temperature[rng.random(rows) < 0.15] = 0.0
    top_k = rng.integers(-1, vocab + 2, rows).astype(np.int32)
    top_k[rng.random(rows) < 0.4] = 0
    top_p = rng.uniform(0.2, 1.0, rows).astype(np.float32)
    top_p[rng.random(rows) < 0.4] = 1.0
    min_p = rng.uniform(0.0, 0.3, rows).astype(np.float32)
    min_p[rng.random(rows) < 0.5] = 0.0
    return temperature, top_k, top_p, min_p


class TestSampleReference:
    BACKEND = "reference"
    INTERPRET = False

    def sample(self, *args):
        return run_sample(self.BACKEND, self.INTERPRET, *args)

    def test_greedy_is_argmax_and_logprob_of_raw_logits(self):
        rng = np.random.default_rng(1)
        rows, vocab = 8, 300
        logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
        zeros = np.zeros(rows, np.float32)
        top_k = rng.integers(1, 5, rows).astype(np.int32)
        tokens, logprobs = self.sample(logits, zeros, top_k, np.full(rows, 0.5, np.float32),
                                       np.full(rows, 0.1, np.float32), row_keys(3, rows))
        np.testing.assert_array_equal(tokens, logits.argmax(-1))
        expected = jax.nn.log_softmax(logits, axis=-1)[np.arange(rows), tokens]
        np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)

    def test_masks_never_emit_a_masked_token(self):
        rng = np.random.default_rng(2)
        rows, vocab = 48, 200
        scale = rng.uniform(0.5, 4, (rows, 1))
        logits = (rng.normal(size=(rows, vocab)) * scale).astype(np.float32)
        params = random_params(rng, rows, vocab)
        for seed in range(3):
            tokens, logprobs = self.sample(logits, *params, row_keys(seed, rows))
            for row in range(rows):
                t, k, p, m = (param[row] for param in params)
                allowed = allowed_tokens(logits[row], t if t > 0 else 1.0, k, p, m)
                if t == 0:
                    assert tokens[row] == logits[row].argmax()
                else:
                    assert allowed[tokens[row]], (row, t, k, p, m, tokens[row])
            tempered = logits / np.where(params[0] > 0, params[0], 1)[:, None]
            expected = jax.nn.log_softmax(tempered, axis=-1)[np.arange(rows), tokens]
            np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)

    def test_same_keys_same_draws_other_keys_other_draws(self):
        rng = np.random.default_rng(4)
        rows, vocab = 16, 500
        logits = rng.normal(size=(rows, vocab)).astype(np.float32)
        ones = np.ones(rows, np.float32)
        no_k = np.zeros(rows, np.int32)
        first = self.sample(logits, ones, no_k, ones, ones * 0, row_keys(7, rows))
        again = self.sample(logits, ones, no_k, ones, ones * 0, row_keys(7, rows))
        other = self.sample(logits, ones, no_k, ones, ones * 0, row_keys(8, rows))
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
        assert (first[0] != other[0]).sum() >= rows // 2

    @pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
        (1.0, 0, 1.0, 0.0),     # plain sampling
        (0.7, 6, 0.9, 0.0),     # top-k then top-p
        (1.3, 0, 0.8, 0.05),    # top-p then min-p
    ])
    def test_draws_follow_the_kept_distribution(self, temperature, top_k, top_p, min_p):
        rng = np.random.default_rng(5)
        vocab, draws = 12, 3000
        row = (rng.normal(size=vocab) * 1.5).astype(np.float32)
        logits = np.broadcast_to(row, (draws, vocab))
        full = lambda v, dt: np.full(draws, v, dt)
        tokens, _ = self.sample(logits, full(temperature, np.float32), full(top_k, np.int32),
                                full(top_p, np.float32), full(min_p, np.float32),
                                row_keys(11, draws))
        expected = kept_distribution(row, temperature, top_k, top_p, min_p)
        counts = np.bincount(tokens, minlength=vocab)
        assert counts[expected == 0].sum() == 0
        kept = expected > 0
        result = stats.chisquare(counts[kept], expected[kept] * draws)
        assert result.pvalue > 1e-3, (counts, expected * draws)


def test_ties_at_the_threshold_are_all_kept():
    tempered = jnp.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.5]], jnp.float32)
    threshold = sampling_threshold(tempered, jnp.array([2], jnp.int32),
                                   jnp.array([1.0], jnp.float32), jnp.array([0.0], jnp.float32))
    kept = np.asarray(ordered_key(tempered) >= threshold[:, None])[0]
    np.testing.assert_array_equal(kept, [True, True, True, True, False, False])


def test_first_argmax_is_argmax_with_ties_nan_and_infinities():
    # Few distinct values (ties everywhere), rows of -inf, NaN anywhere: the first index of
    # the largest value, of the first NaN in a row holding one, as jnp.argmax.
    rng = np.random.default_rng(21)
    for trial in range(50):
        x = rng.integers(-3, 3, (9, 40)).astype(np.float32)
        x[rng.random(x.shape) < 0.05] = -np.inf
        x[rng.random(x.shape) < 0.02 * (trial % 3)] = np.nan
        x[0], x[1, 7:] = -np.inf, np.inf
        np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))),
                                      np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))


def test_bad_shapes_and_dtypes_name_the_argument():
    logits = jnp.ones((4, 10), jnp.float32)
    good = dict(temperature=jnp.ones(4), top_k=jnp.zeros(4, jnp.int32), top_p=jnp.ones(4),
                min_p=jnp.zeros(4), keys=jnp.zeros((4, 2), jnp.uint32))
    with pytest.raises(ValueError, match=r"top_p.shape=\(3,\)"):
        pallas_kernels.sample(logits, **{**good, "top_p": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"top_k.dtype=float32"):
        pallas_kernels.sample(logits, **{**good, "top_k": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"backend='cuda'"):
        pallas_kernels.sample(logits, **good, backend="cuda")


class TestSampleGpuKernel(TestSampleReference):
    BACKEND = "gpu"
    INTERPRET = GPU_INTERPRET

    def test_kernel_draws_what_the_reference_draws(self):
        rng = np.random.default_rng(6)
        rows, vocab = 24, 700  # vocab not a multiple of any tile
        logits = (rng.normal(size=(rows, vocab)) * 2).astype(np.float32)
        params = random_params(rng, rows, vocab)
        keys = row_keys(12, rows)
        kernel = self.sample(logits, *params, keys)
        reference = run_sample("reference", False, logits, *params, keys)
        np.testing.assert_array_equal(kernel[0], reference[0])
        np.testing.assert_allclose(kernel[1], reference[1], rtol=1e-5, atol=1e-5)
