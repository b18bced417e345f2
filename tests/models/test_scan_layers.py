"""Scanned layers (stacked weights) against unrolled ones: the same weights from the same seed
or checkpoint, whichever structure wrote the checkpoint, and Hugging Face's names on disk."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from models import (CheckpointError, ModelConfig, Transformer, convert_to_orbax, load_config,
                    load_from_tensors, load_model, save_safetensors)
from models.layer_slice import NO_HINTS, ProductHints
from tests.hf_models import load_hf_model

IDS = np.random.default_rng(5).integers(3, 300, size=(2, 12))
CONFIG = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, qk_norm=True)


GPU_HINTS = ProductHints(gpu_layer_matmul=True)   # as models/paged.py gives one GPU's steps


def logits_of(model, hints=NO_HINTS):
    return np.asarray(model.forward_dense(jnp.asarray(IDS), hints), np.float32)


def weights(model) -> dict[str, np.ndarray]:
    """Every weight by its Hugging Face name, one tensor per layer."""
    from models.checkpoint import hf_tensors
    return dict(hf_tensors(model))


def test_one_seed_gives_the_same_model_scanned_or_not():
    scanned = Transformer(CONFIG, rngs=nnx.Rngs(3))
    unrolled = Transformer(dataclasses.replace(CONFIG, scan_layers=False), rngs=nnx.Rngs(3))
    assert scanned.model.layers.mlp.up_proj.weight[...].shape == (3, 32, 64)
    expected = weights(unrolled)
    got = weights(scanned)
    assert sorted(got) == sorted(expected)
    assert "model.layers.2.self_attn.k_norm.weight" in got
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name], tensor, err_msg=name)
    np.testing.assert_array_equal(np.asarray(scanned.model.layer(1).self_attn.q_proj.bias[...]),
                                  np.asarray(unrolled.model.layer(1).self_attn.q_proj.bias[...]))
    np.testing.assert_allclose(logits_of(scanned), logits_of(unrolled), atol=1e-5, rtol=0)


@pytest.mark.parametrize("written_scanned", [True, False])
def test_orbax_of_either_structure_loads_into_either(hf_model_dirs, tmp_path, written_scanned):
    # written_scanned=False is the per-layer layout every checkpoint before scanning had.
    source = hf_model_dirs["qwen3"]
    converted = convert_to_orbax(source, tmp_path / "converted", scan_layers=written_scanned)
    layer_dirs = {path.name for path in (converted / "orbax").iterdir()}
    stacked_name = "model.layers.mlp.up_proj.weight"
    assert (stacked_name in layer_dirs) == written_scanned
    assert ("model.layers.0.mlp.up_proj.weight" in layer_dirs) != written_scanned
    for scan_layers in (True, False):   # the same weights: the same logits, bit for bit
        np.testing.assert_array_equal(logits_of(load_model(converted, scan_layers=scan_layers)),
                                      logits_of(load_model(source, scan_layers=scan_layers)))


def test_saved_safetensors_keep_hugging_face_names(hf_model_dirs, tmp_path):
    model = load_model(hf_model_dirs["llama"])   # scanned
    config = {"architectures": ["LlamaForCausalLM"]}
    save_safetensors(model, config, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    original = load_file(hf_model_dirs["llama"] / "model.safetensors")
    assert sorted(saved) == sorted(name for name in original if "rotary" not in name)
    for name, tensor in saved.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_load_from_tensors_takes_a_hugging_face_state_dict(hf_model_dirs, scan_layers):
    model_dir = hf_model_dirs["gemma"]
    state = {name: tensor.numpy() for name, tensor in load_hf_model(model_dir).state_dict().items()}
    config = load_config(model_dir, scan_layers=scan_layers)
    model = load_from_tensors(config, state.items(), source="state_dict")
    np.testing.assert_array_equal(logits_of(model),
                                  logits_of(load_model(model_dir, scan_layers=scan_layers)))
    half = load_from_tensors(config, state.items(), source="state_dict", dtype="bfloat16")
    assert half.model.embed_tokens.weight[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("scan_layers", [True, False])
def test_load_from_tensors_names_a_missing_or_misshapen_layer_tensor(hf_model_dirs, scan_layers):
    model_dir = hf_model_dirs["llama"]
    state = load_file(model_dir / "model.safetensors")
    config = load_config(model_dir, scan_layers=scan_layers)
    dropped = "model.layers.1.mlp.down_proj.weight"
    missing = {name: tensor for name, tensor in state.items() if name != dropped}
    with pytest.raises(CheckpointError, match=r"here: weights missing from the checkpoint: "
                                              r"\['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        load_from_tensors(config, missing.items(), source="here")
    state["model.layers.1.mlp.up_proj.weight"] = np.ones((7, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"here: tensor model\.layers\.1\.mlp\.up_proj\."
                                              r"weight has shape \(64, 7\), expected \(64, 128\)"):
        load_from_tensors(config, state.items(), source="here")


def test_scanned_layers_on_the_gpu_layer_matmul_give_the_unrolled_logits(monkeypatch):
    """A scanned Linear's GPU path (pallas_kernels/gpu/layer_matmul.py, interpreted here):
    every projection of few rows reads its layer in place from the stack, q, k and v in one
    call and gate and up in another, and the logits are the unrolled model's."""
    import models.transformer as transformer
    from pallas_kernels.gpu import layer_matmul

    tiles = layer_matmul.LayerMatmulTiles(block_n=16, block_k=16, programs=4)
    kernel, calls = layer_matmul.grouped_layer_matmul_gpu, []

    def interpreted(x, stacks, layer, **_):
        calls.append([stack.shape for stack in stacks])
        return kernel(x, stacks, layer, tiles=tiles, interpret=True)

    monkeypatch.setattr(layer_matmul, "grouped_layer_matmul_gpu", interpreted)
    monkeypatch.setattr(transformer, "uses_layer_matmul",
                        lambda rows, shape: layer_matmul.supported(rows, shape, tiles))
    scanned = Transformer(CONFIG, rngs=nnx.Rngs(3))
    unrolled = Transformer(dataclasses.replace(CONFIG, scan_layers=False), rngs=nnx.Rngs(3))
    logits_of(scanned)
    assert not calls   # without the hint (the dense path, a mesh): XLA's dot
    got = logits_of(scanned, GPU_HINTS)
    assert calls == [[(3, 32, 32), (3, 32, 16), (3, 32, 16)], [(3, 32, 32)],   # q k v; o
                     [(3, 32, 64), (3, 32, 64)], [(3, 64, 32)]]                # gate up; down
    calls.clear()
    np.testing.assert_allclose(got, logits_of(unrolled, GPU_HINTS), atol=1e-5, rtol=0)
    assert not calls   # unrolled layers hold their own weights: XLA's dot reads them in place


