"""x @ stack[layer] on the GPU, the layer's weight read where it lies in the stack (Pallas,
Triton lowering).

Under the scanned decoder (models/transformer.py) a layer's weight is a dynamic-slice of a
[num_layers, in, out] stack, and XLA's dot copies such a slice into a buffer of its own
first: the weight is read, written and read again, three times the bytes of a decode bound
by reading its weights (an H200, 2026-11-30, Llama-3-8B shape: batch-1 decode 12.2 ms a
step against 3.9 ms for its 15 GB of weights). This kernel reads the slice in place, for
the few rows of a decode step (kernel_choice.LAYER_MATMUL_MAX_ROWS; the kernel takes up to
ROWS_MAX, in programs of BLOCK_M rows); a prefill's many rows amortise the copy.

Each program computes BN output columns over a range of the input rows (split-K, so that a
narrow product still has enough programs to keep the memory busy): f32 partial sums
[split, rows, out], added up after the call. Products that read one input (q, k and v;
gate and up) can go in one call (`grouped_layer_matmul_gpu`): their column blocks side by
side, each program reading the stack its block falls in, so that the narrow k and v (alone
16 column blocks of Llama-3-8B: 800 GB/s on the H200) share the programs of q. The rows are
padded to a power of two >= 16 (the MMA's smallest M), past BLOCK_M to a multiple of it.

Quantized weights (models/quantization.py's layouts, every array stacked on [layers]) are
read as stored and converted in registers, the dequantized tile in x's dtype before the
product, as XLA's path converts them: int8 with one scale row (per output channel) scaled
once at the end, int8 with a scale per 32 rows (GGUF Q8_0) and int4 (q * scale + minimum
per 32 rows, two nibbles a byte) a group of 32 rows per loop step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.compat import gpu_load, gpu_store, triton_compiler_params
from pallas_kernels.gpu.attention_tiles import EXACT

ROWS_MAX = 256   # what the kernel takes; kernel_choice.LAYER_MATMUL_MAX_ROWS what runs on it
BLOCK_M = 64     # rows a program takes: more rows, more programs along the grid's first axis
MIN_ROWS = 16


class LayerMatmulTiles(NamedTuple):
    """block_n output columns and block_k input rows a loop step; the input rows are split
    so that there are about `programs` programs; num_warps and num_stages for Triton."""

    block_n: int = 64
    block_k: int = 128
    programs: int = 512
    num_warps: int = 4
    num_stages: int = 3


TILES = LayerMatmulTiles()
GROUP = 32   # rows per scale row of a grouped int8 or an int4 weight


def supported(rows: int, stack_shape: tuple[int, ...], tiles: LayerMatmulTiles = TILES) -> bool:
    """Whether the kernel takes `rows` rows against a [layers, in, out] stack: few rows, and
    in and out multiples of the tiles (every Llama-family shape)."""
    if len(stack_shape) != 3:
        return False
    _, in_features, out_features = stack_shape
    return (rows <= ROWS_MAX and in_features % tiles.block_k == 0
            and out_features % tiles.block_n == 0)


def quantized_block_k(kind: str, in_features: int, scale_rows: int,
                      tiles: LayerMatmulTiles = TILES) -> int | None:
    """Input rows a loop step takes for a quantized weight (kind "int8" or "int4", with
    scale_rows rows of scales): the tile's for per-channel int8 (32 where the tile does not
    divide `in`), one group of 32 for a grouped one; None where the kernel does not take
    the layout."""
    if kind == "int8" and scale_rows == 1 and in_features % tiles.block_k == 0:
        return tiles.block_k
    if kind == "int8" and scale_rows == 1 and in_features % GROUP == 0:
        return GROUP
    if kind in ("int8", "int4") and scale_rows * GROUP == in_features:
        return GROUP
    return None


def supported_quantized(rows: int, kind: str, in_features: int, out_features: int,
                        scale_rows: int, tiles: LayerMatmulTiles = TILES) -> bool:
    block_k = quantized_block_k(kind, in_features, scale_rows, tiles)
    return (block_k is not None and rows <= ROWS_MAX and in_features % block_k == 0
            and out_features % tiles.block_n == 0)


def padded_rows(rows: int) -> int:
    """x's rows padded: a power of two >= MIN_ROWS up to BLOCK_M, then a multiple of it."""
    if rows <= BLOCK_M:
        return max(MIN_ROWS, 1 << (rows - 1).bit_length())
    return -(-rows // BLOCK_M) * BLOCK_M


def split_k(in_features: int, out_features: int, tiles: LayerMatmulTiles,
            block_k: int | None = None) -> int:
    """Input-row splits: a power of two dividing the loop's steps (of block_k rows, default
    the tile's), toward tiles.programs."""
    steps = in_features // (block_k or tiles.block_k)
    wanted = max(1, tiles.programs // (out_features // tiles.block_n))
    split = 1
    while split * 2 <= wanted and steps % (split * 2) == 0:
        split *= 2
    return split


def _program(layer_ref, block_m, block_n, block_k, steps):
    """This program's layer, rows i32[BM, 1] and columns i32[1, BN] of the output, its part
    of the split input rows and where that part starts, over the grid
    (row blocks, column blocks, parts)."""
    m_block, n_block, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = (m_block * block_m + jnp.arange(block_m, dtype=jnp.int32))[:, None]
    cols = (n_block * block_n + jnp.arange(block_n, dtype=jnp.int32))[None, :]
    return layer_ref[0], rows, cols, part, part * steps * block_k


def _launch(kernel, x, arrays, layer, *, out_features, block_k, tiles, name, interpret):
    """`kernel` over the grid _program reads: x's rows padded (padded_rows), the input rows
    split toward tiles.programs; f32[M, out] once the parts are added up."""
    rows, in_features = x.shape
    padded = padded_rows(rows)
    x_padded = jnp.zeros((padded, in_features), x.dtype).at[:rows].set(x)
    split = split_k(in_features, out_features, tiles, block_k)
    block_m = min(padded, BLOCK_M)
    partial = pl.pallas_call(
        functools.partial(kernel, block_m=block_m, block_n=tiles.block_n, block_k=block_k,
                          steps=in_features // block_k // split),
        # the row blocks first: the programs that read one weight tile run side by side
        grid=(padded // block_m, out_features // tiles.block_n, split),
        out_shape=jax.ShapeDtypeStruct((split, padded, out_features), jnp.float32),
        compiler_params=triton_compiler_params(num_warps=tiles.num_warps,
                                               num_stages=tiles.num_stages),
        interpret=interpret,
        name=name,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), x_padded, *arrays)
    return partial.sum(axis=0)[:rows]


def _kernel(layer_ref,   # i32[1]
            x_ref,       # [M, in] (M padded)
            *refs,       # the stacks [layers, in, out_i], then out f32[split, M, sum(out_i)]
            block_m, block_n, block_k, steps, column_blocks):
    out_ref, stacks = refs[-1], refs[:-1]
    layer, rows, cols, part, first = _program(layer_ref, block_m, block_n, block_k, steps)
    n_block = pl.program_id(1)

    def product(w_ref, first_block):
        local = cols - first_block * block_n     # the column in this stack's own output

        def body(step, acc):
            ks = first + step * block_k + jnp.arange(block_k, dtype=jnp.int32)     # i32[BK]
            x = gpu_load(x_ref.at[rows, ks[None, :]])                            # [M, BK]
            w = gpu_load(w_ref.at[layer, ks[:, None], local])                     # [BK, BN]
            return acc + jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=EXACT,
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
        gpu_store(out_ref.at[part, rows, cols], acc)

    if len(stacks) == 1:
        product(stacks[0], 0)
        return
    first_block = 0
    for w_ref, blocks in zip(stacks, column_blocks):   # each program: its stack's columns
        pl.when((n_block >= first_block) & (n_block < first_block + blocks))(
            functools.partial(product, w_ref, first_block))
        first_block += blocks


def layer_matmul_gpu(x, stack, layer, *, tiles: LayerMatmulTiles = TILES, interpret=False):
    """x [M, in] @ stack[layer] ([layers, in, out], layer i32[]): [M, out] in x's dtype,
    accumulated in f32. M <= ROWS_MAX and the shapes `supported`."""
    return grouped_layer_matmul_gpu(x, (stack,), layer, tiles=tiles, interpret=interpret)[0]


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def grouped_layer_matmul_gpu(x, stacks, layer, *, tiles: LayerMatmulTiles = TILES,
                             interpret=False):
    """x [M, in] @ each stack's layer `layer` (stacks: [layers, in, out_i] of one dtype,
    e.g. q, k and v), in one call: a narrow product (k, v) shares the programs of a wide one.
    Returns a tuple of [M, out_i] in x's dtype, accumulated in f32. M <= ROWS_MAX and every
    stack `supported`."""
    rows, in_features = x.shape
    shapes = [tuple(stack.shape) for stack in stacks]
    if (not stacks or any(shape[1] != in_features or not supported(rows, shape, tiles)
                          for shape in shapes)
            or len({stack.dtype for stack in stacks}) != 1):
        raise ValueError(f"x.shape={x.shape}, stack shapes {shapes}: expected x [M, in] with "
                         f"M <= {ROWS_MAX}, stacks [layers, in, out] of one dtype, in a "
                         f"multiple of {tiles.block_k} and each out of {tiles.block_n}")
    widths = [shape[2] for shape in shapes]
    kernel = functools.partial(_kernel, column_blocks=tuple(
        width // tiles.block_n for width in widths))
    out = _launch(kernel, x.astype(stacks[0].dtype), stacks, layer, out_features=sum(widths),
                  block_k=tiles.block_k, tiles=tiles, name="ember_layer_matmul",
                  interpret=interpret).astype(x.dtype)
    bounds = np.cumsum([0] + widths)
    return tuple(out[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))


def _quantized_kernel(layer_ref,   # i32[1]
                      x_ref,       # [M, in] (M padded)
                      *refs,       # the weight's stacks (int8: q, scale; int4: packed, scale,
                                   # minimum), then out f32[split, M, out]
                      kind, per_channel, block_m, block_n, block_k, steps):
    out_ref = refs[-1]
    layer, rows, cols, part, first = _program(layer_ref, block_m, block_n, block_k, steps)
    dtype = x_ref.dtype

    def scale_row(scale_ref, group):                                              # f32[1, BN]
        return gpu_load(scale_ref.at[layer, group, cols]).astype(jnp.float32)

    def product(x, w):
        return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=EXACT,
                                   preferred_element_type=jnp.float32)

    def int8_step(step, acc):
        q_ref, scale_ref = refs[0], refs[1]
        start = first + step * block_k
        ks = start + jnp.arange(block_k, dtype=jnp.int32)
        x = gpu_load(x_ref.at[rows, ks[None, :]])                                 # [M, BK]
        w = gpu_load(q_ref.at[layer, ks[:, None], cols]).astype(jnp.float32)     # [BK, BN]
        if per_channel:
            return acc + product(x, w.astype(dtype))
        # int8 -> f32 -> x's dtype, scaled as the XLA path scales it: q * scale, rounded
        return acc + product(x, (w * scale_row(scale_ref, start // GROUP)).astype(dtype))

    def int4_step(step, acc):
        packed_ref, scale_ref, minimum_ref = refs[0], refs[1], refs[2]
        group = first // GROUP + step
        half = jnp.arange(GROUP // 2, dtype=jnp.int32)
        packed = gpu_load(packed_ref.at[layer, (group * (GROUP // 2) + half)[:, None], cols])
        scale, minimum = scale_row(scale_ref, group), scale_row(minimum_ref, group)
        low = ((packed & 15).astype(jnp.float32) * scale + minimum).astype(dtype)  # [16, BN]
        high = ((packed >> 4).astype(jnp.float32) * scale + minimum).astype(dtype)
        x_low = gpu_load(x_ref.at[rows, (group * GROUP + half)[None, :]])          # [M, 16]
        x_high = gpu_load(x_ref.at[rows, (group * GROUP + GROUP // 2 + half)[None, :]])
        return acc + product(x_low, low) + product(x_high, high)

    acc = jax.lax.fori_loop(0, steps, int8_step if kind == "int8" else int4_step,
                            jnp.zeros((block_m, block_n), jnp.float32))
    if per_channel:
        acc = acc * scale_row(refs[1], 0)
    gpu_store(out_ref.at[part, rows, cols], acc)


@functools.partial(jax.jit, static_argnames=("kind", "tiles", "interpret"))
def quantized_layer_matmul_gpu(x, arrays, layer, *, kind, tiles: LayerMatmulTiles = TILES,
                               interpret=False):
    """x [M, in] @ layer `layer` of a quantized weight stacked on [layers]: `arrays` are
    int8's (q i8[L, in, out], scale f32|f16[L, in // group, out]) or int4's (packed
    u8[L, in // 2, out], scale, minimum f32|f16[L, in // 32, out]); [M, out] in x's dtype,
    accumulated in f32. M <= ROWS_MAX and the layout `supported_quantized`."""
    rows, in_features = x.shape
    out_features, scale_rows = arrays[0].shape[2], arrays[1].shape[1]
    if kind not in ("int8", "int4") or not supported_quantized(
            rows, kind, in_features, out_features, scale_rows, tiles):
        raise ValueError(f"kind={kind!r}, x.shape={x.shape}, arrays "
                         f"{[tuple(a.shape) for a in arrays]}: expected int8 or int4 "
                         f"[layers, in, out] arrays, M <= {ROWS_MAX} and out a multiple of "
                         f"{tiles.block_n}")
    kernel = functools.partial(_quantized_kernel, kind=kind,
                               per_channel=kind == "int8" and scale_rows == 1)
    return _launch(kernel, x, arrays, layer, out_features=out_features,
                   block_k=quantized_block_k(kind, in_features, scale_rows, tiles), tiles=tiles,
                   name=f"ember_layer_matmul_{kind}", interpret=interpret).astype(x.dtype)


def layer_matmul_reference(x, stack, layer):
    """The plain-jnp product the kernel computes (XLA copies the slice)."""
    weight = jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False)
    return jax.lax.dot_general(x.astype(stack.dtype), weight, (((1,), (0,)), ((), ())),
                               precision=EXACT,
                               preferred_element_type=jnp.float32).astype(x.dtype)
