"""Tensor parallelism: the mesh, the partition table of the transformer's parameters, and how
a checkpoint is laid out on the mesh (gpt-fast's and tpu-inference's habit: the model file stays
plain, and sharding is one table beside it).

Mesh axes ("data", "model") of shape (1, N). Linear weights are stored [in, out] (with a
leading [num_layers] axis, never split, when the layers are stacked for scanning):

  q/k/v_proj, gate/up_proj   column-parallel  weight P(None, "model"), bias P("model")
  o_proj, down_proj          row-parallel     weight P("model", None), bias replicated
  embed_tokens [V, H]        vocab-parallel   P("model", None)
  lm_head [H, V]             vocab-parallel   P(None, "model")
  norms                      replicated

A quantized projection (models/quantization.py) is split the same way: every array of a
column-parallel one (int8 q, int4 packed, scale, minimum) on its out axis 1; every array of a
row-parallel one on its in axis 0, except a per-channel scale (one row), which is replicated.
A group of 32 input rows never straddles two devices: `with_quantization` refuses a
row-parallel grouped weight whose rows per device are not a multiple of the group.

Under jit, XLA completes the plan from these shardings: one all-reduce after each row-parallel
matmul and one after the embedding lookup (each device looks up its rows, the others add 0).
Attention runs per device under shard_map (models/paged.py) on whole kv heads, so it needs none.

The layout on the mesh differs from the checkpoint in two ways, applied while loading:
  - the vocabulary is padded with zero rows (embedding) and columns (LM head) to a multiple of
    N; `gather_logits` cuts the padded logits off, so they never win a draw nor count in a
    logprob;
  - when N exceeds num_kv_heads (N a multiple of it), each kv head is repeated
    N / num_kv_heads times, as vLLM does: device d then holds the one kv head its query heads
    read, and the KV cache has N kv heads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig
from models.quantization import format_for

MODEL_AXIS = "model"
HEADS = P(None, MODEL_AXIS, None)                # q, k, v, attention out: [T, heads, D]
KV_PAGES = P(None, None, None, MODEL_AXIS, None)  # [L, num_pages, page_size, 2 * kv_heads, D]
KV_SCALES = P(None, None, None, MODEL_AXIS)       # 8-bit: [L, num_pages, page_size, 2 * kv_heads]

# (module, parameter) -> PartitionSpec; anything not listed (the norms) is replicated.
# "weight" is a float Linear's; q, packed, scale, minimum a QuantizedLinear's arrays.
_COLUMN, _ROW = P(None, MODEL_AXIS), P(MODEL_AXIS, None)
_COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_MODULES = ("o_proj", "down_proj")
_LINEAR_ARRAYS = ("weight", "q", "packed", "scale", "minimum")
PARTITION_TABLE: dict[tuple[str, str], P] = {
    **{(name, array): _COLUMN for name in _COLUMN_MODULES for array in _LINEAR_ARRAYS},
    **{(name, "bias"): P(MODEL_AXIS) for name in _COLUMN_MODULES},
    **{(name, array): _ROW for name in _ROW_MODULES for array in _LINEAR_ARRAYS},
    **{(name, "bias"): P() for name in _ROW_MODULES},
    ("embed_tokens", "weight"): _ROW,
    ("lm_head", "weight"): _COLUMN,
}
_VOCAB_MODULES = ("embed_tokens", "lm_head")
_KV_MODULES = ("k_proj", "v_proj")


def zeros(shape: tuple[int, ...], dtype, sharding: NamedSharding | None = None) -> jax.Array:
    """Zeros allocated where they live: with a sharding, each device only its own block."""
    return _zeros_program(tuple(shape), jnp.dtype(dtype), sharding)()


@functools.cache
def _zeros_program(shape, dtype, sharding):
    # Cached, so re-creating an array (a lost KV cache) reuses the compiled program.
    placement = {} if sharding is None else dict(out_shardings=sharding)
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), **placement)


def make_mesh(size: int) -> Mesh:
    """A ("data", "model") mesh of shape (1, size) over the first `size` devices."""
    devices = jax.devices()
    if size > len(devices):
        raise ValueError(f"tensor_parallel_size={size} but only {len(devices)} "
                         f"{jax.default_backend()} devices exist")
    return Mesh(np.asarray(devices[:size]).reshape(1, size), ("data", MODEL_AXIS))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """One model on one mesh: where every parameter lives and how it differs from the file.

    Attributes:
      mesh: axes ("data", "model"), shape (1, N).
      config: the checkpoint's config (the real vocabulary and kv heads).
      layout: the config of the model built on the mesh (padded vocabulary, repeated kv heads).
    """

    mesh: Mesh
    config: ModelConfig
    layout: ModelConfig

    @classmethod
    def create(cls, config: ModelConfig, size: int) -> ShardingPlan:
        """Checks that `config` splits `size` ways, then makes the mesh.

        Raises:
          ValueError naming both numbers when heads or the MLP do not split, or when fewer
          than `size` devices exist.
        """
        if config.num_heads % size:
            raise ValueError(f"num_heads={config.num_heads} is not a multiple of "
                             f"tensor_parallel_size={size}")
        kv_heads = config.num_kv_heads
        if kv_heads % size and size % kv_heads:
            raise ValueError(f"num_kv_heads={kv_heads} and tensor_parallel_size={size}: "
                             "expected one to be a multiple of the other")
        if config.intermediate_size % size:
            raise ValueError(f"intermediate_size={config.intermediate_size} is not a multiple "
                             f"of tensor_parallel_size={size}")
        layout = dataclasses.replace(config, vocab_size=-(-config.vocab_size // size) * size,
                                     num_kv_heads=max(kv_heads, size))
        return cls(make_mesh(size), config, layout)

    def with_quantization(self, formats: tuple) -> ShardingPlan:
        """This plan for a model whose projections are held in `formats` (a
        ModelConfig.quantization: ((projection, QuantFormat), ...)).

        Raises:
          ValueError naming the projection and its sizes when a row-parallel weight's groups
          (int4, or int8 in groups as GGUF's Q8_0) would straddle two devices.
        """
        size = self.mesh.size
        for projection, fmt in formats:
            if projection not in _ROW_MODULES:
                continue
            in_features = _row_in_features(self.config, projection)
            group = format_for(fmt, in_features).group
            if group is not None and (in_features // size) % group:
                raise ValueError(
                    f"{projection}: {fmt.kind} weights in groups of {group} input rows with "
                    f"in_features={in_features} over tensor_parallel_size={size} leave "
                    f"{in_features // size} rows per device, not a multiple of {group} (a "
                    "group would straddle two devices); expected quantization='int8' (per "
                    "channel) or 'none', or a tensor_parallel_size leaving a multiple of "
                    f"{group} rows")
        return dataclasses.replace(
            self, config=dataclasses.replace(self.config, quantization=formats),
            layout=dataclasses.replace(self.layout, quantization=formats))

    def spec(self, path: tuple, rank: int) -> P:
        """The PartitionSpec of the parameter at `path` (e.g. ('lm_head', 'weight')) with
        `rank` axes: a layer weight stacked for scanning has a leading layer axis more than
        the table's entry, and that axis is not split."""
        key = tuple(str(part) for part in path[-2:])
        if key[-1] == "scale" and key[0] in _ROW_MODULES and self._per_channel(key[0]):
            return P()   # one row, which every device's rows share
        spec = PARTITION_TABLE.get(key, P())
        if len(spec) and rank > len(spec):
            spec = P(*(None,) * (rank - len(spec)), *spec)
        return spec

    def sharding(self, spec: P = P()) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def gather_logits(self, logits: jax.Array) -> jax.Array:
        """Vocab-sharded f32[rows, V_padded] -> f32[rows, V] on every device (traced).

        The first constraint keeps the LM head's matmul local (without it XLA may gather the
        weight instead of the logits); the second gathers; the slice drops the padding.
        """
        logits = jax.lax.with_sharding_constraint(logits, self.sharding(P(None, MODEL_AXIS)))
        logits = jax.lax.with_sharding_constraint(logits, self.sharding())
        return logits[:, :self.config.vocab_size]

    def checkpoint_shape(self, path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape in the checkpoint (engine orientation) of a parameter of `shape` here."""
        axis = self._sharded_axis(path, len(shape))
        module = str(path[-2])
        if axis is None or module not in _VOCAB_MODULES + _KV_MODULES:
            return shape
        size = (self.config.vocab_size if module in _VOCAB_MODULES
                else self.config.num_kv_heads * self.config.head_dim)
        return shape[:axis] + (size,) + shape[axis + 1:]

    def place(self, path: tuple, source, shape: tuple[int, ...], dtype, *,
              transposed: bool) -> jax.Array:
        """One parameter of `shape` (this layout) on the mesh, each device reading only its
        own slice of `source`: the host holds one device's slice at a time.

        Args:
          source: indexable by a tuple of slices in the file's orientation: a safetensors
            slice (`get_slice`), a numpy memmap or array.
          transposed: the file stores the parameter transposed (HF linear weights, [out, in]).
        """
        def read(index: tuple[slice, ...]) -> np.ndarray:  # this device's block of `shape`
            wanted = [self._source_indices(path, len(shape), axis, index[axis], size)
                      for axis, size in enumerate(shape)]
            bounds = tuple(_bounds(indices) for indices in wanted)
            block = np.asarray(source[bounds[::-1] if transposed else bounds])
            block = (block.T if transposed else block).astype(dtype, copy=False)
            for axis, indices in enumerate(wanted):
                block = _gather(block, axis, indices - bounds[axis].start)
            return block

        return jax.make_array_from_callback(shape, self.sharding(self.spec(path, len(shape))),
                                            read)

    def _per_channel(self, projection: str) -> bool:
        """Whether the row-parallel `projection` holds int8 with one scale row."""
        fmt = self.layout.linear_format(projection)
        in_features = _row_in_features(self.layout, projection)
        return fmt is not None and format_for(fmt, in_features).group is None

    def _sharded_axis(self, path: tuple, rank: int) -> int | None:
        spec = tuple(self.spec(path, rank))
        return spec.index(MODEL_AXIS) if MODEL_AXIS in spec else None

    def _source_indices(self, path: tuple, rank: int, axis: int, index: slice, size: int
                        ) -> np.ndarray:
        """i64[n]: the checkpoint index of each layout index in `index`; -1 is padding."""
        target = np.arange(*index.indices(size))
        module = str(path[-2])
        if axis != self._sharded_axis(path, rank):
            return target
        if module in _VOCAB_MODULES:
            return np.where(target < self.config.vocab_size, target, -1)
        if module in _KV_MODULES:   # layout head h reads checkpoint head h // repeats
            head_dim = self.config.head_dim
            repeats = self.layout.num_kv_heads // self.config.num_kv_heads
            return target // head_dim // repeats * head_dim + target % head_dim
        return target


def _row_in_features(config: ModelConfig, projection: str) -> int:
    """The input size of a row-parallel projection (the axis its weights split on)."""
    return config.num_heads * config.head_dim if projection == "o_proj" else (
        config.intermediate_size)


def _bounds(indices: np.ndarray) -> slice:
    real = indices[indices >= 0]
    return slice(int(real.min()), int(real.max()) + 1) if real.size else slice(0, 0)


def _gather(block: np.ndarray, axis: int, offsets: np.ndarray) -> np.ndarray:
    """block's slices at `offsets` along `axis` (negative: zeros); no copy when in order."""
    if offsets.size == block.shape[axis] and np.array_equal(offsets, np.arange(offsets.size)):
        return block
    zero = np.zeros(block.shape[:axis] + (1,) + block.shape[axis + 1:], block.dtype)
    padded = np.concatenate([block, zero], axis=axis)
    return np.take(padded, np.where(offsets >= 0, offsets, block.shape[axis]), axis=axis)
