"""ModelConfig: one decoder-only transformer, its variants chosen by fields (no JAX)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Hugging Face architecture -> the switches that make our one transformer that model.
_ARCHITECTURES: dict[str, dict] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    "GemmaForCausalLM": {"norm_offset": 1.0, "scale_embeddings": True},
}
# transformers' defaults, where its config class has its own for a field config.json omits.
_HF_DEFAULTS: dict[str, dict] = {
    "GemmaForCausalLM": {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    "MistralForCausalLM": {"sliding_window": 4096},
    "Qwen2ForCausalLM": {"sliding_window": 4096},
    "Qwen3ForCausalLM": {"sliding_window": 4096},
}
# Architectures whose config reads attention_bias (q, k, v and o) and mlp_bias: transformers
# ignores the keys elsewhere (Qwen2's q, k, v biases are always on, Mistral has none).
_ATTENTION_BIAS = ("LlamaForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM")
_MLP_BIAS = ("LlamaForCausalLM",)
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh", "gelu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16")


@dataclass(slots=True, frozen=True)
class RopeConfig:
    """Rotary embedding: theta plus an optional scaling rule (linear or Llama 3.x)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: expected one of "
                             f"{SUPPORTED_ROPE_TYPES}")

    def inverse_frequencies(self, head_dim: int) -> list[float]:
        """Per-pair inverse frequencies, computed in float64 as the reference does in float32."""
        base = [1.0 / self.theta ** (i / head_dim) for i in range(0, head_dim, 2)]
        if self.rope_type == "linear":
            return [f / self.factor for f in base]
        if self.rope_type == "default":
            return base
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        scaled = []
        for freq in base:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                scaled.append(freq)
            elif wavelen > low_wavelen:
                scaled.append(freq / self.factor)
            else:
                smooth = ((self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                          / (self.high_freq_factor - self.low_freq_factor))
                scaled.append((1 - smooth) * freq / self.factor + smooth * freq)
        return scaled


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Shape and variant switches of the decoder-only transformer.

    The five supported Hugging Face architectures differ only in these switches:
    qkv_bias (Qwen2), qk_norm (Qwen3), norm_offset=1 and scale_embeddings (Gemma's (1 + w)
    RMSNorm and sqrt(hidden) embedding scale), sliding_window (Mistral), activation
    (Gemma's GeGLU is gelu_pytorch_tanh), and tie_word_embeddings.

    Two fields say how the model runs, not what it is: dtype, and scan_layers (True: every
    layer weight stacked on a leading [num_layers] axis and the layers run under
    jax.lax.scan, so a step compiles one layer whatever the depth; False: one module per
    layer, unrolled). Checkpoints hold the same per-layer tensors either way.

    `quantization` says how linear weights are held: (projection, QuantFormat) pairs, e.g.
    (("q_proj", INT4), ...); a projection listed is a QuantizedLinear in every layer
    (models/quantization.py), the others (and embeddings, the LM head) are float.
    `head_blocks`: the LM head (tied: the embedding table) is also held as a GGUF file's Q8_0
    blocks, one token's row each (`Transformer.head_blocks`), which the CPU kernel reads for a
    decode's few rows: a quarter of the f32 head's bytes (models/transformer.py).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str = "LlamaForCausalLM"
    activation: str = "silu"
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    scale_embeddings: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"
    scan_layers: bool = True
    quantization: tuple = ()   # ((projection, QuantFormat), ...): see the docstring
    head_blocks: bool = False   # see the docstring

    def __post_init__(self) -> None:
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} is not supported: expected one "
                             f"of {SUPPORTED_ARCHITECTURES}")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of "
                             f"{SUPPORTED_ACTIVATIONS}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {SUPPORTED_DTYPES}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r}: expected True or False")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_blocks and self.hidden_size % 32:
            raise ValueError(f"head_blocks=True needs a hidden_size that is a multiple of 32 "
                             f"(Q8_0 blocks), got {self.hidden_size}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: expected an even number (rotary pairs)")

    def linear_format(self, projection: str):
        """The QuantFormat of `projection` (e.g. "q_proj"), or None: a float Linear."""
        return dict(self.quantization).get(projection)

    @property
    def num_parameters(self) -> int:
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + 2 * self.hidden_size) + embeddings

    @classmethod
    def from_hf(cls, hf: dict, dtype: str | None = None, scan_layers: bool = True
                ) -> "ModelConfig":
        """Builds a ModelConfig from a Hugging Face config.json dict.

        Raises:
          ValueError naming the field when the architecture, activation or rope type is not
          one Ember supports.
        """
        architectures = hf.get("architectures") or []
        if len(architectures) != 1:
            raise ValueError(f"config.json architectures={architectures!r}: expected exactly one "
                             f"of {SUPPORTED_ARCHITECTURES}")
        architecture = architectures[0]
        if architecture not in _ARCHITECTURES:
            raise ValueError(f"config.json architectures={architectures!r} is not supported: "
                             f"expected one of {SUPPORTED_ARCHITECTURES}")
        num_heads = _required(hf, "num_attention_heads")
        hidden_size = _required(hf, "hidden_size")
        defaults = _HF_DEFAULTS.get(architecture, {})
        activation = (hf.get("hidden_activation")
                      or hf.get("hidden_act", defaults.get("hidden_act", "silu")))
        if architecture == "GemmaForCausalLM" and activation == "gelu":
            activation = "gelu_pytorch_tanh"  # transformers runs Gemma's "gelu" as tanh-GeLU
        switches = dict(_ARCHITECTURES[architecture])
        if architecture in _ATTENTION_BIAS and hf.get("attention_bias"):
            switches.update(qkv_bias=True, o_bias=True)
        return cls(
            architecture=architecture,
            vocab_size=_required(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_required(hf, "intermediate_size"),
            num_layers=_required(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden_size // num_heads,
            activation=activation,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                            defaults.get("tie_word_embeddings", False))),
            mlp_bias=architecture in _MLP_BIAS and bool(hf.get("mlp_bias", False)),
            sliding_window=_sliding_window(hf, architecture),
            dtype=dtype or _dtype_from_hf(hf),
            scan_layers=scan_layers,
            **switches,
        )


