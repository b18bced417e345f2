"""Weight-only quantization: linear weights kept int8 or int4 in memory, dequantized a block of
rows at a time inside the step (gpt-fast's habit: a pass over the model, the model file plain).

Layouts, for a linear weight of logical shape [in, out] (Ember's orientation, `x @ w`). Every
array's axis 0 runs along `in` and axis 1 along `out`; a scale row covers `group` consecutive
input rows. All values are exact in float32: w = dequantize(weight).

  Int8Weight   q      i8[in, out]                     w[i, o] = q[i, o] * scale[i // group, o]
               scale  f32|f16[in // group, out]       group = in (one row: symmetric per
                                                      output channel, `quantize_int8`), or 32
                                                      (GGUF Q8_0: one f16 `d` per 32 inputs)
  Int4Weight   packed u8[in // 2, out]                q in 0..15, two per byte along `in`
               scale  f32|f16[in // 32, out]          w = q * scale + minimum, per group of 32
               minimum f32|f16[in // 32, out]         (GGUF Q4_1's form: d, m; Q4_0's
                                                      w = d * (q - 8) is scale d, minimum -8d)

  Nibbles (GGUF's own order, so a block lands by a transpose): for group g and j in 0..15,
  packed[16 g + j, o] holds q[32 g + j, o] in its low nibble and q[32 g + 16 + j, o] in its
  high nibble.

Scales are f32 when quantized here from a float checkpoint and f16 (the file's own bits, no
conversion) when taken from GGUF blocks; both widen to f32 exactly. Bytes per weight: int8
per channel ~1, Q8_0 form 1.0625, int4 from GGUF 0.625, int4 from a float checkpoint 0.75.

Sharding (models/sharding.py): column-parallel splits axis 1 of every array; row-parallel
splits axis 0, so each shard's `in` must be a multiple of 32 for a grouped weight (a group
never straddles two devices; ShardingPlan.with_quantization refuses one that would), and a
per-channel scale (one row) is replicated. The CPU loop below interleaves its blocks so that
a row-parallel weight needs no gather (with 256-row blocks, for up to 8 devices).

The step (`quantized_matmul`) computes x @ w from the same dequantized values, a block of
`block_rows` input rows at a time, accumulating in f32: it equals x @ dequantize(w) up to f32
summation order (Q4_1/Q4_0/Q8_0 blocks give gguf's own dequantized values bit for bit).
On XLA CPU a convert is never fused into a dot, so x @ dequantize(w) materialises the whole
f32 [in, out] every call; per-group einsums materialise [in / 32, 32, out], a fused
multiply-reduce is slow (XLA CPU's column reductions), and int8 activations x int8 weights
materialise s32 [in, out] and change the numerics. A loop over blocks of 256 rows builds one
block at a time. Batch 1 at 4096 x 14336, best of 5, ranges over runs on 2 cores shared with
other jobs (scripts/bench_quant_matmul.py): f32 dense 9-31 ms; the loop 10-20 ms (int8, Q8_0,
Q4_1), 15-23 ms (int4 from floats); every materialising form 215-5400 ms. At 576 x 1536 all
forms are within noise of each other (0.1-0.3 ms; the weight fits in cache).
So a CPU loops (`default_block_rows`), except for a decode's rows (up to 8) on a lone CPU
device, which go to a C++ kernel through the XLA FFI (pallas_kernels/cpu/quantized_matmul.cc:
the weights converted in registers and folded into per-group sums, read at 31-37 GB/s):
SmolLM2's int4 batch-1 decode 57.9 -> 104.5 -> 112-116 tok/s on this project's CPU (README,
docs/perf.md). It beats the loop up to 64 rows (2-4x at 1-8) and ties it at 512; more rows
than 8 keep the loop, which gave the same 64-request throughput. Under scan the kernel reads
the layer out of the stacked arrays in place (models/layer_slice.py). A weight whose f32 form
fits CPU_ONE_DOT_BYTES (16 MB: every SmolLM2 projection, not an 8B model's) is one dot, not
a loop: its converted copy is a temporary that small, and SmolLM2's 64 requests (prompts of
8,192 tokens, the loop's blocks of 192-256 rows) ran 20-30% faster so (docs/perf.md).
A GPU or TPU gets one dot over the whole expression
(block_rows = in), the form XLA fuses into its GEMM (the convert in the operand's prologue)
instead of a loop of small GEMVs. Under scan that dot reads a copied slice of the stacks: on
an H200 (2026-11-30, docs/perf.md) Llama-3-8B's batch-1 decode ran 84.1 tok/s in int8 and
72.2 in int4, no faster than bf16's 81.6. So on one GPU a scanned layer's product of a
decode's few rows goes to the Pallas layer matmul (pallas_kernels/gpu/layer_matmul.py),
which reads the int8 or int4 arrays in place and converts them in registers; not yet run on
a GPU (lowered for CUDA and interpreted on the CPU: tests/pallas_kernels/test_layer_matmul.py).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from models.layer_slice import NO_HINTS, ProductHints, stack_and_layer
from pallas_kernels.gpu.kernel_choice import layer_matmul_wanted
from pallas_kernels.gpu.layer_matmul import supported_quantized

GROUP = 32            # int4 group, and GGUF's Q8_0/Q4_0/Q4_1 block size
CPU_BLOCK_ROWS = 256  # rows of `in` per loop step on a CPU (module docstring)
CPU_ONE_DOT_BYTES = 16 << 20   # a weight whose f32 form is no larger is one dot on a CPU
CPU_KERNEL_MAX_ROWS = 8   # x rows up to which a lone CPU uses the C++ kernel (_cpu_kernel_takes)


@dataclasses.dataclass(slots=True, frozen=True)
class Int8Weight:
    q: jax.Array        # i8[in, out]
    scale: jax.Array    # f32|f16[in // group, out]; group = in (per channel) or 32 (Q8_0)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


@dataclasses.dataclass(slots=True, frozen=True)
class Int4Weight:
    packed: jax.Array   # u8[in // 2, out]; low nibble q[32g + j], high q[32g + 16 + j]
    scale: jax.Array    # f32|f16[in // 32, out]
    minimum: jax.Array  # f32|f16[in // 32, out]

    @property
    def shape(self) -> tuple[int, int]:
        return (2 * self.packed.shape[0], self.packed.shape[1])


QuantizedWeight = Int8Weight | Int4Weight
for _cls in (Int8Weight, Int4Weight):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[])


@dataclasses.dataclass(slots=True, frozen=True)
class QuantFormat:
    """What a module is built with before its weights arrive (shapes and dtypes only)."""

    kind: Literal["int8", "int4"]
    group: int | None        # input rows per scale row; None: all of them (per channel)
    scale_dtype: str         # "float32" (quantized here) or "float16" (GGUF blocks)

    def __post_init__(self):
        if self.kind not in ("int8", "int4"):
            raise ValueError(f"kind={self.kind!r}: expected 'int8' or 'int4'")
        if self.kind == "int4" and self.group != GROUP:
            raise ValueError(f"int4 group={self.group}: expected {GROUP}")

    def abstract(self, in_features: int, out_features: int) -> QuantizedWeight:
        """The weight's arrays as jax.ShapeDtypeStruct (no memory), for a module built empty."""
        _check_rows(self.kind, (in_features, out_features), self.group)
        spec = lambda rows, dtype: jax.ShapeDtypeStruct((rows, out_features), jnp.dtype(dtype))
        scale = spec(in_features // (self.group or in_features), self.scale_dtype)
        if self.kind == "int8":
            return Int8Weight(spec(in_features, jnp.int8), scale)
        return Int4Weight(spec(in_features // 2, jnp.uint8), scale, scale)


INT8 = QuantFormat("int8", None, "float32")     # quantization="int8" on a float checkpoint
INT4 = QuantFormat("int4", GROUP, "float32")    # quantization="int4" on a float checkpoint
GGUF_FORMATS = {GGMLQuantizationType.Q8_0: QuantFormat("int8", GROUP, "float16"),
                GGMLQuantizationType.Q4_0: QuantFormat("int4", GROUP, "float16"),
                GGMLQuantizationType.Q4_1: QuantFormat("int4", GROUP, "float16")}


def _check_rows(kind: str, shape: tuple[int, ...], group: int | None) -> None:
    if len(shape) != 2 or (group is not None and shape[0] % group) or (
            kind == "int4" and group != GROUP):
        raise ValueError(f"{kind} weight shape={tuple(shape)} (in, out): expected 2-d with in a "
                         f"multiple of the group, {group}")


def quantize_int8(w: np.ndarray, group: int | None = None) -> Int8Weight:
    """Symmetric int8 of a float [in, out] weight: per output channel (group None) or per
    `group` input rows; q = round(w / scale) in -127..127, scale = max|w| / 127."""
    w = np.asarray(w, np.float32)
    _check_rows("int8", w.shape, group)
    rows = w.reshape(-1, group or w.shape[0], w.shape[1])           # [in // group, group, out]
    scale = np.abs(rows).max(axis=1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))                # an all-zero group: q = 0
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return Int8Weight(q.reshape(w.shape), scale)


def quantize_int4(w: np.ndarray) -> Int4Weight:
    """Asymmetric int4 of a float [in, out] weight, per group of 32 input rows (Q4_1's rule):
    minimum = the group's min, scale = (max - min) / 15, q = round((w - min) / scale).

    Raises ValueError when in is not a multiple of 32 (`quantize` falls back to int8 then).
    """
    w = np.asarray(w, np.float32)
    _check_rows("int4", w.shape, GROUP)
    groups = w.reshape(-1, GROUP, w.shape[1])                       # [in // 32, 32, out]
    minimum = groups.min(axis=1)
    scale = (groups.max(axis=1) - minimum) / np.float32(15)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint((groups - minimum[:, None]) / safe[:, None]), 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))                 # [in // 32, 16, out]
    return Int4Weight(packed.reshape(-1, w.shape[1]), scale, minimum)


