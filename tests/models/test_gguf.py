"""GGUF checkpoints: the weights, config and model Ember reads equal what transformers reads.

Files are written by tests/gguf_files.py as llama.cpp's converter writes them, from the tiny
random-weight models, with a spread of tensor types (MIXED: F32, F16, BF16, Q8_0, Q4_0, Q4_1;
the K types on their own file). Where transformers' GGUF reader takes the file as it is, it is
the reference; where it does not (Gemma 1, Llama 3 rope scaling, Qwen3's non-default head_dim,
a Mistral window) the reference is the original model holding the file's weights, dequantized
independently of models/gguf.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine import LLM, SamplingParams
from engine.tokenizer.gguf_tokenizer import write_tokenizer_files
from models.checkpoint import load_model
from models.config import ModelConfig
from models.gguf import GGUFError, read_gguf, write_hf_directory
from tests.gguf_files import MIXED, encode_tensor, qtype_for, write_model_gguf
from tests.hf_models import build_hf_model, load_hf_model

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=64, page_size=16, num_pages=32,
             max_model_len=128, warmup=False, compilation_cache_dir="")
# case -> (tiny model kind, build overrides (None: the shared one), transformers reads the
# file faithfully, write a sliding window)
CASES = {
    "llama": ("llama", None, False, False),          # its rope_freqs: transformers drops them
    "llama_plain": ("llama", {"rope_scaling": None}, True, False),
    "mistral": ("mistral", None, True, False),       # no window, as llama.cpp writes Mistral
    "mistral_window": ("mistral", None, False, True),
    "qwen2": ("qwen2", None, True, False),
    "qwen3": ("qwen3", None, False, False),          # head_dim 24: transformers assumes 128
    "qwen3_wide": ("qwen3", {"head_dim": 128}, True, False),
    "gemma": ("gemma", None, False, False),          # transformers reads no gemma (v1) file
}
K_PLAN = {"embed_tokens": Q.Q6_K, "q_proj": Q.Q4_K, "k_proj": Q.Q5_K, "v_proj": Q.Q6_K,
          "o_proj": Q.Q4_K, "gate_proj": Q.Q5_K, "up_proj": Q.Q6_K, "down_proj": Q.Q4_K,
          "lm_head": Q.Q5_K}


@pytest.fixture(scope="module")
def files(hf_model_dirs, tmp_path_factory):
    """case -> (HF directory, its GGUF file, the converted directory), built on first use."""
    root, built = tmp_path_factory.mktemp("gguf"), {}

    def get(case: str):
        if case not in built:
            kind, overrides, _, window = CASES[case]
            hf_dir = (hf_model_dirs[kind] if overrides is None
                      else build_hf_model(kind, root / f"{case}_hf", **overrides))
            path = write_model_gguf(hf_dir, root / case / f"{case}.gguf", sliding_window=window)
            out = write_hf_directory(path, root / f"{case}_converted", write_tokenizer_files)
            built[case] = hf_dir, path, out
        return built[case]

    return get


def file_weights_model(hf_dir: Path, plan: dict | None = MIXED):
    """The original model holding what the file holds: each weight quantized and dequantized
    by gguf-py, Gemma's norms through their stored 1 + w."""
    model = load_hf_model(hf_dir)
    gemma = model.config.model_type == "gemma"
    with torch.no_grad():
        for name, param in model.named_parameters():
            array = param.numpy().astype(np.float32)
            if gemma and name.endswith("norm.weight"):
                array = (array + np.float32(1)) - np.float32(1)
            qtype = qtype_for(name, plan)
            data, _ = encode_tensor(array, qtype)
            param.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(array.shape)))
    return model