def _required(hf: dict, name: str):
    if name not in hf:
        raise ValueError(f"config.json has no {name!r}: it is required")
    return hf[name]


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json rope_type={rope_type!r} is not supported: expected one of "
                         f"{SUPPORTED_ROPE_TYPES}")
    kwargs = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings") if k in params}
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


def _sliding_window(hf: dict, architecture: str) -> int | None:
    """The window every layer attends within, as transformers reads the config: Mistral's
    `sliding_window` (4096 when absent); Qwen's only with `use_sliding_window`, and only on
    the layers `layer_types` names sliding (without it, those from `max_window_layers` on).
    Llama and Gemma have none, whatever the file says.

    Raises:
      ValueError naming the field when only some layers would slide (not supported).
    """
    window = hf.get("sliding_window", _HF_DEFAULTS.get(architecture, {}).get("sliding_window"))
    if architecture == "MistralForCausalLM":
        return window
    if architecture not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        return None
    if not hf.get("use_sliding_window") or window is None:
        return None
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is not None:
        sliding = [kind == "sliding_attention" for kind in types]
        if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"config.json layer_types={types!r}: expected {layers} entries of "
                             "'sliding_attention' or 'full_attention'")
        field, value = "layer_types", types
    else:
        first_sliding_layer = hf.get("max_window_layers", 0)
        sliding = [layer >= first_sliding_layer for layer in range(layers)]
        field, value = "max_window_layers", first_sliding_layer
    if not any(sliding):
        return None
    if not all(sliding):
        raise ValueError(f"config.json {field}={value!r}: a sliding window on only some layers "
                         "is not supported (expected every layer or none)")
    return window


def _dtype_from_hf(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "bfloat16" if name in ("bfloat16", "float16") else "float32"