def quantize(w: np.ndarray, quantization: QuantFormat | str) -> QuantizedWeight:
    """A float [in, out] weight in `format_for(quantization, in)`."""
    fmt = format_for(quantization, np.shape(w)[0])
    if fmt.kind == "int4":
        weight = quantize_int4(w)
    else:
        weight = quantize_int8(w, fmt.group)
    if fmt.scale_dtype == "float32":
        return weight
    return jax.tree.map(lambda a: a.astype(fmt.scale_dtype) if a.dtype.kind == "f" else a, weight)


def format_for(quantization: QuantFormat | str, in_features: int) -> QuantFormat:
    """The format a weight with `in_features` input rows gets for `quantization` ("int8",
    "int4" or a QuantFormat): int4 of an `in` that is not a multiple of 32 falls back to int8
    per channel (every architecture Ember runs has hidden and MLP sizes that are multiples of
    32; this keeps an odd one loadable rather than refusing the model)."""
    formats = {"int8": INT8, "int4": INT4}
    if not isinstance(quantization, QuantFormat) and quantization not in formats:
        raise ValueError(f"quantization={quantization!r}: expected one of {sorted(formats)}")
    fmt = formats.get(quantization, quantization)
    return INT8 if fmt.kind == "int4" and in_features % GROUP else fmt


