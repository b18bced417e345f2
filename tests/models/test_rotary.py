"""The rotary angles' table (models/transformer.py: rotary_table), which the engine's step
reads instead of computing cos and sin in the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.checkpoint import load_config
from models.transformer import Rotation, inverse_frequencies, rotary_table
from tests.hf_models import ARCHITECTURES
from tests.pallas_kernels.test_cpu_dense_matmul import compiled_forward_text


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_table_rows_are_the_angles_of_their_positions(hf_model_dirs, kind):
    config = load_config(hf_model_dirs[kind])
    positions = np.random.default_rng(len(kind)).integers(0, 300, size=(37,)).astype(np.int32)
    table = jax.jit(rotary_table, static_argnums=(0, 1))(config, 300)
    read = jax.jit(Rotation.at)(table, positions)
    computed = jax.jit(Rotation.of)(positions, inverse_frequencies(config))
    assert read.cos.shape == computed.cos.shape == (37, 1, config.head_dim // 2)
    np.testing.assert_allclose(read.cos, computed.cos, rtol=0, atol=1e-6)
    np.testing.assert_allclose(read.sin, computed.sin, rtol=0, atol=1e-6)
    # float64 angles of the float32 products: the table is as exact as the step's own were
    angles = positions[:, None].astype(np.float32) * np.asarray(inverse_frequencies(config))
    np.testing.assert_allclose(read.cos[:, 0], np.cos(angles.astype(np.float64)), atol=2e-6)


def test_positions_past_the_table_read_its_last_row():
    table = Rotation(jnp.arange(4.0)[:, None, None], -jnp.arange(4.0)[:, None, None])
    read = table.at(jnp.asarray([0, 3, 4, 99, -1], jnp.int32))
    np.testing.assert_array_equal(read.cos[:, 0, 0], [0, 3, 3, 3, 0])
    np.testing.assert_array_equal(read.sin[:, 0, 0], [0, -3, -3, -3, 0])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_engines_forward_computes_no_sine_or_cosine(hf_model_dirs, scan_layers):
    # XLA fused the step's cos and sin into each head's rotation of q and k, once per layer.
    text = compiled_forward_text(hf_model_dirs["llama"], scan_layers=scan_layers,
                                 backend="reference", optimized=True)
    assert " cosine(" not in text and " sine(" not in text
    assert " gather(" in text or "dynamic-slice" in text   # the table's rows, read
