"""Assembling a Transformer from named tensors, one tensor at a time.

Every weight source (safetensors, orbax, a GGUF file) ends up here as a stream of
(name, tensor) pairs. Names are Hugging Face's, one tensor per layer
(`model.layers.3.mlp.up_proj.weight`), or the stacked name of a scanned model
(`model.layers.mlp.up_proj.weight`, [num_layers, ...]) as an orbax checkpoint written by a
scanning engine holds it. Either kind fills either module structure:

  per-layer tensor -> unrolled model   placed as it is
  per-layer tensor -> scanned model    written into its layer's row of the stacked weight,
                                       on the device (the host holds one tensor at a time)
  stacked tensor   -> scanned model    placed as it is
  stacked tensor   -> unrolled model   each layer's row placed (a view: nothing copied)

With a ShardingPlan, each device reads only its slice of each tensor (models/sharding.py).

Quantized projections (config.quantization) take their HF-named weight as a float [out, in]
tensor (quantized here, on the host, one tensor at a time) or as a QuantizedWeight already
in [in, out] (GGUF blocks through `from_gguf_blocks`); its arrays fill the module's
`q`/`scale` or `packed`/`scale`/`minimum` parameters. Every array keeps the dtype the module
declares (int8/uint8 weights, f16/f32 scales): only float weights are cast to config.dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.quantization import QuantizedWeight, quantize
from models.sharding import ShardingPlan, zeros
from models.transformer import Transformer


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file and field."""


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The module's structure and parameter shapes, with no memory allocated."""
    # Large weights are shapes only; the few small vectors (norms, biases) of an unrolled
    # model are real constants.
    return nnx.split(Transformer(config, rngs=None))


def hf_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def is_linear_weight(name: str) -> bool:
    """Linear weights are [in, out] here and [out, in] in Hugging Face's files."""
    return name.endswith("_proj.weight") or name == "lm_head.weight"


@dataclass(slots=True)
class _Stacked:
    """A stacked weight being filled layer by layer."""

    array: jax.Array             # [num_layers, ...] on the device(s)
    layers: set[int]             # the layers written so far