def format_of(weight: QuantizedWeight) -> QuantFormat:
    """The QuantFormat of an (abstract or concrete) weight."""
    in_features, scale_rows = weight.shape[0], weight.scale.shape[0]
    kind = "int8" if isinstance(weight, Int8Weight) else "int4"
    group = None if kind == "int8" and scale_rows == 1 else in_features // scale_rows
    return QuantFormat(kind, group, jnp.dtype(weight.scale.dtype).name)


def from_gguf_blocks(qtype: GGMLQuantizationType | int, blocks: np.ndarray,
                     shape_out_in: tuple[int, int]) -> QuantizedWeight:
    """A GGUF Q8_0/Q4_0/Q4_1 tensor, straight from its block bytes into the [in, out] layout.

    Args:
      qtype: the tensor's GGMLQuantizationType.
      blocks: u8[out, in // 32 * bytes_per_block], as GGUFReader gives a tensor's data (rows
        are output channels, blocks run along `in`); any shape with that many bytes.
      shape_out_in: (out, in), the tensor's logical shape in numpy order.
    Returns:
      Int8Weight (Q8_0) or Int4Weight (Q4_0, Q4_1) with the file's f16 scales; only
      transposes, views and for Q4_0 minimum = -8 * d: dequantize() gives gguf's values.
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in GGUF_FORMATS:
        raise ValueError(f"qtype={qtype.name}: expected one of "
                         f"{[t.name for t in GGUF_FORMATS]}")
    out_features, in_features = shape_out_in
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    num_blocks = in_features // block_size
    expected = out_features * num_blocks * block_bytes
    if in_features % block_size or blocks.dtype != np.uint8 or blocks.size != expected:
        raise ValueError(f"{qtype.name} blocks {blocks.dtype}{list(blocks.shape)} for "
                         f"shape_out_in={tuple(shape_out_in)}: expected {expected} uint8 bytes "
                         f"and in a multiple of {block_size}")
    cells = np.ascontiguousarray(blocks).reshape(out_features, num_blocks, block_bytes)
    to_in_out = lambda a: np.ascontiguousarray(a.T)                 # [out, n] -> [n, out]
    scale = to_in_out(cells[..., 0:2].view(np.float16)[..., 0])     # f16[in // 32, out]
    if qtype == GGMLQuantizationType.Q8_0:
        return Int8Weight(to_in_out(cells[..., 2:].view(np.int8).reshape(out_features, -1)),
                          scale)
    if qtype == GGMLQuantizationType.Q4_0:
        minimum, nibbles = scale * np.float16(-8), cells[..., 2:]     # exact: a power of two
        if not np.isfinite(minimum[np.isfinite(scale)]).all():
            raise ValueError(f"Q4_0 scales up to {np.abs(scale).max()}: the minimum -8 * d "
                             "overflows f16 (expected |d| <= 8188)")
    else:
        minimum, nibbles = to_in_out(cells[..., 2:4].view(np.float16)[..., 0]), cells[..., 4:]
    packed = np.ascontiguousarray(nibbles.transpose(1, 2, 0)).reshape(-1, out_features)
    return Int4Weight(packed, scale, minimum)


def table_from_gguf_blocks(blocks: np.ndarray, shape: tuple[int, int]
                           ) -> tuple[np.ndarray, np.ndarray]:
    """A GGUF Q8_0 table (an embedding, [rows, hidden]) in its own order, table_matmul's
    operands: (q i8[rows, hidden], scale f16[rows, hidden / 32]), the file's values.

    Raises:
      ValueError naming the shape when `blocks` are not Q8_0 blocks of it.
    """
    rows, hidden = shape
    if hidden % GROUP or blocks.dtype != np.uint8 or blocks.size != rows * hidden // GROUP * 34:
        raise ValueError(f"Q8_0 blocks {blocks.dtype}{list(blocks.shape)} for shape="
                         f"{tuple(shape)}: expected {rows * hidden // GROUP * 34} uint8 bytes "
                         f"and hidden a multiple of {GROUP}")
    cells = np.ascontiguousarray(blocks).reshape(rows, hidden // GROUP, 34)
    return (np.ascontiguousarray(cells[..., 2:]).view(np.int8).reshape(rows, hidden),
            np.ascontiguousarray(cells[..., 0:2]).view(np.float16)[..., 0])


def _dequantize_rows(weight: QuantizedWeight) -> tuple[jax.Array, ...]:
    """f32 weights of a block of rows, grouped: ([groups, rows_per_group, out], ...) for int8;
    (low [groups, 16, out], high [groups, 16, out]) for int4, the rows 0..15 and 16..31 of
    each group, kept apart so that no concatenate sits between the unpack and the dot."""
    out_features, scale_rows = weight.shape[1], weight.scale.shape[0]
    scale = weight.scale.astype(jnp.float32)[:, None]               # [groups, 1, out]
    if isinstance(weight, Int8Weight):
        q = weight.q.reshape(scale_rows, -1, out_features).astype(jnp.float32)
        return (q * scale,)
    packed = weight.packed.reshape(scale_rows, GROUP // 2, out_features)
    minimum = weight.minimum.astype(jnp.float32)[:, None]
    low = (packed & 15).astype(jnp.float32) * scale + minimum
    return low, (packed >> 4).astype(jnp.float32) * scale + minimum


def dequantize(weight: QuantizedWeight) -> jax.Array:
    """f32[in, out]: the weight's exact values (for tests and checks, never the step)."""
    return jnp.concatenate(_dequantize_rows(weight), axis=1).reshape(weight.shape)


