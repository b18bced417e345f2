"""The GPU layer matmul (pallas_kernels/gpu/layer_matmul.py): x @ stack[layer] read in place,
against float64 on the host, interpreted on a CPU and native on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu.layer_matmul import (GROUP, ROWS_MAX, LayerMatmulTiles,
                                             grouped_layer_matmul_gpu, layer_matmul_gpu,
                                             layer_matmul_reference,
                                             quantized_block_k, quantized_layer_matmul_gpu,
                                             split_k, supported, supported_quantized)
from tests.pallas_kernels.common import GPU_INTERPRET, NATIVE_GPU

# Small tiles in interpret mode (every program is a Python-level step there).
TILES = LayerMatmulTiles() if NATIVE_GPU else LayerMatmulTiles(block_n=64, block_k=64,
                                                                programs=8)
# Rows past 64: programs of 64 rows each (100 -> 128 padded, 2 of them).
SHAPES = ([(1, 4096, 14336), (7, 14336, 4096), (16, 4096, 1024), (64, 2048, 8192),
           (256, 4096, 14336)]
          if NATIVE_GPU else [(1, 256, 128), (5, 512, 192), (16, 128, 64), (100, 192, 128)])
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}


def relative_error(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows,in_features,out_features", SHAPES)
def test_matches_the_layer_it_names(dtype, rows, in_features, out_features):
    keys = jax.random.split(jax.random.PRNGKey(rows * 7 + in_features), 2)
    x = jax.random.normal(keys[0], (rows, in_features), jnp.float32).astype(dtype)
    stack = jax.random.normal(keys[1], (3, in_features, out_features), jnp.float32).astype(dtype)
    for layer in (0, 2):
        got = layer_matmul_gpu(x, stack, jnp.int32(layer), tiles=TILES, interpret=GPU_INTERPRET)
        assert got.shape == (rows, out_features) and got.dtype == dtype
        want = np.asarray(x, np.float64) @ np.asarray(stack[layer], np.float64)
        assert relative_error(got, want) < TOLERANCE[dtype], layer
        # The other layers' products are far from it: the layer index is honoured.
        other = np.asarray(x, np.float64) @ np.asarray(stack[1], np.float64)
        assert relative_error(got, other) > 0.5
        reference = layer_matmul_reference(x, stack, jnp.int32(layer))
        assert relative_error(reference, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_grouped_products_each_match_their_own(dtype):
    """q, k and v (one input, three stacks of other widths) in one call: each output is its
    own stack's product, whichever program range computed it."""
    in_features, widths = (4096, (4096, 1024, 1024)) if NATIVE_GPU else (128, (128, 64, 64))
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    x = jax.random.normal(keys[0], (3, in_features), jnp.float32).astype(dtype)
    stacks = tuple(jax.random.normal(key, (2, in_features, width), jnp.float32).astype(dtype)
                   for key, width in zip(keys[1:], widths))
    got = grouped_layer_matmul_gpu(x, stacks, jnp.int32(1), tiles=TILES,
                                   interpret=GPU_INTERPRET)
    assert [y.shape for y in got] == [(3, width) for width in widths]
    for y, stack in zip(got, stacks):
        want = np.asarray(x, np.float64) @ np.asarray(stack[1], np.float64)
        assert y.dtype == dtype and relative_error(y, want) < TOLERANCE[dtype]
    with pytest.raises(ValueError, match="of one dtype"):
        grouped_layer_matmul_gpu(x, (stacks[0], stacks[1].astype(jnp.float16)), jnp.int32(0),
                                 tiles=TILES, interpret=True)


def test_refuses_what_it_does_not_cover():
    stack = jnp.zeros((2, 128, 96), jnp.float32)   # 96 columns: not a multiple of 64
    assert not supported(1, stack.shape, TILES)
    assert not supported(ROWS_MAX + 1, (2, 128, 128), TILES)
    with pytest.raises(ValueError, match="stack.shape"):
        layer_matmul_gpu(jnp.zeros((1, 128), jnp.float32), stack, jnp.int32(0), tiles=TILES,
                         interpret=True)


def test_split_keeps_enough_programs():
    tiles = LayerMatmulTiles(block_n=64, block_k=128, programs=512)
    assert split_k(4096, 1024, tiles) == 32        # 16 column blocks: 512 programs
    assert split_k(14336, 4096, tiles) == 8        # 112 steps: the largest power of 2 <= 8
    assert split_k(4096, 14336, tiles) == 2        # 224 column blocks
    assert split_k(128, 64, tiles) == 1            # one step: nothing to split


