"""Loading and saving model weights: Hugging Face directories (safetensors) and orbax.

A model directory holds config.json, the weights (model.safetensors, or shards listed in
model.safetensors.index.json), optionally generation_config.json and the tokenizer files.
`convert_to_orbax` adds an `orbax/` checkpoint beside them, which `load_model` prefers.

Every source ends in `load_from_tensors` / models/assembly.py: the module is built
abstractly (no memory) and filled one tensor at a time, so the host never holds two full
copies of the weights. With a ShardingPlan (tensor parallelism), each device reads only its
own slice of each tensor from the file mapping (models/sharding.py), so no device holds the
whole model either; a quantized weight (int8/int4 at load, a GGUF file's blocks) is made on
the host one tensor at a time, and each device gets only its block of the weight's integer
arrays and scales, never a float copy. Names are Hugging Face's (`model.layers.{i}.…`)
whether the model scans its layers (stacked weights) or not; an orbax checkpoint holds the
structure of the model that wrote it, and loads into either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from gguf import GGMLQuantizationType

from models.assembly import (CheckpointError, ModelAssembly, abstract_model, hf_name,
                             is_linear_weight)
from models.config import ModelConfig
from models.dummy import dummy_model
from models.huge_pages import move_weights_to_huge_pages
from models.mapped import MappedArrayError, map_array, reserve_file_descriptors
from models.quantization import (GGUF_FORMATS, INT4, INT8, from_gguf_blocks,
                                 table_from_gguf_blocks)
from models.sharding import ShardingPlan
from models.transformer import Transformer

ORBAX_SUBDIR = "orbax"
# The linear layers quantization applies to (never embeddings nor the LM head).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZATIONS = (None, "none", "int8", "int4")   # load_model's `quantization`
LOAD_FORMATS = {"int8": INT8, "int4": INT4}     # ... quantized at load
WEIGHT_SOURCES = ("auto", "dummy")              # load_model's `load_format`
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
__all__ = ["CheckpointError", "abstract_model", "convert_to_orbax", "load_config",
           "load_from_tensors", "load_generation_config", "load_model", "save_safetensors"]


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def load_config(model_dir: str | os.PathLike, dtype: str | None = None, *,
                scan_layers: bool = True) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        return ModelConfig.from_hf(read_json(path), dtype=dtype, scan_layers=scan_layers)
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_generation_config(model_dir: str | os.PathLike) -> dict:
    """generation_config.json as a dict ({} when absent): eos_token_id, temperature, top_p..."""
    path = Path(model_dir) / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def load_model(model_dir: str | os.PathLike, dtype: str | None = None,
               plan: ShardingPlan | None = None, *, scan_layers: bool = True,
               quantization: str | None = None, load_format: str = "auto",
               huge_pages: bool = True) -> Transformer:
    """Loads a model directory (its orbax checkpoint when present, else its safetensors) or
    a GGUF file; or, with load_format="dummy", random weights for its config.json.

    Args:
      plan: tensor parallelism (made from this directory's config, `dtype` and
        `scan_layers`): the model is built with `plan.layout` and each weight placed on
        `plan.mesh` slice by slice.
      scan_layers: stack the layers' weights and scan them (ModelConfig.scan_layers).
      quantization: how the linear weights are held (EngineConfig.quantization): None, the
        checkpoint's own (a GGUF projection whose every layer is Q8_0, Q4_0 or Q4_1 keeps its
        blocks; anything else is float); "none", all float; "int8" / "int4", every
        projection quantized at load. Under a plan each device holds its block of every
        quantized weight (models/sharding.py); a row-parallel grouped weight (int4, Q8_0)
        whose groups would straddle two devices is a ValueError.
      load_format: "auto" reads the weights; "dummy" reads only config.json and draws every
        weight at random on the device(s) (models/dummy.py), in `dtype`, quantized as asked,
        and sharded under `plan`: no weight file need exist.
      huge_pages: on one CPU device, move the weights into transparent huge pages where the
        kernel has them (models/huge_pages.py: a decode of a few sequences reads them
        faster). False leaves them where loading put them: a converted checkpoint's weights
        stay mapped from its files (models/mapped.py), shared through the page cache.
    """
    model = _read_model(model_dir, dtype, plan, scan_layers, quantization, load_format)
    if huge_pages and plan is None:
        move_weights_to_huge_pages(model)
    return model


def _read_model(model_dir: str | os.PathLike, dtype: str | None, plan: ShardingPlan | None,
                scan_layers: bool, quantization: str | None, load_format: str) -> Transformer:
    model_dir = Path(model_dir)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS}")
    if load_format not in WEIGHT_SOURCES:
        raise ValueError(f"load_format={load_format!r}: expected one of {WEIGHT_SOURCES}")
    if load_format == "dummy" and not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: load_format='dummy' needs a model directory "
                              "with a config.json")
    if model_dir.suffix == ".gguf" and model_dir.is_file():
        return _load_gguf(model_dir, dtype, plan, scan_layers, quantization)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_config(model_dir, dtype, scan_layers=scan_layers)
    if plan is not None and plan.config != config:
        raise ValueError(f"the sharding plan is for {plan.config}, not for {model_dir} "
                         f"({config})")
    config = dataclasses.replace(config, quantization=_load_formats(quantization))
    if load_format == "dummy":
        return dummy_model(config, plan)
    if (model_dir / ORBAX_SUBDIR).is_dir():
        return _load_orbax(model_dir / ORBAX_SUBDIR, config, plan)
    return load_from_tensors(config, _safetensors_tensors(model_dir), source=model_dir,
                             plan=plan)


def load_from_tensors(config: ModelConfig, tensors: Iterable[tuple[str, object]], *,
                      source: str | os.PathLike, dtype: str | None = None,
                      plan: ShardingPlan | None = None) -> Transformer:
    """Builds a model from Hugging Face-named tensors in Hugging Face's orientation.

    Args:
      config: the model's config (its scan_layers picks the module structure).
      tensors: (name, tensor) pairs, e.g. ("model.layers.0.self_attn.q_proj.weight",
        [out, in]): linear weights as Hugging Face stores them ([out, in]), one tensor per
        layer. A tensor is a numpy array (a memory map is read only where needed) or a
        lazy slice (safetensors' `get_slice`); it is read once, when its pair comes.
        Names no weight wants (rotary buffers, a tied LM head's copy) are skipped.
      source: the file or directory named in errors.
      dtype: the weights' dtype, overriding config.dtype; tensors are cast to it.
      plan: tensor parallelism, made from the same config: each device reads its slices.

    Raises:
      CheckpointError naming the source and tensor for a shape that does not match the
      config, or the first missing weights.
    """
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    assembly = _assembly(config, plan)
    for name, tensor in tensors:
        assembly.add(name, tensor, transposed=is_linear_weight(name), source=source)
    return assembly.finish(source)


def _assembly(config: ModelConfig, plan: ShardingPlan | None) -> ModelAssembly:
    """An empty model of `config`; under a plan (made from the unquantized config, as the
    engine makes it) laid out for config.quantization as well."""
    if plan is not None and config.quantization:
        plan = plan.with_quantization(config.quantization)
    return ModelAssembly(config, plan)


def _load_formats(quantization: str | None) -> tuple:
    """config.quantization for "int8" / "int4" (every projection), else () (float)."""
    if quantization not in LOAD_FORMATS:
        return ()
    return tuple((projection, LOAD_FORMATS[quantization]) for projection in PROJECTIONS)


def _gguf_formats(tensors: Iterable[tuple[str, object]]) -> tuple:
    """config.quantization keeping a GGUF file's blocks: a projection whose every layer is
    Q8_0, or every layer Q4_0 / Q4_1, gets that format (int8 groups of 32 / int4, f16
    scales); one with another type in any layer (F16, K quants, ...) stays float, since a
    scanned model holds one format per projection."""
    seen: dict[str, set] = {}
    for name, tensor in tensors:
        parts = name.split(".")
        if parts[-1] == "weight" and parts[-2] in PROJECTIONS:
            seen.setdefault(parts[-2], set()).add(GGUF_FORMATS.get(tensor.qtype))
    return tuple((projection, seen[projection].pop()) for projection in PROJECTIONS
                 if len(seen.get(projection, ())) == 1 and None not in seen[projection])


def _load_gguf(path: Path, dtype: str | None, plan: ShardingPlan | None,
               scan_layers: bool, quantization: str | None) -> Transformer:
    """A GGUF file's weights (models/gguf.py): kept projections as their blocks, converted
    without a float round trip (`from_gguf_blocks`), the rest dequantized to float as each
    is placed (and quantized again for "int8" / "int4"). Kept on a CPU, a Q8_0 LM head (or
    the Q8_0 embedding a head is tied to) is held as its blocks too (ModelConfig.head_blocks),
    beside the float head."""
    from models.gguf import read_gguf

    checkpoint = read_gguf(path)
    config = ModelConfig.from_hf(checkpoint.hf_config(), dtype=dtype, scan_layers=scan_layers)
    if plan is not None and plan.config != config:
        raise ValueError(f"the sharding plan is for {plan.config}, not for {path} ({config})")
    kept = quantization is None
    formats = _gguf_formats(checkpoint.tensors()) if kept else _load_formats(quantization)
    head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    head = dict(checkpoint.tensors()).get(head_name)
    # The head keeps its Q8_0 blocks too, for the CPU kernel that reads them (one device:
    # under a plan XLA shards the head, which the kernel is not).
    head_blocks = (kept and plan is None and jax.default_backend() == "cpu"
                   and head is not None and head.qtype == GGMLQuantizationType.Q8_0
                   and config.hidden_size % 32 == 0 and head.offset == 0
                   and head.row_order is None)
    config = dataclasses.replace(config, quantization=formats, head_blocks=head_blocks)

    def weight(name: str, tensor):
        parts = name.split(".")
        if kept and parts[-1] == "weight" and config.linear_format(parts[-2]) is not None:
            return from_gguf_blocks(tensor.qtype, tensor.blocks, tensor.shape)
        return tensor.dequantize()

    def tensors():
        for name, tensor in checkpoint.tensors():
            yield name, weight(name, tensor)
            if head_blocks and name == head_name:
                q, scale = table_from_gguf_blocks(tensor.blocks, tensor.shape)
                yield "head_blocks.q", q
                yield "head_blocks.scale", scale

    return load_from_tensors(config, tensors(), source=path, plan=plan)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = [model_dir / "model.safetensors"]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weights file not found")
    return files


def _safetensors_tensors(model_dir: Path) -> Iterator[tuple[str, object]]:
    """Every tensor of the directory's files as a lazy slice: read only if it is wanted,
    and under a plan only the parts each device holds."""
    from safetensors import SafetensorError, safe_open

    for file in _safetensors_files(model_dir):
        try:
            with safe_open(file, framework="numpy") as tensors:
                for name in tensors.keys():
                    yield name, tensors.get_slice(name)
        except SafetensorError as error:
            raise CheckpointError(f"{file}: not a valid safetensors file ({error})") from None


def hf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """The model's weights as Hugging Face names them and lays them out: one tensor per
    layer, linear weights [out, in]; host numpy copies, one at a time."""
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = np.asarray(jax.device_get(variable[...]))
        stacked = model.config.scan_layers and path[:2] == ("model", "layers")
        rows = enumerate(array) if stacked else [(None, array)]
        for layer, row in rows:
            name = hf_name(path if layer is None else (*path[:2], layer, *path[2:]))
            yield name, np.ascontiguousarray(row.T if is_linear_weight(name) else row)


def save_safetensors(model: Transformer, hf_config: dict, out_dir: str | os.PathLike) -> None:
    """Writes a Hugging Face directory (config.json + model.safetensors) for `model`."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(hf_tensors(model)), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def convert_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     scan_layers: bool = True) -> Path:
    """`ember convert`: copies config and tokenizer files and writes the weights as orbax.

    Args:
      scan_layers: the structure written: stacked layer weights (what a scanning engine
        maps straight from the files) or one array per layer. Either loads either way.
    """
    import orbax.checkpoint as ocp

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    config = load_config(hf_dir, scan_layers=scan_layers)
    model = load_from_tensors(config, _safetensors_tensors(hf_dir), source=hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json",) + _TOKENIZER_FILES:
        if (hf_dir / name).is_file() and hf_dir.resolve() != out_dir.resolve():
            shutil.copy2(hf_dir / name, out_dir / name)
    target = out_dir / ORBAX_SUBDIR
    if target.exists():
        shutil.rmtree(target)
    # orbax warns through absl that it found no OCDBT data to merge: the layout we chose.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        with ocp.Checkpointer(_orbax_handler()) as checkpointer:
            checkpointer.save(target, args=ocp.args.PyTreeSave(
                nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    finally:
        absl_logger.setLevel(level)
    return out_dir


def _orbax_handler():
    """One uncompressed zarr v3 array per weight, without OCDBT: weights barely compress,
    and this layout lets `models.mapped` map each weight from its file instead of reading it
    (scripts/bench_load.py). orbax's own restore reads it like any other checkpoint."""
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True, use_compression=False)


def _load_orbax(path: Path, config: ModelConfig, plan: ShardingPlan | None = None
                ) -> Transformer:
    """Either structure (stacked layers or one array per layer) into either model."""
    tree = _orbax_tree(path)
    names = list(_flatten(tree))
    arrays = _map_orbax(path, names) or _restore_orbax(path, tree)
    assembly = _assembly(config, plan)
    for name in names:
        # The host copy (if any) goes as soon as the device has it.
        assembly.add(name, arrays.pop(name), transposed=False, source=path)
    return assembly.finish(path)


def _orbax_tree(path: Path):
    """The checkpoint's tree of array metadata (its structure, as saved)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.Checkpointer(_orbax_handler()) as checkpointer:
            metadata = checkpointer.metadata(path.absolute())
    except Exception as error:  # orbax raises many types for a damaged checkpoint
        raise CheckpointError(f"{path}: not a readable orbax checkpoint "
                              f"({type(error).__name__}: {str(error)[:300]})") from None
    metadata = getattr(metadata, "item_metadata", metadata)   # orbax >= 0.11 wraps the tree
    return getattr(metadata, "tree", metadata)


def _flatten(tree) -> dict[str, object]:
    """{name: leaf}, a name being the tree's keys joined by dots."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {hf_name(getattr(part, "key", part) for part in path): leaf for path, leaf in leaves}


def _map_orbax(path: Path, names: list[str]) -> dict[str, np.ndarray] | None:
    """Each weight memory-mapped from its file, or None when the checkpoint's layout needs
    orbax's restore. Beyond the file-descriptor budget a weight is copied, not kept mapped."""
    keep_mapped = reserve_file_descriptors(len(names))
    arrays = {}
    for number, name in enumerate(names):
        try:
            array = map_array(path / name)
        except MappedArrayError as error:
            raise CheckpointError(str(error)) from None
        if array is None:
            return None
        arrays[name] = array if number < keep_mapped else np.array(array)
    return arrays


def _restore_orbax(path: Path, tree) -> dict[str, np.ndarray]:
    """Every weight read into host memory by orbax's restore: any orbax layout works."""
    import orbax.checkpoint as ocp

    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    try:
        with ocp.Checkpointer(_orbax_handler()) as checkpointer:
            restored = checkpointer.restore(path.absolute(), args=ocp.args.PyTreeRestore(
                restore_args=restore_args))
    except Exception as error:  # orbax raises many types for a damaged checkpoint
        raise CheckpointError(f"{path}: orbax checkpoint cannot be restored "
                              f"({type(error).__name__}: {str(error)[:300]})") from None
    return _flatten(restored)