def default_block_rows(weight: QuantizedWeight, backend: str | None = None) -> int:
    """Input rows per step of the loop: all of them off a CPU (one dot for XLA to fuse), and on
    a CPU for a weight whose f32 form fits CPU_ONE_DOT_BYTES (one dot, its converted copy a
    passing temporary: SmolLM2's 64 requests ran 20-30% faster so than in blocks); otherwise
    the largest multiple of 32 up to CPU_BLOCK_ROWS that divides `in` (all of them when `in`
    is not a multiple of 32). backend: a jax platform name, None: jax.default_backend()."""
    in_features, out_features = weight.shape
    if ((backend or jax.default_backend()) != "cpu"
            or in_features * out_features * 4 <= CPU_ONE_DOT_BYTES):
        return in_features
    for rows in range(CPU_BLOCK_ROWS - CPU_BLOCK_ROWS % GROUP, 0, -GROUP):
        if in_features % rows == 0:
            return rows
    return in_features


def check_weight(weight: QuantizedWeight) -> None:
    """Raises ValueError naming the arrays when their shapes do not make one [in, out] weight."""
    shapes = {f.name: tuple(getattr(weight, f.name).shape) for f in dataclasses.fields(weight)}
    int4 = isinstance(weight, Int4Weight)
    if all(len(shape) == 2 for shape in shapes.values()):
        in_features, out_features = weight.shape
        rows = in_features // GROUP if int4 else shapes["scale"][0]     # scale rows
        if (rows and in_features % rows == 0 and not (int4 and in_features % GROUP)
                and shapes[dataclasses.fields(weight)[0].name][1] == out_features
                and all(shapes[name] == (rows, out_features)
                        for name in ("scale", "minimum") if name in shapes)):
            return
    raise ValueError(f"{type(weight).__name__} arrays {shapes}: expected 2-d [rows, out] "
                     f"arrays, the scale's rows dividing in{' (in // 32, with minimum)' * int4}")


