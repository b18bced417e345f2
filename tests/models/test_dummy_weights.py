"""load_format="dummy": a directory with only config.json and a tokenizer loads random weights
of the right shapes and dtypes (float, int8, int4), gives finite logits, and serves
LLM.generate; a bad value is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine import LLM, EngineConfig, SamplingParams
from models import CheckpointError, load_model
from models.assembly import abstract_model
from models.checkpoint import load_config
from models.quantization import dequantize
from tests.hf_models import TINY, save_byte_tokenizer

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=64,
             max_model_len=64, warmup=False, compilation_cache_dir="")


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """config.json (a Llama of TINY's sizes, vocabulary larger than the tokenizer's) and a
    byte tokenizer: no weight file."""
    model_dir = tmp_path_factory.mktemp("dummy")
    hf_config = {**TINY, "vocab_size": 512, "architectures": ["LlamaForCausalLM"],
                 "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "tie_word_embeddings": False}
    (model_dir / "config.json").write_text(json.dumps(hf_config))
    save_byte_tokenizer(model_dir)
    return model_dir


def _params(model) -> dict[tuple, jax.Array]:
    return {path: variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _finite_logits(model) -> np.ndarray:
    ids = np.random.default_rng(1).integers(3, 259, size=(2, 12))
    logits = np.asarray(model.forward_dense(jnp.asarray(ids)), np.float32)
    assert np.isfinite(logits).all()
    return logits


@pytest.mark.parametrize("scan_layers", [True, False])
def test_dummy_weights_have_the_checkpoints_shapes_and_dtypes(config_only, scan_layers):
    model = load_model(config_only, dtype="bfloat16", scan_layers=scan_layers,
                       load_format="dummy")
    _, expected = abstract_model(load_config(config_only, "bfloat16", scan_layers=scan_layers))
    expected = {path: variable.get_value() for path, variable in nnx.to_flat_state(expected)}
    params = _params(model)
    assert params.keys() == expected.keys()
    for path, array in params.items():
        assert (array.shape, array.dtype) == (expected[path].shape, expected[path].dtype), path
        values = np.asarray(array, np.float32)
        if "norm" in str(path[-2]):
            np.testing.assert_array_equal(values, 1.0)
        else:   # random, small: a std near 0.02, every element finite
            assert np.isfinite(values).all() and 0.015 < values.std() < 0.025, path
    logits = _finite_logits(model)
    assert logits.std() > 0.01   # the tokens differ from one another


@pytest.mark.parametrize("quantization, dtype", [("int8", jnp.int8), ("int4", jnp.uint8)])
def test_dummy_quantized_weights_hold_integers(config_only, quantization, dtype):
    model = load_model(config_only, dtype="bfloat16", quantization=quantization,
                       load_format="dummy")
    layer = model.model.layers
    weight = layer.mlp.up_proj.quantized_weight
    integers = weight.q if quantization == "int8" else weight.packed
    assert integers.dtype == dtype and len(np.unique(np.asarray(integers))) > 100
    values = np.asarray(dequantize(jax.tree.map(lambda a: a[0], weight)), np.float32)
    assert abs(values.mean()) < 0.002 and 0.015 < values.std() < 0.025
    assert model.lm_head.weight[...].dtype == jnp.bfloat16   # the LM head stays float
    _finite_logits(model)


def test_engine_generates_from_dummy_weights(config_only):
    llm = LLM(config_only, load_format="dummy", dtype="bfloat16", seed=0, **SMALL)
    prompts = [{"prompt_token_ids": [5, 9, 200, 7]}, "hello"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0,
                                                   ignore_eos=True))
    assert [len(output.outputs[0].token_ids) for output in outputs] == [6, 6]
    for output in outputs:
        assert all(0 <= token < 512 for token in output.outputs[0].token_ids)


def test_load_format_must_be_known(config_only):
    with pytest.raises(ValueError, match=r"load_format='safetensors': expected one of "
                                         r"\('auto', 'dummy'\)"):
        EngineConfig(load_format="safetensors")
    with pytest.raises(ValueError, match="load_format='random'"):
        load_model(config_only, load_format="random")


def test_auto_still_needs_the_weights(config_only):
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_model(config_only)


_SHARDED_CHECK = """
import sys
import jax, numpy as np
from flax import nnx
from models import load_model
from models.checkpoint import load_config
from models.sharding import ShardingPlan

model_dir, quantization = sys.argv[1], sys.argv[2]
plan = ShardingPlan.create(load_config(model_dir, "bfloat16"), 2)
model = load_model(model_dir, dtype="bfloat16", plan=plan, load_format="dummy",
                   quantization=None if quantization == "float" else quantization)
layout = plan if quantization == "float" else plan.with_quantization(model.config.quantization)
split = 0
for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    array = variable.get_value()
    assert array.sharding.spec == layout.spec(path, array.ndim), (path, array.sharding)
    shards = {shard.data.shape for shard in array.addressable_shards}
    split += shards != {array.shape}
assert split >= 7, split   # every projection, the embedding and the LM head are split
print("ok", split)
"""


@pytest.mark.parametrize("quantization", ["float", "int8"])
def test_dummy_weights_are_drawn_sharded_under_a_plan(config_only, quantization):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=2").strip()}
    result = subprocess.run([sys.executable, "-c", _SHARDED_CHECK, str(config_only),
                             quantization], cwd=Path(__file__).resolve().parents[2], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