def test_choice_is_read_from_its_variable(monkeypatch):
    from pallas_kernels.gpu.kernel_choice import LAYER_MATMUL_VARIABLE, uses_layer_matmul
    monkeypatch.setenv(LAYER_MATMUL_VARIABLE, "cublas")
    with pytest.raises(ValueError, match="EMBER_GPU_LAYER_MATMUL='cublas': expected one of"):
        uses_layer_matmul(1, (2, 128, 128))
    monkeypatch.setenv(LAYER_MATMUL_VARIABLE, "pallas")
    assert uses_layer_matmul(1, (2, 128, 128)) == NATIVE_GPU   # never off a GPU
    monkeypatch.setenv(LAYER_MATMUL_VARIABLE, "xla")
    assert not uses_layer_matmul(1, (2, 128, 128))


def test_rows_past_the_limit_keep_xlas_dot(monkeypatch):
    from pallas_kernels.gpu import kernel_choice
    monkeypatch.setattr(kernel_choice.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kernel_choice, "has_pallas_triton", lambda: True)
    monkeypatch.delenv(kernel_choice.LAYER_MATMUL_VARIABLE, raising=False)
    limit = kernel_choice.LAYER_MATMUL_MAX_ROWS
    assert kernel_choice.uses_layer_matmul(limit, (2, 4096, 1024))
    assert not kernel_choice.uses_layer_matmul(limit + 1, (2, 4096, 1024))
    assert supported(limit + 1, (2, 4096, 1024))   # the kernel takes them; the policy does not


def stacked_quantized(kind, in_features, out_features, layers=3, group=None):
    """(arrays stacked on [layers], the layers' exact f64 weights) of random weights."""
    from models.quantization import dequantize, quantize_int4, quantize_int8
    rng = np.random.default_rng(in_features + out_features)
    weights = [quantize_int8(w, group) if kind == "int8" else quantize_int4(w)
               for w in (rng.standard_normal((in_features, out_features), np.float32) * 0.02
                         for _ in range(layers))]
    names = ("q", "scale") if kind == "int8" else ("packed", "scale", "minimum")
    arrays = tuple(jnp.stack([jnp.asarray(getattr(w, name)) for w in weights])
                   for name in names)
    return arrays, [np.asarray(dequantize(w), np.float64) for w in weights]


@pytest.mark.parametrize("kind,group", [("int8", None), ("int8", 32), ("int4", None)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("in_features,rows", [(32, 5), (4096 if NATIVE_GPU else 256, 70)])
def test_quantized_weights_read_as_stored(kind, group, dtype, in_features, rows):
    # in_features 32: one row of scales, which is per channel for int8 and a group for int4;
    # 70 rows: two programs of 64 rows
    out_features = 1024 if NATIVE_GPU else 128
    arrays, exact = stacked_quantized(kind, in_features, out_features, group=group)
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, in_features), jnp.float32).astype(dtype)
    for layer in (0, 2):
        got = quantized_layer_matmul_gpu(x, arrays, jnp.int32(layer), kind=kind, tiles=TILES,
                                         interpret=GPU_INTERPRET)
        assert got.shape == (rows, out_features) and got.dtype == dtype
        want = np.asarray(x, np.float64) @ exact[layer]
        # bf16: the dequantized tile is rounded to bf16 before the product, as XLA's path does
        assert relative_error(got, want) < TOLERANCE[dtype], layer
        assert relative_error(got, np.asarray(x, np.float64) @ exact[1]) > 0.5


def test_quantized_layouts_it_takes():
    assert quantized_block_k("int8", 4096, 1, TILES) == TILES.block_k   # per channel
    assert quantized_block_k("int8", 4096, 128) == GROUP               # Q8_0's groups of 32
    assert quantized_block_k("int4", 4096, 128) == GROUP
    assert quantized_block_k("int8", 4096, 64) is None                 # groups of 64
    assert not supported_quantized(ROWS_MAX + 1, "int4", 4096, 1024, 128)
    assert supported_quantized(1, "int4", 4096, 1024, 128)
    with pytest.raises(ValueError, match="expected int8 or int4"):
        quantized_layer_matmul_gpu(jnp.zeros((1, 64), jnp.float32),
                                   (jnp.zeros((2, 64, 64), jnp.int8),
                                    jnp.zeros((2, 1, 64), jnp.float32)),
                                   jnp.int32(0), kind="int2", interpret=True)