def quantized_matmul(x: jax.Array, weight: QuantizedWeight, *, block_rows: int | None = None,
                     layer: jax.Array | None = None, gpu_layer_matmul: bool = False
                     ) -> jax.Array:
    """x @ dequantize(weight), in blocks of input rows, never a large float weight.

    Args:
      x: [..., in], f32 or bf16; each block of weights is cast to x.dtype, products
        accumulate in f32.
      weight: Int8Weight or Int4Weight of shape [in, out].
      block_rows: input rows per loop step, a multiple of 32 dividing in (None:
        `default_block_rows`; in: one dot).
      layer: with it (i32[]), weight's arrays are every layer's stacked on a leading axis
        and layer `layer` is taken: read in place by the CPU kernel (and, with
        gpu_layer_matmul, the GPU layer matmul), sliced out otherwise (models/layer_slice.py).
      gpu_layer_matmul: whether a decode's few rows may take the GPU layer matmul
        (ProductHints.gpu_layer_matmul).
    Returns:
      [..., out] in x.dtype.
    """
    stacked = weight
    if layer is not None:   # unused, and dropped by XLA, where the kernel takes the stack
        weight = type(weight)(**{f.name: jax.lax.dynamic_index_in_dim(
            getattr(weight, f.name), layer, keepdims=False) for f in dataclasses.fields(weight)})
    check_weight(weight)
    in_features, out_features = weight.shape
    rows = block_rows or default_block_rows(weight)
    if x.shape[-1] != in_features or (rows != in_features and (rows % GROUP or in_features % rows)):
        raise ValueError(f"x.shape={x.shape}, weight.shape={weight.shape}, {block_rows=}: "
                         f"expected x [..., {in_features}] and block rows a multiple of {GROUP} "
                         f"dividing {in_features}")
    tokens = x.reshape(-1, in_features)                              # [T, in]
    # The stacks as stored, for the kernels that read the layer in place.
    arrays = tuple(getattr(stacked, f.name) for f in dataclasses.fields(stacked))
    if block_rows is None and gpu_layer_matmul and _gpu_kernel_takes(tokens, weight, layer):
        from pallas_kernels.gpu.layer_matmul import quantized_layer_matmul_gpu
        product = quantized_layer_matmul_gpu(tokens, arrays, layer, kind=format_of(weight).kind)
    elif block_rows is None and _cpu_kernel_takes(tokens):
        from pallas_kernels.cpu import quantized_matmul_cpu
        product = quantized_matmul_cpu(tokens.astype(jnp.float32), *arrays, layer=layer)
    elif rows == in_features:
        product = _block_product(tokens, weight)
    else:
        product = _blocked_product(tokens, weight, rows)
    return product.astype(x.dtype).reshape(*x.shape[:-1], out_features)


