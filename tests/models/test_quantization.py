"""Weight-only quantization: round trips, GGUF blocks read bit for bit, the step's matmul equal
to the dequantized model's, the module under jit, and clear errors."""

import functools
import math
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import quants
from gguf.constants import GGMLQuantizationType as GGML

from models import quantization as quant

GGUF_TYPES = (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1)


@pytest.fixture()
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def gguf_weight(rng, qtype, in_features, out_features):
    """(our weight, gguf's own dequantized values [in, out]) of a fresh random tensor."""
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)  # GGUF rows: out
    blocks = quants.quantize(w, qtype)
    return (quant.from_gguf_blocks(qtype, blocks, w.shape),
            quants.dequantize(blocks, qtype).T)


def all_weights(rng, in_features=96, out_features=40):
    w = rng.standard_normal((in_features, out_features)).astype(np.float32)
    weights = {"int8": quant.quantize_int8(w), "int4": quant.quantize_int4(w)}
    weights.update({t.name: gguf_weight(rng, t, in_features, out_features)[0] for t in GGUF_TYPES})
    return weights


def test_int8_round_trip_is_within_half_a_step_per_channel(rng):
    w = (rng.standard_normal((80, 24)) * rng.uniform(0.01, 3, 24)).astype(np.float32)
    weight = quant.quantize_int8(w)
    step = np.abs(w).max(axis=0) / 127                          # the numpy reference scale
    np.testing.assert_allclose(weight.scale[0], step, rtol=1e-6)
    error = np.abs(np.asarray(quant.dequantize(weight)) - w)
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert weight.q.dtype == np.int8 and np.abs(weight.q).max() == 127


def test_int4_round_trip_is_within_half_a_step_per_group(rng):
    w = (rng.standard_normal((128, 24)) + rng.uniform(-2, 2, 24)).astype(np.float32)
    weight = quant.quantize_int4(w)
    groups = w.reshape(4, 32, 24)
    low, high = groups.min(axis=1), groups.max(axis=1)          # the numpy reference
    values = np.asarray(quant.dequantize(weight)).reshape(4, 32, 24)
    step = (high - low) / 15
    assert (np.abs(values - groups) <= step[:, None] / 2 * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_array_equal(values.min(axis=1), low)      # q = 0 is the minimum itself
    assert weight.packed.shape == (64, 24) and weight.packed.dtype == np.uint8


def test_int8_in_groups_of_32_with_f16_scales_is_q8_0s_form(rng):
    w = rng.standard_normal((96, 16)).astype(np.float32)
    weight = quant.quantize(w, quant.GGUF_FORMATS[GGML.Q8_0])
    assert quant.format_of(weight) == quant.GGUF_FORMATS[GGML.Q8_0]
    step = np.abs(w.reshape(3, 32, 16)).max(axis=1, keepdims=True) / 127
    error = np.abs(np.asarray(quant.dequantize(weight)).reshape(3, 32, 16) - w.reshape(3, 32, 16))
    assert (error <= step * 0.6).all()             # half a step, and the f16 scale's rounding


def test_int4_nibbles_are_in_gguf_order():
    j = np.arange(16, dtype=np.float32)
    w = np.tile(np.concatenate([j, 15 - j]), 2)[:, None] * np.ones((1, 3), np.float32)
    weight = quant.quantize_int4(w)                             # scale 1, minimum 0: q = w
    np.testing.assert_array_equal(weight.packed[:32, 0] & 15, np.tile(j, 2))      # q[32g + j]
    np.testing.assert_array_equal(weight.packed[:32, 0] >> 4, np.tile(15 - j, 2))  # q[32g+16+j]


@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_blocks_dequantize_bit_for_bit(rng, qtype):
    for _ in range(4):
        in_features = 32 * int(rng.integers(1, 6))              # one to five blocks per row
        out_features = int(rng.integers(1, 50))
        weight, expected = gguf_weight(rng, qtype, in_features, out_features)
        assert weight.shape == (in_features, out_features)
        np.testing.assert_array_equal(np.asarray(quant.dequantize(weight)), expected)


@pytest.mark.parametrize("qtype", [GGML.Q8_0, GGML.Q4_1], ids=lambda t: t.name)
def test_gguf_blocks_stay_as_small_as_the_file(rng, qtype):
    w = rng.standard_normal((16, 128)).astype(np.float32)
    blocks = quants.quantize(w, qtype)
    weight = quant.from_gguf_blocks(qtype, blocks, w.shape)
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(weight)) == blocks.nbytes