@pytest.mark.parametrize("fmt", ["int8", "q8_0", "int4"])
def test_scanned_quantized_layers_on_the_gpu_layer_matmul(monkeypatch, fmt):
    """A scanned QuantizedLinear's GPU path (interpreted here) reads each layer's int8 or int4
    arrays in place and gives the logits of XLA's path over the same weights."""
    import models.quantization as quantization
    from models.checkpoint import PROJECTIONS
    from pallas_kernels.gpu import layer_matmul

    formats = {"int8": quantization.INT8, "int4": quantization.INT4,
               "q8_0": quantization.QuantFormat("int8", 32, "float16")}
    config = dataclasses.replace(CONFIG, quantization=tuple(
        (projection, formats[fmt]) for projection in PROJECTIONS))
    tiles = layer_matmul.LayerMatmulTiles(block_n=16, block_k=16, programs=4)
    kernel, calls = layer_matmul.quantized_layer_matmul_gpu, []

    def interpreted(x, arrays, layer, *, kind):
        calls.append(kind)
        return kernel(x, arrays, layer, kind=kind, tiles=tiles, interpret=True)

    model = Transformer(config, rngs=nnx.Rngs(3))
    expected = logits_of(model)                        # XLA's path: no kernel
    monkeypatch.setattr(layer_matmul, "quantized_layer_matmul_gpu", interpreted)
    monkeypatch.setattr(quantization, "layer_matmul_wanted", lambda rows: True)
    monkeypatch.setattr(quantization, "supported_quantized",
                        functools.partial(layer_matmul.supported_quantized, tiles=tiles))
    assert not calls
    got = logits_of(model, GPU_HINTS)
    assert calls == [formats[fmt].kind] * 7            # every projection, traced once
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
