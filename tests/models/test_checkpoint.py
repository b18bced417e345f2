"""Checkpoint loading: sharded safetensors, orbax conversion, bf16, and clear errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import CheckpointError, ModelConfig, convert_to_orbax, load_model
from tests.hf_models import build_hf_model, load_hf_model

IDS = np.random.default_rng(3).integers(3, 300, size=(1, 24))


def logits_of(model):
    return np.asarray(model.forward_dense(jnp.asarray(IDS)), np.float32)


@pytest.fixture()
def llama_copy(hf_model_dirs, tmp_path):
    return shutil.copytree(hf_model_dirs["llama"], tmp_path / "llama")


def test_sharded_safetensors_load_like_one_file(hf_model_dirs, tmp_path):
    sharded = build_hf_model("llama", tmp_path / "sharded", seed=0)
    model = load_hf_model(sharded)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    np.testing.assert_array_equal(logits_of(load_model(sharded)),
                                  logits_of(load_model(hf_model_dirs["llama"])))


@pytest.fixture(scope="module")
def converted_qwen2(hf_model_dirs, tmp_path_factory):
    return convert_to_orbax(hf_model_dirs["qwen2"], tmp_path_factory.mktemp("converted"))


def test_orbax_conversion_loads_the_same_weights(hf_model_dirs, converted_qwen2):
    assert (converted_qwen2 / "orbax").is_dir()
    assert (converted_qwen2 / "tokenizer.json").is_file()
    np.testing.assert_array_equal(logits_of(load_model(converted_qwen2)),
                                  logits_of(load_model(hf_model_dirs["qwen2"])))


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_converted_checkpoint_is_one_orbax_restores(converted_qwen2):
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(converted_qwen2 / "orbax")
    weights = dict(nnx.to_flat_state(nnx.state(load_model(converted_qwen2), nnx.Param)))
    flat = {path: value for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]}
    assert len(flat) == len(weights)
    for path, variable in weights.items():
        key = tuple(jax.tree_util.DictKey(str(part)) for part in path)
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(variable[...]))


@pytest.mark.skipif(sys.platform != "linux" or jax.default_backend() != "cpu",
                    reason="reads /proc/self/maps; only the CPU adopts host buffers")
@pytest.mark.parametrize("scan_layers", [True, False])
def test_converted_weights_are_mapped_not_copied(converted_qwen2, scan_layers):
    # The conversion stacks the layers: a scanned model maps the stacked weight, an
    # unrolled one each layer's rows of it.
    model = load_model(converted_qwen2, scan_layers=scan_layers, huge_pages=False)
    layers = model.model.layers
    weight = (layers.mlp.up_proj.weight if scan_layers else layers[1].mlp.up_proj.weight)[...]
    address = weight.unsafe_buffer_pointer()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in span.split("-"))
        if start <= address < end:
            assert "model.layers.mlp.up_proj.weight" in name
            return
    pytest.fail("the weight's buffer is in no mapping")


def test_orbax_checkpoint_in_another_layout_restores_through_orbax(hf_model_dirs, tmp_path):
    import orbax.checkpoint as ocp

    source = load_model(hf_model_dirs["llama"])
    shutil.copy(hf_model_dirs["llama"] / "config.json", tmp_path / "config.json")
    with ocp.PyTreeCheckpointer() as checkpointer:  # orbax's defaults: OCDBT, compressed
        checkpointer.save(tmp_path / "orbax", nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    np.testing.assert_array_equal(logits_of(load_model(tmp_path)), logits_of(source))


def test_few_file_descriptors_copy_weights_instead_of_mapping(converted_qwen2, tmp_path):
    # A budget of 4 descriptors maps the first 4 weights and copies the rest.
    script = ("import resource, sys, jax.numpy as jnp, numpy as np\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (260, 260))\n"
              "from models import load_model\n"
              "model = load_model(sys.argv[1])\n"
              "np.save(sys.argv[2], model.forward_dense(jnp.asarray(np.load(sys.argv[2]))))\n")
    exchange = tmp_path / "exchange.npy"
    np.save(exchange, IDS)
    subprocess.run([sys.executable, "-c", script, str(converted_qwen2), str(exchange)],
                   check=True, timeout=300)
    np.testing.assert_array_equal(np.load(exchange), logits_of(load_model(converted_qwen2)))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_orbax_weight_names_the_file(converted_qwen2, tmp_path, damage):
    copy = shutil.copytree(converted_qwen2, tmp_path / "damaged")
    data = next((copy / "orbax" / "model.norm.weight").glob("c/*"))
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:10])
    else:
        data.unlink()
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight/c/0"):
        load_model(copy)


def test_bfloat16_logits_close_to_float32(hf_model_dirs):
    full = logits_of(load_model(hf_model_dirs["gemma"]))
    half = logits_of(load_model(hf_model_dirs["gemma"], dtype="bfloat16"))
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max()


def test_missing_config_names_the_file(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_model(llama_copy)


def test_corrupt_safetensors_names_the_file(llama_copy):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors"):
        load_model(llama_copy)


def test_wrong_tensor_shape_names_the_tensor(llama_copy):
    weights = llama_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.ones((7, 64), np.float32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has "
                                              r"shape \(64, 7\), expected \(64, 128\)"):
        load_model(llama_copy)


def test_missing_tensor_is_reported(llama_copy):
    weights = llama_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_model(llama_copy)


def test_unknown_architecture_lists_the_supported_ones(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(llama_copy)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "relu", "activation='relu'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_type='yarn'"),
])
def test_unsupported_config_fields_are_named(field, value, message):
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              field: value}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(config)


def test_cli_prints_one_line_and_exits_nonzero_on_bad_model(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"not weights")
    result = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--model",
                             str(llama_copy), "hi"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.safetensors: not a valid safetensors file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
