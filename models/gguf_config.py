"""A GGUF file's metadata as the Hugging Face config.json and generation_config.json (no JAX).

llama.cpp writes the config under `{arch}.*` keys (`llama.embedding_length`, ...); the five
families Ember runs map onto four GGUF architectures, Mistral being `llama` with (sometimes) a
sliding window. The result is checked by `ModelConfig.from_hf`, so a file Ember cannot run fails
here, naming the file and the key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from models.config import ModelConfig

if TYPE_CHECKING:
    from models.gguf import GGUFCheckpoint

# GGUF architecture -> Hugging Face architecture, model_type, extra config.json entries.
_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaForCausalLM", "llama", {}),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", {}),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", {}),
    # llama.cpp runs Gemma's GeGLU with the tanh GeLU, as transformers does.
    "gemma": ("GemmaForCausalLM", "gemma", {"hidden_activation": "gelu_pytorch_tanh",
                                            "hidden_act": "gelu_pytorch_tanh"}),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(_FAMILIES)
_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
              "pad_token_id": "padding_token_id"}   # config.json -> tokenizer.ggml.*
# End-of-generation tokens: llama.cpp stops on any of them (Llama 3 instruct ends turns with
# <|eot_id|>, not its EOS).
_END_TOKEN_KEYS = ("eos_token_id", "eot_token_id", "eom_token_id")
# general.sampling.* (llama.cpp's recommended defaults) -> generation_config.json
_SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "penalty_repeat": "repetition_penalty"}


class GGUFError(ValueError):
    """A GGUF file Ember cannot load; the message names the file and the tensor or key."""


def build_hf_config(checkpoint: GGUFCheckpoint, config_tensors: dict[str, np.ndarray]) -> dict:
    """config.json for `checkpoint`, checked by ModelConfig.from_hf.

    Args:
      config_tensors: dequantized tensors that hold configuration (rope_freqs.weight).
    """
    arch, path = checkpoint.architecture, checkpoint.path
    architecture, model_type, extra = _FAMILIES[arch]

    def key(name: str, default=...):
        return checkpoint.metadata(f"{arch}.{name}", default)

    hidden_size = int(key("embedding_length"))
    num_heads = _one_value(key("attention.head_count"), f"{arch}.attention.head_count", path)
    num_kv_heads = _one_value(key("attention.head_count_kv", num_heads),
                              f"{arch}.attention.head_count_kv", path)
    head_dim = int(key("attention.key_length", None) or key("rope.dimension_count", None)
                   or hidden_size // num_heads)
    theta = _decimal(key("rope.freq_base", 10000.0))
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": checkpoint.tensor_shape("token_embd.weight")[0],
        "hidden_size": hidden_size,
        "intermediate_size": _one_value(key("feed_forward_length"),
                                        f"{arch}.feed_forward_length", path),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _decimal(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(key("context_length")),
        # llama.cpp writes output.weight only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in checkpoint.tensor_names,
        "torch_dtype": "float32",   # what write_hf_directory stores (exact for every type)
        **extra,
    }
    for name, gguf_name in _TOKEN_IDS.items():
        if (value := checkpoint.metadata(f"tokenizer.ggml.{gguf_name}", None)) is not None:
            config[name] = int(value)
    if (window := key("attention.sliding_window", 0)) and arch == "llama":
        # Mistral v0.1: a llama file with a window; transformers' Llama has none.
        config.update(architectures=["MistralForCausalLM"], model_type="mistral",
                      sliding_window=int(window))
    if arch == "llama" and "blk.0.attn_q.bias" in checkpoint.tensor_names:
        config["attention_bias"] = True
    rope_scaling = _rope_scaling(checkpoint, key, config_tensors, theta, head_dim)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    try:
        ModelConfig.from_hf(config)
    except ValueError as error:
        raise GGUFError(f"{path}: the metadata describes a model Ember cannot run: "
                        f"{str(error).replace('config.json ', '')}") from None
    return config


def generation_config(checkpoint: GGUFCheckpoint) -> dict:
    """BOS, every end-of-generation id and the file's recommended sampling defaults."""
    config = {}
    bos = checkpoint.metadata("tokenizer.ggml.bos_token_id", None)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    ends = sorted({int(value) for name in _END_TOKEN_KEYS
                   if (value := checkpoint.metadata(f"tokenizer.ggml.{name}", None)) is not None})
    if ends:
        config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    for gguf_name, hf_name in _SAMPLING_KEYS.items():
        value = checkpoint.metadata(f"general.sampling.{gguf_name}", None)
        if value is not None:
            config[hf_name] = _decimal(value) if isinstance(value, float) else value
    return config