def reference_model(case: str, files):
    hf_dir, path, _ = files(case)
    if CASES[case][2]:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32,
            attn_implementation="eager").eval()
    return file_weights_model(hf_dir)


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("case", [case for case, spec in CASES.items() if spec[2]])
def test_tensors_equal_transformers_gguf_reader(case, files):
    _, path, _ = files(case)
    expected = reference_model(case, files).state_dict()
    ours = dict(read_gguf(path).tensors())
    tied = "lm_head.weight" not in ours
    assert set(ours) == set(expected) - ({"lm_head.weight"} if tied else set())
    for name, tensor in ours.items():
        np.testing.assert_array_equal(tensor.dequantize(), expected[name].numpy(), err_msg=name)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_f32_file_gives_back_the_original_model(kind, hf_model_dirs, tmp_path):
    from safetensors.numpy import load_file

    hf_dir = hf_model_dirs[kind]
    checkpoint = read_gguf(write_model_gguf(hf_dir, tmp_path / "f32.gguf", plan=None))
    original = load_file(hf_dir / "model.safetensors")
    ours = dict(checkpoint.tensors())
    assert set(ours) <= set(original) and set(original) - set(ours) <= {"lm_head.weight"}
    for name, tensor in ours.items():   # Gemma's norms went through 1 + w in float32
        np.testing.assert_allclose(tensor.dequantize(), original[name], rtol=0,
                                   atol=1e-7 if kind == "gemma" else 0, err_msg=name)
    config = ModelConfig.from_hf(checkpoint.hf_config())
    expected = ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))
    np.testing.assert_allclose(config.rope.inverse_frequencies(config.head_dim),
                               expected.rope.inverse_frequencies(expected.head_dim), rtol=1e-6)
    if kind == "mistral":   # llama.cpp writes Mistral as llama, without its window
        assert (config.architecture, config.sliding_window) == ("LlamaForCausalLM", None)
    assert dataclasses.replace(config, rope=expected.rope, architecture=expected.architecture,
                               sliding_window=expected.sliding_window) == expected


