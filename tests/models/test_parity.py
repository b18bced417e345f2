"""Ember's forward pass equals transformers' on the same random-weight checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.checkpoint import load_model
from tests.hf_models import ARCHITECTURES, load_hf_model


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_dense_logits_match_transformers(kind, hf_model_dirs):
    model_dir = hf_model_dirs[kind]
    ids = np.random.default_rng(7).integers(3, 256, size=(2, 40))
    with torch.no_grad():
        expected = load_hf_model(model_dir)(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(model_dir).forward_dense(jnp.asarray(ids)))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours, expected, atol=1e-4 * scale, rtol=0)
