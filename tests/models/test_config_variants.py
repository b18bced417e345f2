"""config.json variants read as transformers reads them: each either runs the model
transformers runs (the same logits) or is refused naming what Ember cannot run; a layer
tensor the model has no place for is refused, never dropped."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from models.assembly import CheckpointError
from models.checkpoint import load_model
from tests.hf_models import build_hf_model, load_hf_model

QWEN_WINDOW = dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)


def edit_config(model_dir, drop=(), **fields):
    path = model_dir / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**config, **fields}))


def assert_logits_match(model_dir):
    ids = np.random.default_rng(7).integers(3, 256, size=(2, 40))
    with torch.no_grad():
        expected = load_hf_model(model_dir)(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(model_dir).forward_dense(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


# (name, architecture, build overrides, config.json edits after saving: (dropped keys,
# added fields)). Each was once misread: Gemma's q/k/v/o biases dropped, a Llama file's
# stray sliding_window applied, Gemma's own defaults (tied head, tanh GeLU) taken as
# Llama's, Qwen's layer_types ignored.
MATCHING = [
    ("gemma-attention-bias", "gemma", dict(attention_bias=True), ((), {})),
    ("llama-stray-sliding-window", "llama", {}, ((), {"sliding_window": 4})),
    ("gemma-defaults", "gemma", {}, (("tie_word_embeddings", "hidden_act",
                                      "hidden_activation"), {})),
    ("qwen2-layer-types-all-sliding", "qwen2",
     dict(QWEN_WINDOW, layer_types=["sliding_attention"] * 2), ((), {})),
    ("qwen3-layer-types-all-full", "qwen3",
     dict(QWEN_WINDOW, layer_types=["full_attention"] * 2), ((), {})),
]


@pytest.mark.parametrize("name,kind,overrides,edits", MATCHING, ids=[m[0] for m in MATCHING])
def test_a_variant_runs_as_transformers_runs_it(name, kind, overrides, edits, tmp_path):
    model_dir = build_hf_model(kind, tmp_path / name, **overrides)
    dropped, added = edits
    edit_config(model_dir, drop=dropped, **added)
    assert_logits_match(model_dir)


def test_a_window_on_some_layers_only_is_refused_by_name(tmp_path):
    model_dir = build_hf_model("qwen2", tmp_path / "mixed",
                               **QWEN_WINDOW, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match=r"layer_types=\['full_attention', 'sliding_attention'\]"
                                         ".*only some layers"):
        load_model(model_dir)


def test_a_layer_tensor_the_model_has_no_place_for_is_refused(tmp_path):
    model_dir = build_hf_model("llama", tmp_path / "extra-bias")
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.q_proj.bias"] = np.ones(64, np.float32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias is "
                                              "not a weight of the model"):
        load_model(model_dir)
