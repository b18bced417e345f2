"""GGUF files for the tests, written as llama.cpp's convert_hf_to_gguf.py writes them: from the
tiny Hugging Face models of tests/hf_models.py, or from a tokenizer alone.

The converter's changes are redone here from its source, independently of models/gguf.py: q/k
rows permuted for `llama`, Gemma's norms stored as 1 + w, Llama 3 rope scaling as
rope_freqs.weight, names through gguf-py's own TensorNameMap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma"}
_ARCH_ENUM = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
              "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA}
# A spread of types per weight, so every supported block type is read in one model.
MIXED = {"embed_tokens": Q.Q8_0, "q_proj": Q.Q4_0, "k_proj": Q.Q4_1, "v_proj": Q.Q8_0,
         "o_proj": Q.Q4_0, "gate_proj": Q.Q4_1, "up_proj": Q.F16, "down_proj": Q.Q8_0,
         "lm_head": Q.BF16}
# Byte offsets of the f16 scales in one block of each K type (the rest may be any bytes).
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def qtype_for(hf_name: str, plan: dict | None) -> Q:
    if plan is None or hf_name.endswith(("norm.weight", ".bias")):
        return Q.F32
    part = hf_name.split(".")[-2]
    return plan.get(part, Q.F32)


def encode_tensor(array: np.ndarray, qtype: Q, rng: np.random.Generator | None = None):
    """(bytes or floats to write, raw_dtype): the file's content for one weight."""
    if qtype in _K_SCALES:   # gguf-py cannot quantize K types: random blocks, sane scales
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = array.shape
        blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.01, size=(rows, cols // block_size)).astype(np.float16)
        for offset in _K_SCALES[qtype]:
            blocks[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
        return blocks.reshape(rows, -1), qtype
    if qtype in (Q.F32, Q.F16):
        return gguf.quants.quantize(array, qtype), None
    return gguf.quants.quantize(array, qtype), qtype


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's LlamaModel.permute: HF rotate-half rows -> interleaved pairs, per head.
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_factors(config: dict) -> np.ndarray:
    scaling = config["rope_scaling"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    low, high = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(scaling["factor"])
        else:
            smooth = (old / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_model_gguf(hf_dir: Path, path: Path, plan: dict | None = MIXED, *, seed: int = 0,
                     sliding_window: bool = False, extra=None) -> Path:
    """A GGUF file of the model in hf_dir, weights typed by `plan` (None: all F32); `extra`
    (called with the writer) adds metadata."""
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("rope_parameters") and "rope_scaling" not in config:
        config["rope_scaling"] = config["rope_parameters"]   # transformers 5 spelling
        config.setdefault("rope_theta", config["rope_parameters"].get("rope_theta", 10000.0))
    model_type, rng = config["model_type"], np.random.default_rng(seed)
    arch = GGUF_ARCH[model_type]
    writer = gguf.GGUFWriter(path, arch)
    # transformers loads a llama file as Mistral when its name says so.
    writer.add_name(f"tiny-{model_type}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch != "gemma":
        writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(
            config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if sliding_window:
        writer.add_sliding_window(config["sliding_window"])
    if extra is not None:
        extra(writer)
    add_tokenizer_metadata(writer, hf_dir)

    name_map = gguf.get_tensor_name_map(_ARCH_ENUM[arch], config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings") or arch == "gemma"
    for hf_name, array in load_file(hf_dir / "model.safetensors").items():
        if hf_name == "lm_head.weight" and tied:
            continue
        array = array.astype(np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            array = _permute(array, config["num_attention_heads"])
        if arch == "llama" and ".k_proj." in hf_name:
            array = _permute(array, config["num_key_value_heads"])
        if arch == "gemma" and hf_name.endswith("norm.weight"):
            array = array + 1
        base, suffix = hf_name.rsplit(".", 1)
        data, raw_dtype = encode_tensor(array, qtype_for(hf_name, plan), rng)
        writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", data, raw_dtype=raw_dtype)
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(config))
    _finish(writer)
    return path


def add_tokenizer_metadata(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """The byte-level tokenizer.json of a tiny model as gpt2-kind metadata."""
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {token["content"] for token in tokenizer["added_tokens"] if token["special"]}
    types = [3 if token in specials else 1 for token in tokens]
    # llama.cpp pads the vocabulary to the model's with unused [PADn] tokens.
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [5] * (vocab_size - len(types))
    add_gpt2_tokenizer(writer, tokens, [" ".join(m) if isinstance(m, list) else m
                                        for m in tokenizer["model"]["merges"]],
                       types, pre="gpt-2",
                       bos=vocab["<s>"], eos=vocab["</s>"], pad=vocab["<pad>"],
                       chat_template=_template(hf_dir, config))


def add_gpt2_tokenizer(writer, tokens, merges, types, *, pre, bos=None, eos=None, pad=None,
                       unk=None, add_bos=False, chat_template=None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:
        # transformers rebuilds missing merges from scores, and needs the key to do it
        writer.add_token_scores([0.0] * len(tokens))
    _add_ids(writer, bos, eos, pad, unk)
    writer.add_add_bos_token(add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)


def add_sentencepiece_tokenizer(writer, tokens, scores, types, *, bos, eos, unk, pad=None,
                                add_bos=True, add_space_prefix=None, chat_template=None):
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_ids(writer, bos, eos, pad, unk)
    writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)


def _add_ids(writer, bos, eos, pad, unk) -> None:
    for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id),
                       (pad, writer.add_pad_token_id), (unk, writer.add_unk_token_id)):
        if value is not None:
            add(value)


def _template(hf_dir: Path, config: dict) -> str | None:
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text()
    return config.get("chat_template")


def write_gguf(path: Path, add, arch: str = "llama") -> Path:
    """A GGUF file holding what `add(writer)` writes (tokenizer metadata, a few tensors)."""
    writer = gguf.GGUFWriter(path, arch)
    add(writer)
    _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