def test_real_gguf_tensor_is_read_bit_for_bit(default_gguf):
    from gguf import GGUFReader

    for tensor in GGUFReader(default_gguf).tensors:
        if tensor.tensor_type in quant.GGUF_FORMATS and "ffn_down" in tensor.name:
            shape = tuple(int(n) for n in reversed(tensor.shape))        # (out, in)
            weight = quant.from_gguf_blocks(tensor.tensor_type, tensor.data, shape)
            expected = quants.dequantize(tensor.data, tensor.tensor_type).T
            np.testing.assert_array_equal(np.asarray(quant.dequantize(weight)), expected)
            return
    pytest.fail("no quantized ffn_down tensor in the default model")


@pytest.mark.parametrize("name", ["int8", "int4", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("block_rows", [None, 32, 64, 192])
def test_matmul_equals_the_dequantized_matmul(rng, name, block_rows):
    weight = all_weights(rng, 192)[name]               # 64: 3 blocks of 2 pieces of 32 rows
    x = rng.standard_normal((2, 3, 192)).astype(np.float32)
    y = jax.jit(quant.quantized_matmul, static_argnames="block_rows")(
        x, weight, block_rows=block_rows)
    exact = np.asarray(quant.dequantize(weight), np.float64)
    reference, magnitude = x @ exact, np.abs(x) @ np.abs(exact)
    assert y.shape == (2, 3, 40) and y.dtype == jnp.float32
    assert (np.abs(np.asarray(y) - reference) <= 1e-6 * magnitude + 1e-6).all()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernel is for a lone CPU")
@pytest.mark.parametrize("name", ["int8", "int4", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
def test_a_decode_on_the_cpu_runs_the_kernel_and_equals_the_dequantized_matmul(rng, name, rows):
    # 200 columns: three blocks of 64, one of 16 and 8 alone; up to 8 rows take the C++
    # kernel (pallas_kernels/cpu/quantized_matmul.cc: rows in passes of 4, then 3, 2 or 1),
    # more the loop of dots.
    weight = all_weights(rng, 192, 200)[name]
    x = rng.standard_normal((rows, 192)).astype(np.float32)
    step = jax.jit(quant.quantized_matmul)
    kernel = rows <= quant.CPU_KERNEL_MAX_ROWS
    assert ("ember_quantized_matmul" in step.lower(x, weight).as_text()) == kernel
    exact = np.asarray(quant.dequantize(weight), np.float64)
    reference, magnitude = x @ exact, np.abs(x) @ np.abs(exact)
    assert (np.abs(np.asarray(step(x, weight)) - reference) <= 1e-6 * magnitude + 1e-6).all()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernel is for a lone CPU")
@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
def test_a_tied_heads_q8_0_table_gives_the_dequantized_tables_logits(rng, rows, scale_dtype):
    # A GGUF token_embd's own Q8_0 blocks, one token's row each (table_from_gguf_blocks):
    # 203 tokens (whole runs of 8, 4 or 2 outputs, then single ones) of 96 inputs (3
    # blocks). Up to 8 rows take the C++ kernel (pallas_kernels/cpu/table_matmul.cc);
    # more return None, for the caller's float table.
    table = rng.standard_normal((203, 96)).astype(np.float32)
    blocks = quants.quantize(table, GGML.Q8_0)
    q, scale = quant.table_from_gguf_blocks(blocks, table.shape)
    exact = quants.dequantize(blocks, GGML.Q8_0).astype(np.float64)
    np.testing.assert_array_equal(
        q.reshape(203, 3, 32) * scale.astype(np.float64)[..., None], exact.reshape(203, 3, 32))
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    step = jax.jit(quant.table_matmul)
    if rows > quant.CPU_KERNEL_MAX_ROWS:
        assert step(x, q, scale) is None
        return
    scale = scale.astype(scale_dtype)
    assert "ember_table_matmul" in step.lower(x, q, scale).as_text()
    y = np.asarray(step(x, q, scale))
    reference, magnitude = x @ exact.T, np.abs(x) @ np.abs(exact).T
    assert y.shape == (rows, 203) and y.dtype == np.float32
    assert (np.abs(y - reference) <= 1e-6 * magnitude + 1e-6).all()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernel is for a lone CPU")
@pytest.mark.parametrize("tied", [True, False])
def test_a_random_model_with_head_blocks_has_one_head_whatever_the_rows(tied):
    # Built with random weights, the float head (the embedding when tied) holds its Q8_0
    # blocks' values: a decode's rows (the kernel, from the blocks) and more rows (XLA's dot,
    # from the float head) get the same logits.
    from models.config import ModelConfig
    from models.transformer import Transformer

    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_layers=1,
                 num_heads=2, num_kv_heads=1, head_dim=32)
    model = Transformer(ModelConfig(**shape, tie_word_embeddings=tied, head_blocks=True),
                        rngs=nnx.Rngs(0))
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((9, 64)), jnp.float32)
    logits = nnx.jit(lambda m, h: m.logits(h))
    assert "ember_table_matmul" in logits.lower(model, hidden[:1]).as_text()
    assert "ember_table_matmul" not in logits.lower(model, hidden).as_text()
    np.testing.assert_allclose(np.asarray(logits(model, hidden[:1])),
                               np.asarray(logits(model, hidden))[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_blocks=True needs a hidden_size that is a "
                                         "multiple of 32"):
        ModelConfig(**{**shape, "hidden_size": 48}, head_blocks=True)


def test_a_table_of_the_wrong_shape_is_refused_with_the_shapes(rng):
    q, scale = quant.quantize_table(rng.standard_normal((10, 64)))
    with pytest.raises(ValueError, match=r"x.shape=\(1, 63\), q.shape=\(10, 64\)"):
        quant.table_matmul(jnp.ones((1, 63)), q, scale)
    with pytest.raises(ValueError, match=r"scale.shape=\(10, 3\)"):
        quant.table_matmul(jnp.ones((1, 64)), q, np.ones((10, 3), np.float32))
    with pytest.raises(ValueError, match=r"Q8_0 blocks uint8\[10, 68\] for shape=\(10, 96\)"):
        quant.table_from_gguf_blocks(np.zeros((10, 68), np.uint8), (10, 96))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernel is for a lone CPU")
@pytest.mark.parametrize("name", ["int8", "int4", "Q8_0", "Q4_1"])
def test_the_kernel_reads_a_stacked_layer_in_place(rng, name):
    # Scanned layers hand the kernel every layer's weights and the layer's index
    # (models/layer_slice.py): each index gives that layer's product, an index outside the
    # stack is clipped into it, and the compiled step slices nothing out of the stack.
    in_features, out_features = 2048, 1088   # 64 chunks of inputs split over the threads
    layers = [all_weights(rng, in_features, out_features)[name] for _ in range(3)]
    stack = type(layers[0])(**{f: jnp.stack([getattr(w, f) for w in layers])
                                for f in layers[0].__dataclass_fields__})
    x = rng.standard_normal((2, in_features)).astype(np.float32)
    step = jax.jit(lambda x, stack, layer: quant.quantized_matmul(x, stack, layer=layer))
    hlo = step.lower(x, stack, jnp.int32(0)).compile().as_text()
    assert "ember_quantized_matmul" in hlo and "dynamic-slice" not in hlo
    for layer, expected_layer in ((0, 0), (1, 1), (2, 2), (7, 2), (-1, 0)):
        exact = np.asarray(quant.dequantize(layers[expected_layer]), np.float64)
        reference, magnitude = x @ exact, np.abs(x) @ np.abs(exact)
        y = np.asarray(step(x, stack, jnp.int32(layer)))
        assert (np.abs(y - reference) <= 1e-6 * magnitude + 1e-6).all(), layer


def test_matmul_in_bfloat16_matches_the_dequantized_model_in_bfloat16(rng):
    # More rows than the CPU kernel takes: the loop, whose blocks are cast to bf16 (the
    # kernel computes in f32 from the exact weights, for any x dtype).
    weight = all_weights(rng)["Q4_1"]
    x = jnp.asarray(rng.standard_normal((quant.CPU_KERNEL_MAX_ROWS + 3, 96)), jnp.bfloat16)
    y = quant.quantized_matmul(x, weight)
    dense = jnp.dot(x, quant.dequantize(weight).astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(dense, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_cpu_step_never_builds_the_whole_float_weight(rng):
    # A weight whose f32 form is past CPU_ONE_DOT_BYTES (16 MB) runs in blocks of 256 input
    # rows; one within it is one dot (its float copy a small temporary).
    large, _ = gguf_weight(rng, GGML.Q4_1, 4096, 1088)         # 17.8 MB in f32
    assert quant.default_block_rows(large, "cpu") == 256
    assert quant.default_block_rows(large, "gpu") == 4096
    weight = all_weights(rng, 1024, 64)["Q4_1"]
    x = jnp.ones((1, 1024), jnp.float32)
    assert quant.default_block_rows(weight, "cpu") == 1024

    def largest_float_array(block_rows):
        step = functools.partial(quant.quantized_matmul, block_rows=block_rows)
        text = jax.jit(step).lower(x, weight).compile().as_text()
        return max(math.prod(map(int, filter(None, dims.split(","))))
                   for dims in re.findall(r"f32\[([\d,]*)\]", text))

    assert largest_float_array(256) <= 256 * 64 // 2            # one half-block of nibbles
    assert largest_float_array(1024) >= 1024 * 64 // 2          # one dot: the whole weight


@pytest.mark.parametrize("name", ["int8", "Q4_0"])
def test_quantized_linear_under_jit_is_linear_with_the_dequantized_weight(rng, name):
    weight = all_weights(rng)[name]
    bias = rng.standard_normal(40).astype(np.float32)
    layer = quant.QuantizedLinear(weight, bias)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    y = nnx.jit(lambda module, x: module(x))(layer, jnp.asarray(x))
    expected = x @ np.asarray(quant.dequantize(weight), np.float64) + bias
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    assert layer.format == quant.format_of(weight)


@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
def test_module_built_empty_has_the_state_a_gguf_tensor_fills(rng, qtype):
    weight, _ = gguf_weight(rng, qtype, 64, 24)
    empty = quant.QuantizedLinear.create(64, 24, bias=True, dtype=jnp.bfloat16,
                                         quantization=quant.GGUF_FORMATS[qtype], rngs=None)
    filled = quant.QuantizedLinear(weight, np.zeros(24, jnp.bfloat16))
    shapes = lambda m: {path: (v.shape, v.dtype) for path, v in nnx.to_flat_state(nnx.state(m))}
    assert shapes(empty) == shapes(filled)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_random_module_runs_like_linear(quantization):
    layer = quant.QuantizedLinear.create(64, 48, bias=False, dtype=jnp.float32,
                                         quantization=quantization, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 64)), jnp.float32)
    expected = np.asarray(x) @ np.asarray(quant.dequantize(layer.quantized_weight))
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)
    assert layer.format == quant.format_for(quantization, 64)


def test_weights_are_pytrees_that_survive_jit(rng):
    for weight in all_weights(rng).values():
        leaves, tree = jax.tree.flatten(weight)
        assert len(leaves) == (2 if isinstance(weight, quant.Int8Weight) else 3)
        back = jax.jit(lambda w: w)(jax.tree.unflatten(tree, leaves))
        assert type(back) is type(weight)
        for got, expected in zip(jax.tree.leaves(back), leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(got), expected)


def test_bad_shapes_are_refused_with_the_shape(rng):
    with pytest.raises(ValueError, match=r"shape=\(48, 8\).*multiple of the group, 32"):
        quant.quantize_int4(rng.standard_normal((48, 8)))
    fallback = quant.quantize(rng.standard_normal((48, 8)), "int4")
    assert quant.format_of(fallback) == quant.INT8
    layer = quant.QuantizedLinear.create(48, 8, bias=False, dtype=jnp.float32,
                                         quantization="int4", rngs=None)
    assert layer.format == quant.INT8                           # built as the loader fills it
    with pytest.raises(ValueError, match=r"Int4Weight arrays .*'minimum': \(2, 7\)"):
        quant.QuantizedLinear(quant.Int4Weight(np.zeros((32, 8), np.uint8),
                                               np.ones((2, 8)), np.zeros((2, 7))))
    with pytest.raises(ValueError, match="quantization='int2'"):
        quant.quantize(rng.standard_normal((64, 8)), "int2")
    blocks = quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), GGML.Q4_1)
    with pytest.raises(ValueError, match=r"Q4_1 blocks uint8\[4, 40\] for shape_out_in=\(4, 96\)"):
        quant.from_gguf_blocks(GGML.Q4_1, blocks, (4, 96))
    with pytest.raises(ValueError, match="qtype=Q5_0"):
        quant.from_gguf_blocks(GGML.Q5_0, blocks, (4, 64))
    weight = quant.from_gguf_blocks(GGML.Q4_1, blocks, (4, 64))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 63\)"):
        quant.quantized_matmul(jnp.ones((2, 63)), weight)
    with pytest.raises(ValueError, match="block_rows=48.*a multiple of 32 dividing 64"):
        quant.quantized_matmul(jnp.ones((2, 64)), weight, block_rows=48)