def _decimal(value: float) -> float:
    """A float32 from the file as the shortest decimal that is that float32 (1e-05, not
    9.999999747378752e-06): the value the original config.json held."""
    return float(str(np.float32(value)))


def _one_value(value, name: str, path) -> int:
    """A per-model count that newer files may store per layer (all equal for these families)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"{path}: {name}={value}: expected the same value on every layer")
        value = value[0]
    return int(value)


def _rope_scaling(checkpoint: GGUFCheckpoint, key, config_tensors: dict, theta: float,
                  head_dim: int) -> dict | None:
    path = checkpoint.path
    kind = key("rope.scaling.type", "none")
    original = int(key("rope.scaling.original_context_length", 0)) or None
    if "rope_freqs.weight" in config_tensors:
        return _llama3_rope_scaling(config_tensors["rope_freqs.weight"], theta, head_dim,
                                    original or 8192, path)
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": _decimal(key("rope.scaling.factor"))}
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling   # ModelConfig.from_hf rejects the kinds Ember does not run (yarn)


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, original: int,
                         path) -> dict | None:
    """The llama3 rope_scaling whose per-pair wavelength factors are `factors`.

    llama.cpp keeps Llama 3.x's rope scaling as rope_freqs.weight, one factor f per rotary pair
    (the pair's frequency is divided by it). In HF's rule only two wavelengths matter: pairs
    shorter than original/high_freq_factor keep f = 1, pairs longer than
    original/low_freq_factor get f = factor, and between them 1/f moves linearly with
    1/wavelength. This finds those two thresholds from the factors; `original` only sets the
    scale the two factors are expressed in.
    """
    expected_pairs = head_dim // 2
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.size != expected_pairs or not np.all(f > 0):
        raise GGUFError(f"{path}: tensor rope_freqs.weight has {f.size} values {f[:4]}...: "
                        f"expected {expected_pairs} positive factors")
    factor = float(f.max())
    if factor <= 1.0 + 1e-6:
        return None
    x = np.arange(0, head_dim, 2) / head_dim
    x = 1.0 / (2 * math.pi * theta ** x)                       # 1 / wavelength, decreasing

    def gives_factors(low: float, high: float) -> bool:
        s = np.clip((x - low) / (high - low), 0, 1)
        return np.allclose(1 / (1 / factor + s * (1 - 1 / factor)), f, rtol=1e-5)

    # Every Llama 3.x ships low_freq_factor 1 and high_freq_factor 4: try those first.
    low, high = 1.0 / original, 4.0 / original
    if not gives_factors(low, high):
        # s per pair: 1 unscaled .. 0 fully scaled
        low, high = _thresholds(x, (1 / f - 1 / factor) / (1 - 1 / factor))
        if not gives_factors(low, high):
            raise GGUFError(f"{path}: tensor rope_freqs.weight holds factors {f.tolist()}, "
                            f"which no llama3 rope scaling gives")
    return {"rope_type": "llama3", "factor": _decimal(factor),
            "low_freq_factor": float(low * original), "high_freq_factor": float(high * original),
            "original_max_position_embeddings": original}


def _thresholds(x: np.ndarray, s: np.ndarray, tol: float = 1e-4) -> tuple[float, float]:
    """(low, high): 1/wavelength where scaling starts to fade and where it is gone, so that
    s = clip((x - low) / (high - low), 0, 1) at every pair."""
    between = (s > tol) & (s < 1 - tol)
    scaled, unscaled = x[s <= tol], x[s >= 1 - tol]
    if between.sum() >= 2:
        slope, intercept = np.polyfit(x[between], s[between], 1)
        low = -intercept / slope
        return low, low + 1 / slope
    # One pair or none in between: any thresholds around them will do; keep them tight.
    low = scaled.max() if scaled.size else 0.0
    if between.any():
        x_mid, s_mid = x[between][0], s[between][0]
        if unscaled.size:   # prefer high at the first unscaled pair, if low stays valid
            candidate = (x_mid - s_mid * unscaled.min()) / (1 - s_mid)
            if candidate >= low:
                return candidate, unscaled.min()
        return low, low + (x_mid - low) / s_mid
    return low, unscaled.min() if unscaled.size else 2 * low
