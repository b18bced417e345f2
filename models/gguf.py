"""GGUF checkpoints (llama.cpp's one-file format): metadata as config.json, tensors in HF naming.

    checkpoint = read_gguf("model.Q4_K_M.gguf")
    ModelConfig.from_hf(checkpoint.hf_config())
    for hf_name, tensor in checkpoint.tensors():   # "model.layers.0.self_attn.q_proj.weight", ...
        tensor.dequantize()                         # f32, Hugging Face layout
        tensor.blocks                               # or the raw Q8_0/Q4_0/... blocks

llama.cpp's converter changes three things on the way in, which this module undoes:
- `llama` files: q_proj / k_proj rows (weights and biases) are permuted from Hugging Face's
  rotate-half rotary layout to llama.cpp's interleaved one (`_rope_row_order`).
- `gemma` files: every RMSNorm weight is stored as 1 + w (Gemma's HF norm computes x * (1 + w),
  llama.cpp's computes x * w); transformers' Gemma2/3 GGUF loaders subtract the one as we do.
- Llama 3.x rope scaling becomes one factor per rotary pair (`rope_freqs.weight`); the HF
  `rope_scaling` is recovered from those factors (models/gguf_config.py).

No JAX: the tensors are numpy views on the file's memory map until dequantized.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from models.gguf_config import (GGUFError, SUPPORTED_GGUF_ARCHITECTURES, build_hf_config,
                                generation_config)

__all__ = ["GGUFCheckpoint", "GGUFError", "GGUFTensor", "QUANTIZED_TYPES", "SUPPORTED_TYPES",
           "read_gguf", "write_hf_directory"]

_T = GGMLQuantizationType
FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)
QUANTIZED_TYPES = (_T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q4_K, _T.Q5_K, _T.Q6_K)
SUPPORTED_TYPES = FLOAT_TYPES + QUANTIZED_TYPES

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")
# Tensors that describe the model rather than hold weights; read into the config.
_CONFIG_TENSORS = ("rope_freqs.weight",)


@dataclass(frozen=True, slots=True, eq=False)
class GGUFTensor:
    """One weight of a GGUF file, in Hugging Face orientation ([out, in] for linear weights)."""

    name: str                       # the GGUF name, e.g. "blk.0.attn_q.weight"
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]          # Hugging Face shape
    raw: np.ndarray                 # the file's bytes: f32/f16[shape], or u8[rows, row_bytes]
    row_order: np.ndarray | None = None   # i64[shape[0]]: the file row of each HF row
    offset: float = 0.0             # added after dequantizing (Gemma norms are stored 1 + w)

    @property
    def is_quantized(self) -> bool:
        return self.qtype in QUANTIZED_TYPES

    @property
    def blocks(self) -> np.ndarray:
        """u8[out, in_blocks * bytes_per_block]: the raw quantized blocks, HF row order.

        A view on the file's memory map, except for llama q/k weights, whose rows are gathered
        (a copy): the permutation is over output rows, so whole blocks move and none is
        re-quantized.
        """
        if not self.is_quantized or self.offset:
            raise GGUFError(f"tensor {self.name} is {self.qtype.name}"
                            f"{' with an offset' if self.offset else ''}: it has no raw blocks "
                            f"(expected one of {[t.name for t in QUANTIZED_TYPES]})")
        return self.raw if self.row_order is None else self.raw[self.row_order]

    def dequantize(self) -> np.ndarray:
        """f32[shape]; may be a read-only view on the file for an F32 tensor."""
        values = np.asarray(dequantize(self.raw, self.qtype), dtype=np.float32)
        values = values.reshape(self.shape)
        if self.row_order is not None:
            values = values[self.row_order]
        return values + np.float32(self.offset) if self.offset else values


class GGUFCheckpoint:
    """A GGUF file read for Ember. Build it with `read_gguf(path)`."""

    def __init__(self, path: Path, reader: GGUFReader):
        self.path = path
        self._reader = reader
        self._metadata = {key: field for key, field in reader.fields.items()
                          if not key.startswith("GGUF.")}
        self.architecture = str(self.metadata("general.architecture"))
        if self.architecture not in SUPPORTED_GGUF_ARCHITECTURES:
            raise GGUFError(f"{path}: general.architecture={self.architecture!r} is not "
                            f"supported: expected one of {SUPPORTED_GGUF_ARCHITECTURES}")
        self._raw = {tensor.name: tensor for tensor in reader.tensors}
        for tensor in reader.tensors:
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise GGUFError(f"{path}: tensor {tensor.name} has type "
                                f"{tensor.tensor_type.name}: expected one of "
                                f"{[t.name for t in SUPPORTED_TYPES]}")
        self._hf_names = {name: _hf_name(name, path) for name in self._raw
                          if name not in _CONFIG_TENSORS}
        config_tensors = {name: self._tensor(name).dequantize() for name in _CONFIG_TENSORS
                          if name in self._raw}
        self._hf_config = build_hf_config(self, config_tensors)

    def metadata(self, key: str, default=...):
        """The value of metadata `key` (a str, number, bool or list); `default` when absent.

        Raises:
          GGUFError naming the file and key when it is absent and no default is given.
        """
        field = self._metadata.get(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing: it is required")
            return default
        if field.types and field.types[0].name == "ARRAY":
            return field.contents(slice(None))
        return field.contents()

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The GGUF names of every tensor in the file."""
        return tuple(self._raw)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The Hugging Face shape of GGUF tensor `name` (GGUF lists dimensions innermost first)."""
        if name not in self._raw:
            raise GGUFError(f"{self.path}: tensor {name} is missing: it is required")
        return tuple(int(dim) for dim in reversed(self._raw[name].shape.tolist()))

    def hf_config(self) -> dict:
        """The Hugging Face config.json this file amounts to (ModelConfig.from_hf reads it)."""
        return dict(self._hf_config)

    def generation_config(self) -> dict:
        """generation_config.json: BOS, every end-of-generation id, sampling defaults."""
        return generation_config(self)

    def tensors(self) -> Iterator[tuple[str, GGUFTensor]]:
        """Yields (Hugging Face name, tensor) for every weight, in file order."""
        for name, hf_name in self._hf_names.items():
            yield hf_name, self._tensor(name)

    def _tensor(self, name: str) -> GGUFTensor:
        raw, shape = self._raw[name], self.tensor_shape(name)
        row_order = None
        if self.architecture == "llama" and re.search(r"\.attn_[qk]\.", name):
            config = self._hf_config
            heads = config["num_attention_heads"] if ".attn_q." in name else (
                config["num_key_value_heads"])
            row_order = _rope_row_order(shape[0], heads, name, self.path)
        offset = -1.0 if self.architecture == "gemma" and name.endswith("norm.weight") else 0.0
        return GGUFTensor(name, raw.tensor_type, shape, raw.data, row_order, offset)


class _CheckedReader(GGUFReader):
    """GGUFReader that names the tensor a truncated file cuts off, or whose type it does not
    know, instead of failing on a reshape (it maps the whole file, then slices it per tensor)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            try:
                qtype = GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise GGUFError(f"tensor {name} has type number {int(raw_type[0])}, which "
                                f"llama.cpp's gguf package does not know") from None
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block_size
            if end > file_size:
                raise GGUFError(f"tensor {name} ends at byte {end}, past the end of the "
                                f"file ({file_size} bytes): the file is truncated")
        super()._build_tensors(start_offs, fields)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Opens a GGUF file (memory-mapped) and checks that Ember can load it.

    Raises:
      GGUFError: the file is missing, truncated or not GGUF; its architecture, a tensor type
        or a tensor name is not one Ember supports; a required metadata key is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: file not found")
    try:
        reader = _CheckedReader(path)
    except GGUFError as error:
        raise GGUFError(f"{path}: {error}") from None
    except (ValueError, IndexError, KeyError, OverflowError) as error:
        # The header is read field by field from the mapping; a cut-off header shows up as an
        # out-of-range read or a nonsense length.
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, expected "
                            f"b'GGUF')") from None
        raise GGUFError(f"{path}: the GGUF header is truncated or corrupt (the file has "
                        f"{path.stat().st_size} bytes; {error})") from None
    return GGUFCheckpoint(path, reader)