def _gpu_kernel_takes(tokens: jax.Array, weight: QuantizedWeight,
                      layer: jax.Array | None) -> bool:
    """Whether a scanned layer's product of a decode's few rows reads its weight in place
    on the GPU (pallas_kernels/gpu/layer_matmul.py) rather than XLA's dot over a copied
    slice of the stack (models/layer_slice.py). weight: the layer's (its shapes)."""
    if layer is None or not layer_matmul_wanted(tokens.shape[0]):
        return False
    in_features, out_features = weight.shape
    return supported_quantized(tokens.shape[0], format_of(weight).kind, in_features,
                               out_features, weight.scale.shape[0])


def _cpu_kernel_takes(tokens: jax.Array) -> bool:
    """Whether the C++ kernel (pallas_kernels/cpu/quantized_matmul.cc) computes this product:
    a decode's few rows on a lone CPU device where the kernels build. It folds each group's
    conversion into the sums in registers, where XLA converts a block to f32 in memory before
    each small dot; prompts (more rows) stay on the loop's dots. One device only: under a
    mesh the product is sharded by XLA, which a custom call is not."""
    if tokens.shape[0] > CPU_KERNEL_MAX_ROWS or jax.default_backend() != "cpu":
        return False
    if jax.device_count() != 1:
        return False
    from pallas_kernels.cpu import available
    return available()


def quantize_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [rows, hidden] table (hidden a multiple of 32) in Q8_0's form, one row each: (q
    i8[rows, hidden], scale f32[rows, hidden / 32]), each block of 32 scaled by its own
    largest magnitude; table_matmul's operands."""
    weight = quantize_int8(np.asarray(table, np.float32).T, GROUP)
    return np.ascontiguousarray(np.asarray(weight.q).T), np.ascontiguousarray(
        np.asarray(weight.scale).T)