def test_sharded_weights_in_a_child_process_with_two_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=2").strip()}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-k", "on_a_mesh", "-p", "no:cacheprovider",
         "-o", "addopts="], cwd=Path(__file__).resolve().parents[2], env=env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-4000:]


@pytest.mark.skipif(jax.device_count() < 2, reason="run by the child process test above")
@pytest.mark.parametrize("parallel", ["column", "row"])
def test_matmul_on_a_mesh(rng, parallel):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    for weight in all_weights(rng, 512, 48).values():
        spec = lambda a: (P(None, "model") if parallel == "column" else
                          P() if a.shape[0] == 1 else P("model", None))
        placed = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec(a))), weight)
        step = jax.jit(functools.partial(quant.quantized_matmul, block_rows=128))
        exact = np.asarray(quant.dequantize(weight), np.float64)
        error = np.abs(np.asarray(step(x, placed)) - np.asarray(x) @ exact)
        assert (error <= 1e-6 * (np.abs(np.asarray(x)) @ np.abs(exact)) + 1e-6).all()
        text = step.lower(x, placed).compile().as_text()
        assert "all-gather" not in text          # each device multiplies its own rows/columns


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernel is for a lone CPU")
def test_the_table_kernel_gives_the_same_rows_when_called_from_many_threads(rng):
    # Two engines in one process (or XLA running independent calls at once) call the C++
    # kernels concurrently: a call under 4 MB posts to the library's one Team of helper
    # threads, which a second call then takes over (pallas_kernels/cpu/for_each_item.h), and
    # a larger one goes to XLA's pool. Every call must end, with the result a lone call
    # gives (bitwise: each output is summed by one thread, in one order, whoever runs it).
    import threading

    small = quant.quantize_table(rng.standard_normal((59392, 64)))     # 3.6 MB: the Team
    large = quant.quantize_table(rng.standard_normal((40960, 128)))    # 5 MB: XLA's pool
    step = jax.jit(quant.table_matmul)
    inputs = [(rng.standard_normal((rows, table[0].shape[1])).astype(np.float32), table)
              for table in (small, large) for rows in (1, 3, 8)]
    expected = [np.asarray(step(x, *table)) for x, table in inputs]
    wrong, failures = [], []

    def worker(offset: int) -> None:
        try:
            for turn in range(12):
                index = (offset + turn) % len(inputs)
                x, table = inputs[index]
                if not np.array_equal(np.asarray(step(x, *table)), expected[index]):
                    wrong.append(index)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a kernel call hung"
    assert not failures and not wrong, (failures, wrong)