def _hf_name(name: str, path: Path) -> str:
    if match := _LAYER_TENSOR.fullmatch(name):
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif (match := _GLOBAL_TENSOR.fullmatch(name)) and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise GGUFError(f"{path}: tensor {name} has no Hugging Face counterpart in the "
                    f"architectures Ember supports")


def _rope_row_order(rows: int, heads: int, name: str, path: Path) -> np.ndarray:
    """i64[rows]: for each HF row of a q/k projection, its row in a llama.cpp `llama` file.

    HF rotates the pair (i, i + d/2) of each head; llama.cpp's converter regrouped each head's
    rows as (0, d/2, 1, d/2 + 1, ...) so that pairs are adjacent. HF row (h, half, i) is file
    row (h, i, half).
    """
    if rows % (2 * heads):
        raise GGUFError(f"{path}: tensor {name} has {rows} rows: expected a multiple of "
                        f"2 * {heads} heads")
    order = np.arange(rows).reshape(heads, rows // heads // 2, 2)
    return order.transpose(0, 2, 1).reshape(rows)


def write_hf_directory(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                       write_tokenizer: Callable[[Path, Path], None] | None = None) -> Path:
    """Writes a Hugging Face model directory from a GGUF file; backs `ember convert file.gguf`.

    Writes config.json, generation_config.json and model.safetensors (every weight dequantized
    to float32, one tensor in memory at a time).

    Args:
      write_tokenizer: called as write_tokenizer(gguf_path, out_dir) to add the tokenizer files
        (engine.tokenizer.gguf_tokenizer.write_tokenizer_files; models cannot import engine).

    Returns:
      out_dir.
    """
    checkpoint = read_gguf(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in (("config.json", checkpoint.hf_config()),
                          ("generation_config.json", checkpoint.generation_config())):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    _write_safetensors(out_dir / "model.safetensors", list(checkpoint.tensors()))
    if write_tokenizer is not None:
        write_tokenizer(Path(gguf_path), out_dir)
    return out_dir


def _write_safetensors(path: Path, tensors: list[tuple[str, GGUFTensor]]) -> None:
    """A float32 safetensors file written tensor by tensor, so that a model larger than the
    host's memory converts (safetensors' own writers take every tensor at once)."""
    header, start = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors:
        size = 4 * int(np.prod(tensor.shape))
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [start, start + size]}
        start += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)   # the format pads the header to 8 bytes
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for _, tensor in tensors:
            file.write(np.ascontiguousarray(tensor.dequantize(), dtype="<f4").tobytes())
