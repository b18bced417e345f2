"""apply_token_bitmask: the jitted unpacking against the gather reference and the host's numpy
reference (engine/structured), on random masks, and a greedy draw that obeys the mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from engine.structured import allowed_token_ids, apply_bitmask
from pallas_kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_reference
from tests.pallas_kernels.common import row_keys


def random_case(seed: int, num_rows: int, vocab_size: int):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(num_rows, vocab_size)).astype(np.float32)
    width = -(-vocab_size // 32)
    # Sparse rows, like a grammar's: each bit set with probability 1/16, at least one token.
    bits = rng.random((num_rows, width * 32)) < 1 / 16
    bits[np.arange(num_rows), rng.integers(0, vocab_size, num_rows)] = True
    bitmask = np.packbits(bits, axis=1, bitorder="little").view(np.uint32)
    enabled = rng.random(num_rows) < 0.7
    return logits, bitmask, enabled


@pytest.mark.parametrize("num_rows, vocab_size", [(1, 32), (4, 77), (8, 1000), (3, 49152)])
def test_matches_references(num_rows, vocab_size):
    logits, bitmask, enabled = random_case(vocab_size, num_rows, vocab_size)
    expected = apply_bitmask(logits, bitmask, enabled)
    got = apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask), jnp.asarray(enabled))
    np.testing.assert_array_equal(np.asarray(got), expected)
    reference = apply_token_bitmask_reference(jnp.asarray(logits), jnp.asarray(bitmask),
                                              jnp.asarray(enabled))
    np.testing.assert_array_equal(np.asarray(reference), expected)


def test_keeps_the_dtype():
    logits, bitmask, enabled = random_case(1, 2, 100)
    got = apply_token_bitmask(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(bitmask),
                              jnp.asarray(enabled))
    assert got.dtype == jnp.bfloat16
    expected = apply_bitmask(logits.astype(jnp.bfloat16).astype(np.float32), bitmask, enabled)
    np.testing.assert_array_equal(np.asarray(got, np.float32), expected)


def test_sampled_tokens_are_allowed():
    """The masked logits through pallas_kernels.sample: every draw (greedy and random) is a
    token the row's mask allows."""
    logits, bitmask, _ = random_case(5, 8, 512)
    enabled = np.ones(8, bool)
    masked = apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask),
                                 jnp.asarray(enabled))
    for temperature in (0.0, 1.0):
        tokens, _ = jax.jit(pallas_kernels.sample)(
            masked, jnp.full(8, temperature), jnp.zeros(8, jnp.int32), jnp.ones(8),
            jnp.zeros(8), row_keys(3, 8))
        for row, token in enumerate(np.asarray(tokens)):
            assert token in allowed_token_ids(bitmask[row], 512)


@pytest.mark.parametrize("bitmask_shape, bitmask_dtype, enabled_shape, message", [
    ((2, 3), jnp.uint32, (2,), "bitmask.shape"),
    ((2, 4), jnp.int32, (2,), "bitmask.dtype"),
    ((2, 4), jnp.uint32, (3,), "enabled.shape"),
])
def test_rejects_mismatched_inputs(bitmask_shape, bitmask_dtype, enabled_shape, message):
    with pytest.raises(ValueError, match=message):
        apply_token_bitmask(jnp.zeros((2, 100)), jnp.zeros(bitmask_shape, bitmask_dtype),
                            jnp.zeros(enabled_shape, bool))
