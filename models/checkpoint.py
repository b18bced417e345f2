"""Loading and saving model weights: Hugging Face directories (safetensors) and orbax.

A model directory holds config.json, the weights (model.safetensors, or shards listed in
model.safetensors.index.json), optionally generation_config.json and the tokenizer files.
`convert_to_orbax` adds an `orbax/` checkpoint beside them, which `load_model` prefers.

Loading builds the module abstractly (no memory) and fills it one tensor at a time, so the
host never holds two full copies of the weights. With a ShardingPlan (tensor parallelism),
each device reads only its own slice of each tensor from the file mapping
(models/sharding.py), so no device holds the whole model either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.mapped import MappedArrayError, map_array, reserve_file_descriptors
from models.sharding import ShardingPlan
from models.transformer import Transformer

ORBAX_SUBDIR = "orbax"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file and field."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def load_config(model_dir: str | os.PathLike, dtype: str | None = None) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        return ModelConfig.from_hf(read_json(path), dtype=dtype)
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_generation_config(model_dir: str | os.PathLike) -> dict:
    """generation_config.json as a dict ({} when absent): eos_token_id, temperature, top_p..."""
    path = Path(model_dir) / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The module's structure and parameter shapes, with no memory allocated."""
    # Large weights are shapes only; the few small vectors (norms, biases) are real zeros.
    return nnx.split(Transformer(config, rngs=None))


def hf_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _is_linear_weight(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def load_model(model_dir: str | os.PathLike, dtype: str | None = None,
               plan: ShardingPlan | None = None) -> Transformer:
    """Loads a model directory: its orbax checkpoint when present, else its safetensors.

    Args:
      plan: tensor parallelism (made from this directory's config and `dtype`): the model is
        built with `plan.layout` and each weight placed on `plan.mesh` slice by slice.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_config(model_dir, dtype)
    if plan is not None and plan.config != config:
        raise ValueError(f"the sharding plan is for {plan.config}, not for {model_dir} "
                         f"({config})")
    if (model_dir / ORBAX_SUBDIR).is_dir():
        return _load_orbax(model_dir / ORBAX_SUBDIR, config, plan)
    return _load_safetensors(model_dir, config, plan)


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


def _load_safetensors(model_dir: Path, config: ModelConfig,
                      plan: ShardingPlan | None = None) -> Transformer:
    from safetensors import SafetensorError, safe_open

    graphdef, state = abstract_model(config if plan is None else plan.layout)
    wanted = {hf_name(path): path for path, _ in nnx.to_flat_state(state)}
    flat = dict(nnx.to_flat_state(state))
    dtype = jnp.dtype(config.dtype)
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(file, framework="numpy") as tensors:
                for name in tensors.keys():
                    if name not in wanted:
                        continue  # e.g. rotary inv_freq buffers, or a tied lm_head copy
                    key, transposed = wanted.pop(name), _is_linear_weight(name)
                    if plan is not None:
                        source = tensors.get_slice(name)
                        shape = tuple(source.get_shape())
                        flat[key] = _placed(flat[key], source, shape[::-1] if transposed
                                            else shape, key, file, dtype, plan, transposed)
                        continue
                    array = tensors.get_tensor(name)
                    flat[key] = _checked(flat[key], array.T if transposed else array, name,
                                         file, dtype)
        except SafetensorError as error:
            raise CheckpointError(f"{file}: not a valid safetensors file ({error})") from None
    if wanted:
        missing = sorted(wanted)[:5]
        raise CheckpointError(f"{model_dir}: weights missing from the checkpoint: {missing}"
                              f"{' ...' if len(wanted) > 5 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_shape(shape: tuple, expected: tuple, name: str, file: Path) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(shape)}, expected "
                              f"{tuple(expected)} from config.json")


def _placed(abstract, source, shape: tuple, key: tuple, file: Path, dtype, plan: ShardingPlan,
            transposed: bool) -> nnx.Variable:
    """The tensor `source` (`shape` in the engine's orientation) placed on plan's mesh."""
    _check_shape(shape, plan.checkpoint_shape(key, tuple(abstract.shape)), hf_name(key), file)
    return abstract.replace(plan.place(key, source, tuple(abstract.shape), dtype,
                                       transposed=transposed))


def _checked(abstract, array: np.ndarray, name: str, file: Path, dtype) -> nnx.Variable:
    _check_shape(array.shape, abstract.shape, name, file)
    # One tensor at a time goes to the device; the host copy is dropped right after. On the
    # CPU, jax adopts an aligned host buffer of the right dtype (a mapped file) without a copy.
    if array.dtype == dtype:
        return abstract.replace(jax.device_put(array))
    return abstract.replace(jnp.asarray(array, dtype=dtype))


def save_safetensors(model: Transformer, hf_config: dict, out_dir: str | os.PathLike) -> None:
    """Writes a Hugging Face directory (config.json + model.safetensors) for `model`."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = hf_name(path)
        array = np.asarray(jax.device_get(variable[...]))
        tensors[name] = np.ascontiguousarray(array.T if _is_linear_weight(name) else array)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def convert_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """`ember convert`: copies config and tokenizer files and writes the weights as orbax."""
    import orbax.checkpoint as ocp

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    model = _load_safetensors(hf_dir, load_config(hf_dir))
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
    graphdef, state = abstract_model(config)   # the checkpoint's shapes, for orbax's restore
    if plan is not None:
        graphdef, layout_state = abstract_model(plan.layout)
    flat = dict(nnx.to_flat_state(state if plan is None else layout_state))
    dtype = jnp.dtype(config.dtype)
    arrays = _map_orbax(path, list(flat)) or _restore_orbax(path, state)
    for key, array in arrays.items():
        if plan is None:
            flat[key] = _checked(flat[key], array, hf_name(key), path, dtype)
        else:
            flat[key] = _placed(flat[key], array, array.shape, key, path, dtype, plan, False)
        arrays[key] = None  # the host copy (if any) goes as soon as the device has it
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _map_orbax(path: Path, keys: list[tuple]) -> dict[tuple, np.ndarray] | None:
    """Each weight memory-mapped from its file, or None when the checkpoint's layout needs
    orbax's restore. Beyond the file-descriptor budget a weight is copied, not kept mapped."""
    keep_mapped = reserve_file_descriptors(len(keys))
    arrays = {}
    for number, key in enumerate(keys):
        try:
            array = map_array(path / hf_name(key))
        except MappedArrayError as error:
            raise CheckpointError(str(error)) from None
        if array is None:
            return None
        arrays[key] = array if number < keep_mapped else np.array(array)
    return arrays


def _restore_orbax(path: Path, state: nnx.State) -> dict[tuple, np.ndarray]:
    """Every weight read into host memory by orbax's restore: any orbax layout works."""
    import orbax.checkpoint as ocp

    target = nnx.to_pure_dict(state)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        with ocp.Checkpointer(_orbax_handler()) as checkpointer:
            restored = checkpointer.restore(path.absolute(), args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args))
    except Exception as error:  # orbax raises many types for a damaged or mismatched tree
        raise CheckpointError(f"{path}: orbax checkpoint does not match config.json "
                              f"({type(error).__name__}: {str(error)[:300]})") from None
    return {key: _pop(restored, key) for key, _ in nnx.to_flat_state(state)}


def _pop(tree: dict, key: tuple) -> np.ndarray:
    for part in key[:-1]:
        tree = tree[part]
    return tree.pop(key[-1])