def table_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array | None:
    """f32[..., rows] = x [..., hidden] @ the table's transpose, for a table held as Q8_0
    blocks one row each (q i8[rows, hidden], scale f32|f16[rows, hidden / 32]; an LM head's
    copy of a GGUF file's Q8_0 head or tied embedding table): through the C++ kernel
    (pallas_kernels/cpu/table_matmul.cc) where it takes x's rows (a decode's few, on a lone
    CPU device), else None: the caller multiplies by its float table.

    Raises:
      ValueError naming the shapes when they do not make one table of x's width.
    """
    rows, hidden = q.shape if q.ndim == 2 else (0, 0)
    if (not hidden or x.shape[-1] != hidden or hidden % GROUP
            or tuple(scale.shape) != (rows, hidden // GROUP)):
        raise ValueError(f"x.shape={x.shape}, q.shape={q.shape}, scale.shape={scale.shape}: "
                         f"expected x [..., hidden], q [rows, hidden], scale [rows, hidden / "
                         f"{GROUP}], hidden a multiple of {GROUP}")
    tokens = x.reshape(-1, hidden)
    if not _cpu_kernel_takes(tokens):
        return None
    from pallas_kernels.cpu import table_matmul_cpu
    return table_matmul_cpu(tokens.astype(jnp.float32), q, scale).reshape(*x.shape[:-1], rows)


def _blocked_product(tokens: jax.Array, weight: QuantizedWeight, rows: int) -> jax.Array:
    """f32[T, out]: a loop over num_blocks blocks of `rows` input rows, each made of
    rows / 32 pieces of 32 rows taken num_blocks pieces apart (block b holds pieces b,
    b + num_blocks, ...). Interleaved rather than contiguous, so that on a row-parallel mesh
    every device works on its own pieces at every step (one all-reduce at the end, as for one
    dot) instead of the loop gathering each block from the device that holds it."""
    in_features, out_features = weight.shape
    pieces, num_blocks = rows // GROUP, in_features // rows
    arrays = {f.name: getattr(weight, f.name) for f in dataclasses.fields(weight)}
    # A per-channel scale (one row) is every block's scale; the rest splits into pieces.
    shared = {name: a for name, a in arrays.items() if a.shape[0] == 1}
    split = {name: a.reshape(pieces, num_blocks, -1, out_features)  # [pieces, blocks, .., out]
             for name, a in arrays.items() if name not in shared}
    x_split = tokens.reshape(-1, pieces, num_blocks, GROUP)          # [T, pieces, blocks, 32]

    def step(block, total):
        take = lambda a, axis: jax.lax.dynamic_index_in_dim(a, block, axis, keepdims=False)
        part = {name: take(a, 1).reshape(-1, out_features) for name, a in split.items()}
        x_block = take(x_split, 2).reshape(-1, rows)                 # [T, rows]
        return total + _block_product(x_block, type(weight)(**part, **shared))

    start = jnp.zeros((tokens.shape[0], out_features), jnp.float32)
    return jax.lax.fori_loop(0, num_blocks, step, start)


def _block_product(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """f32[T, out] = x [T, rows] @ the block's dequantized weights [rows, out]."""
    parts = _dequantize_rows(weight)             # each [groups, rows_per_part, out]
    x = x.reshape(x.shape[0], parts[0].shape[0], len(parts), -1)    # [T, groups, parts, k]
    return sum(jnp.einsum("tgk,gko->to", x[:, :, i], part.astype(x.dtype),
                          preferred_element_type=jnp.float32) for i, part in enumerate(parts))


class QuantizedLinear(nnx.Module):
    """models.transformer.Linear with its weight kept quantized: x @ w (+ bias), w the
    weight's dequantized values. Its arrays are Params named after the weight's fields
    (q, scale / packed, scale, minimum), so a state path ends e.g. `q_proj.packed`."""

    def __init__(self, weight: QuantizedWeight, bias: jax.Array | None = None, *,
                 block_rows: int | None = None):
        check_weight(weight)
        self.weight_type = type(weight)
        for field in dataclasses.fields(weight):
            setattr(self, field.name, nnx.Param(_on_device(getattr(weight, field.name))))
        self.bias = None if bias is None else nnx.Param(_on_device(bias))
        self.block_rows = block_rows

    @classmethod
    def create(cls, in_features: int, out_features: int, *, bias: bool, dtype,
               quantization: QuantFormat | str, rngs: nnx.Rngs | None) -> QuantizedLinear:
        """Linear's signature plus `quantization`: random normal (std 0.02) weights quantized,
        or without rngs only their shapes (filled later by the checkpoint loader)."""
        fmt = format_for(quantization, in_features)
        if rngs is None:
            weight = fmt.abstract(in_features, out_features)
            bias_value = jax.ShapeDtypeStruct((out_features,), jnp.dtype(dtype))
        else:
            w = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32)
            weight = quantize(np.asarray(w) * np.float32(0.02), fmt)
            bias_value = np.zeros((out_features,), jnp.dtype(dtype))
        return cls(weight, bias_value if bias else None)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return self.weight_type(**{f.name: getattr(self, f.name)[...]
                                   for f in dataclasses.fields(self.weight_type)})

    @property
    def format(self) -> QuantFormat:
        return format_of(self.weight_type(**{f.name: getattr(self, f.name).get_value()
                                             for f in dataclasses.fields(self.weight_type)}))

    def __call__(self, x: jax.Array, hints: ProductHints = NO_HINTS) -> jax.Array:
        # hints.num_rows (Linear's padding hint) is not needed: the CPU kernel takes only a
        # decode's few rows, and the blocked loop's dots run on XLA.
        arrays = {f.name: stack_and_layer(getattr(self, f.name).get_value())
                  for f in dataclasses.fields(self.weight_type)}
        weight = self.weight_type(**{name: array for name, (array, _) in arrays.items()})
        layer = next(iter(arrays.values()))[1]      # under scan, the stacks and the layer
        y = quantized_matmul(x, weight, block_rows=self.block_rows, layer=layer,
                             gpu_layer_matmul=hints.gpu_layer_matmul)
        return y if self.bias is None else y + self.bias[...]


def _on_device(array):
    return array if isinstance(array, (jax.Array, jax.ShapeDtypeStruct)) else jnp.asarray(array)