class ModelAssembly:
    """One model being filled: `add` each tensor, then `finish`.

    Args:
      config: the checkpoint's config (under a plan the model is built with plan.layout).
      plan: tensor parallelism; None places every weight on the default device.
    """

    def __init__(self, config: ModelConfig, plan: ShardingPlan | None = None):
        if plan is not None and plan.config != config:
            raise ValueError(f"the sharding plan is for {plan.config}, not for {config}")
        self.plan = plan
        self.config = config
        self.num_layers = config.num_layers
        self.graphdef, state = abstract_model(config if plan is None else plan.layout)
        self.flat = dict(nnx.to_flat_state(state))
        self.whole = {hf_name(key): key for key in self.flat}   # name -> key, one tensor
        self.rows: dict[str, tuple[tuple, int]] = {}            # name -> (key, layer)
        if config.scan_layers:
            self.rows = {_layer_name(key, layer): (key, layer) for key in self.flat
                         if _is_layer_key(key) for layer in range(self.num_layers)}
        self.done: set[tuple] = set()
        self.stacked: dict[tuple, _Stacked] = {}

    def wants(self, name: str) -> bool:
        """Whether `name` fills a weight not filled yet (`add` skips the others: rotary
        buffers, a tied LM head's copy, a tensor given twice)."""
        if self._quantized_format(name) is not None:
            return self.wants(_field_name(name, "scale"))
        if name in self.whole:
            return self.whole[name] not in self.done
        if name in self.rows:
            key, layer = self.rows[name]
            return key not in self.done and layer not in self._layers_of(key)
        return any(self.wants(row) for row in self._rows_of(name))

    def add(self, name: str, tensor, *, transposed: bool, source: str | os.PathLike) -> None:
        """Places one tensor, or skips it when no weight wants it.

        Args:
          tensor: a numpy array (a memory map is read only where needed) or a lazy slice
            (a safetensors `get_slice`): anything with a shape that numpy indexing reads.
          transposed: the tensor is [out, in] (Hugging Face's linear weights).
          source: the file or checkpoint named in errors.
        """
        if not self.wants(name):
            if self._unknown_layer_tensor(name):
                # A layer's tensor the model has no place for (a bias config.json does not
                # switch on, say): skipping it would run a different model without a word.
                raise CheckpointError(f"{source}: tensor {name} is not a weight of the model "
                                      "config.json describes (a field it omits or gets "
                                      "wrong, or an unsupported variant)")
            return
        fmt = self._quantized_format(name)
        if fmt is not None:
            self._add_quantized(name, tensor, fmt, transposed, source)
        elif name in self.whole:
            key = self.whole[name]
            array = self._placed(key, tensor, tuple(self.flat[key].shape), name, transposed,
                                 source)
            self.flat[key] = self.flat[key].replace(array)
            self.done.add(key)
            self.stacked.pop(key, None)   # rows given before the whole stack: dropped
        elif name in self.rows:
            self._add_row(name, tensor, transposed, source)
        else:   # a stacked tensor, per layer here
            for layer, row in enumerate(self._rows_of(name)):
                self.add(row, _Row(tensor, layer), transposed=transposed, source=source)

    def finish(self, source: str | os.PathLike) -> Transformer:
        """The filled model.

        Raises:
          CheckpointError naming the first missing weights.
        """
        missing = []
        for key in self.flat:
            if key in self.done:
                continue
            if self.rows and _is_layer_key(key):
                filled = self._layers_of(key)
                missing += [_layer_name(key, layer) for layer in range(self.num_layers)
                            if layer not in filled]
            else:
                missing.append(hf_name(key))
        if missing:
            missing.sort()
            raise CheckpointError(f"{source}: weights missing from the checkpoint: "
                                  f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return nnx.merge(self.graphdef, nnx.from_flat_state(self.flat))

    def _quantized_format(self, name: str):
        """The QuantFormat the model holds the linear weight `name` in, or None (float)."""
        parts = name.split(".")
        if parts[-1] != "weight" or not _is_layer_key(tuple(parts)):
            return None
        return self.config.linear_format(parts[-2])

    def _add_quantized(self, name: str, tensor, fmt, transposed: bool, source) -> None:
        """A quantized projection's weight: a float tensor quantized here (a stacked one
        layer by layer), or a QuantizedWeight; each of its arrays fills its parameter."""
        parts = name.split(".")
        if not parts[2].isdigit():   # stacked [num_layers, ...]: one layer at a time
            for layer in range(self.num_layers):
                self.add(_layer_name(tuple(parts), layer), _Row(tensor, layer),
                         transposed=transposed, source=source)
            return
        if isinstance(tensor, QuantizedWeight):
            weight = tensor
        else:
            array = np.asarray(tensor[...], np.float32)
            weight = quantize(array.T if transposed else array, fmt)
        for field in dataclasses.fields(weight):
            self.add(_field_name(name, field.name), np.asarray(getattr(weight, field.name)),
                     transposed=False, source=source)

    def _dtype(self, key: tuple) -> jnp.dtype:
        """The dtype the module declares for `key` (int8/uint8 and scales keep theirs)."""
        return jnp.dtype(self.flat[key].get_value().dtype)

    def _add_row(self, name: str, tensor, transposed: bool, source) -> None:
        """Writes one layer's tensor into its row of the stacked weight, on the device."""
        key, layer = self.rows[name]
        shape = tuple(self.flat[key].shape)
        if key not in self.stacked:
            sharding = (None if self.plan is None else
                        self.plan.sharding(self.plan.spec(key, len(shape))))
            self.stacked[key] = _Stacked(zeros(shape, self._dtype(key), sharding), set())
        stacked = self.stacked[key]
        row = self._placed(key, tensor, shape[1:], name, transposed, source)
        # Without a plan the weights stay uncommitted (placed like jax.device_put's).
        sharding = None if self.plan is None else stacked.array.sharding
        stacked.array = _row_setter(sharding)(stacked.array, row, np.int32(layer))
        stacked.layers.add(layer)
        if len(stacked.layers) == self.num_layers:
            self.flat[key] = self.flat[key].replace(stacked.array)
            self.done.add(key)
            del self.stacked[key]

    def _layers_of(self, key: tuple) -> set[int]:
        stacked = self.stacked.get(key)
        return set() if stacked is None else stacked.layers

    def _unknown_layer_tensor(self, name: str) -> bool:
        """A decoder layer's tensor (`model.layers.N...` or stacked `model.layers...`) that
        fills no weight of this model; rotary buffers are not weights."""
        return (name.startswith("model.layers.") and not name.endswith("rotary_emb.inv_freq")
                and name not in self.whole and name not in self.rows
                and not self._rows_of(name) and self._quantized_format(name) is None)

    def _rows_of(self, name: str) -> list[str]:
        """The per-layer names of a stacked name (`model.layers.X`) whose weight is one
        tensor per layer here; [] for any other name."""
        key = tuple(name.split("."))
        if not _is_layer_key(key) or _layer_name(key, 0) not in self.whole:
            return []
        return [_layer_name(key, layer) for layer in range(self.num_layers)]

    def _placed(self, key: tuple, tensor, shape: tuple, name: str, transposed: bool,
                source) -> jax.Array:
        """The tensor as an array of `shape` (this model's orientation and layout)."""
        if self.plan is not None:
            _check_shape(_shape(tensor)[::-1] if transposed else _shape(tensor),
                         self.plan.checkpoint_shape(key, shape), name, source)
            return self.plan.place(key, tensor, shape, self._dtype(key), transposed=transposed)
        array = np.asarray(tensor[...])
        array = array.T if transposed else array
        _check_shape(array.shape, shape, name, source)
        # One tensor at a time goes to the device; the host copy is dropped right after. On
        # the CPU, jax adopts an aligned host buffer of the right dtype (a mapped file)
        # without a copy.
        if array.dtype == self._dtype(key):
            return jax.device_put(array)
        return jnp.asarray(array, dtype=self._dtype(key))


class _Row:
    """Row `layer` of a stacked tensor, read lazily (numpy indexing on the tensor)."""

    def __init__(self, tensor, layer: int):
        self.tensor, self.layer = tensor, layer
        self.shape = _shape(tensor)[1:]

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        return self.tensor[(self.layer, *index)]


def _field_name(weight_name: str, field: str) -> str:
    """`…q_proj.weight` -> `…q_proj.{field}` (a QuantizedLinear's array)."""
    return weight_name.rsplit(".", 1)[0] + "." + field


def _is_layer_key(key: tuple) -> bool:
    return len(key) > 2 and key[:2] == ("model", "layers")


def _layer_name(key: tuple, layer: int) -> str:
    return hf_name((*key[:2], layer, *key[2:]))


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.shape) if hasattr(tensor, "shape") else tuple(tensor.get_shape())


def _check_shape(shape: tuple, expected: tuple, name: str, source) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{source}: tensor {name} has shape {tuple(shape)}, expected "
                              f"{tuple(expected)} from config.json")


@functools.cache
def _row_setter(sharding):
    """stacked [L, ...], row, layer -> stacked with row `layer` replaced, in place (the
    stacked array is donated; on a mesh it keeps its sharding)."""
    def set_row(stacked, row, layer):
        return jax.lax.dynamic_update_index_in_dim(stacked, row.astype(stacked.dtype), layer, 0)

    placement = {} if sharding is None else dict(out_shardings=sharding)
    return jax.jit(set_row, donate_argnums=0, **placement)