def test_llama31_rope_scaling_is_read_back_exactly(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_dir = build_hf_model("llama", tmp_path / "hf", head_dim=128, rope_scaling=dict(scaling))
    config = read_gguf(write_model_gguf(hf_dir, tmp_path / "f.gguf", plan=None)).hf_config()
    assert config["rope_scaling"] == scaling and config["rope_theta"] == 500000.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_model_logits_match(case, files):
    _, _, converted = files(case)
    ids = np.random.default_rng(11).integers(3, 256, size=(2, 40))
    with torch.no_grad():
        expected = reference_model(case, files)(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(converted).forward_dense(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_converted_model_greedy_tokens_match(case, files):
    _, _, converted = files(case)
    prompt = np.random.default_rng(12).integers(3, 256, size=24).tolist()
    out = LLM(converted, **SMALL).generate(
        {"prompt_token_ids": prompt},
        SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    expected = greedy(reference_model(case, files), prompt, 32)
    assert out.outputs[0].token_ids == expected
    assert len(set(expected)) > 4, "greedy text should vary for the test to mean something"


def test_blocks_are_the_files_blocks_in_hf_row_order(files, hf_model_dirs):
    from safetensors.numpy import load_file

    _, path, _ = files("llama")
    original = load_file(hf_model_dirs["llama"] / "model.safetensors")
    for name, tensor in read_gguf(path).tensors():
        if not tensor.is_quantized:
            with pytest.raises(GGUFError, match=f"tensor {tensor.name} is {tensor.qtype.name}"):
                tensor.blocks  # noqa: B018
            continue
        blocks = tensor.blocks
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.qtype]
        assert blocks.shape == (tensor.shape[0], tensor.shape[1] // block_size * type_size)
        values = gguf.quants.dequantize(blocks, tensor.qtype)
        np.testing.assert_array_equal(values, tensor.dequantize(), err_msg=name)
        # Independent of the reader: the original weight, quantized in HF row order.
        data, _ = encode_tensor(original[name], tensor.qtype)
        np.testing.assert_array_equal(values, gguf.quants.dequantize(data, tensor.qtype))
        permuted = "q_proj" in name or "k_proj" in name
        assert np.shares_memory(blocks, tensor.raw) != permuted, name   # a view on the mmap


def test_k_quant_tensors_equal_transformers_gguf_reader(tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = build_hf_model("llama", tmp_path / "hf", hidden_size=256, intermediate_size=256,
                            rope_scaling=None)
    path = write_model_gguf(hf_dir, tmp_path / "gguf" / "k.gguf", plan=K_PLAN)
    expected = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                    dtype=torch.float32).state_dict()
    types = set()
    for name, tensor in read_gguf(path).tensors():
        types.add(tensor.qtype)
        np.testing.assert_array_equal(tensor.dequantize(), expected[name].numpy(), err_msg=name)
        if tensor.is_quantized:
            np.testing.assert_array_equal(gguf.quants.dequantize(tensor.blocks, tensor.qtype),
                                          expected[name].numpy(), err_msg=name)
    assert {Q.Q4_K, Q.Q5_K, Q.Q6_K} <= types


def test_write_hf_directory_writes_what_ember_and_transformers_load(files):
    _, path, converted = files("qwen2")
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert json.loads((converted / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2}
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 99, 200, 31]])
    with torch.no_grad():
        direct = AutoModelForCausalLM.from_pretrained(
            converted, attn_implementation="eager").eval()(ids).logits
        from_file = reference_model("qwen2", files)(ids).logits
    torch.testing.assert_close(direct, from_file, rtol=0, atol=0)


def test_smollm2_q4_1_file_converts_to_transformers_logits(tmp_path, default_gguf):
    """A real llama.cpp file: Q4_1 weights, a Q8_0 embedding, the llama q/k permutation."""
    from transformers import AutoModelForCausalLM

    checkpoint = read_gguf(default_gguf)
    assert {t.qtype for _, t in checkpoint.tensors()} == {Q.F32, Q.Q4_1, Q.Q8_0}
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / default_gguf.name).symlink_to(default_gguf)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "file", gguf_file=default_gguf.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    expected = reference.state_dict()
    for name, tensor in checkpoint.tensors():
        np.testing.assert_array_equal(tensor.dequantize(), expected[name].numpy(), err_msg=name)
    converted = write_hf_directory(default_gguf, tmp_path / "converted", write_tokenizer_files)
    ids = np.random.default_rng(13).integers(3, 49152, size=(1, 24))
    with torch.no_grad():
        logits = reference(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(load_model(converted).forward_dense(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, logits, atol=1e-4 * np.abs(logits).max(), rtol=0)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_a_gguf_file_loads_directly(case, files):
    """LLM("x.gguf"): the weights from the file, config and tokenizer from its metadata."""
    _, path, _ = files(case)
    prompt = np.random.default_rng(12).integers(3, 256, size=24).tolist()
    out = LLM(path, **SMALL).generate({"prompt_token_ids": prompt},
                                      SamplingParams(max_tokens=32, temperature=0,
                                                     ignore_eos=True))[0]
    assert out.outputs[0].token_ids == greedy(reference_model(case, files), prompt, 32)


def test_the_default_model_answers_as_transformers_does(default_gguf, tmp_path):
    """SmolLM2-135M-Instruct's GGUF: greedy chat answers equal transformers' on the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "file").mkdir()
    (tmp_path / "file" / default_gguf.name).symlink_to(default_gguf)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "file", gguf_file=default_gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "file", gguf_file=default_gguf.name)
    llm = LLM(default_gguf, quantization="none", **{**SMALL, "max_model_len": 256})
    questions = ["What is the capital of France?", "Name three primary colors.",
                 "Write a haiku about the sea."]
    conversations = [[{"role": "user", "content": question}] for question in questions]
    outputs = llm.chat(conversations, SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in outputs[0].outputs[0].text
    for conversation, output in zip(conversations, outputs):
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=24, do_sample=False)[0]
        assert output.prompt_token_ids == ids[0].tolist()
        assert output.outputs[0].token_ids == expected[ids.shape[1]:].tolist()
