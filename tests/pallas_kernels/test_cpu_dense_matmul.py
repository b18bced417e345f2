"""The CPU's f32 matmul of a step's real rows (pallas_kernels/cpu/dense_matmul.cc): the
product of those rows, zeros after them, and where the engine's step uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine import EngineConfig
from engine.worker.host_arrays import empty_batch
from engine.worker.step import jit_steps
from models import ModelConfig, Transformer
from models.checkpoint import abstract_model, load_config
from models.layer_slice import ProductHints
from models.paged import kv_cache_shape
from models.transformer import rotary_table
from pallas_kernels import cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not cpu.available(),
                                reason="the C++ kernels are for the CPU, where they build")


@pytest.mark.parametrize("tokens,inputs,outputs,rows", [
    (7, 700, 200, 5),     # inputs past one 512-deep pass; 8 columns past the last whole tile
    (3, 64, 8, 3),        # fewer columns than one vector
    (20, 96, 72, 13),     # few panels: rows split in groups across threads
    (1, 576, 192, 1),     # a lone decode
    (64, 128, 256, 40),   # a decode rung of 64 rows, 40 of them real
    (4, 32, 48, 0),       # no real row
    (4, 32, 48, 9),       # more than the rows there are: all of them
    (4, 32, 48, -3),      # negative: none
    (8, 701, 1100, 8),    # a few rows: 3 panels, the last narrower; inputs past the last 8
    (2, 1027, 4100, 2),   # a few rows: wide panels split along the inputs, inputs left over
    (16, 260, 300, 7),    # a few real rows of a longer rung
    (12, 64, 40, 9),      # one row past the few-rows path
    (64, 300, 200, 50),   # many rows: packed blocks, inputs past two 128-deep ones
    (16, 140, 1024, 13),  # an output width of 1024 floats: packed at any row count
])
def test_real_rows_equal_the_float64_product_and_the_rest_are_zeros(tokens, inputs, outputs,
                                                                     rows):
    rng = np.random.default_rng(tokens * 1000 + inputs)
    x = rng.standard_normal((tokens, inputs)).astype(np.float32)
    w = rng.standard_normal((inputs, outputs)).astype(np.float32)
    y = np.asarray(jax.jit(cpu.dense_matmul_cpu)(x, w, jnp.asarray([rows], jnp.int32)))
    real = min(max(rows, 0), tokens)
    exact = x[:real].astype(np.float64) @ w
    magnitude = np.abs(x[:real]).astype(np.float64) @ np.abs(w)
    assert y.shape == (tokens, outputs) and y.dtype == np.float32
    assert (np.abs(y[:real] - exact) <= 1e-6 * magnitude + 1e-6).all()
    np.testing.assert_array_equal(y[real:], 0.0)


def compiled_forward_text(model_dir, *, scan_layers, backend, dtype=None, tokens=16,
                          optimized=False):
    """The forward step's StableHLO, or with `optimized` the HLO XLA compiled."""
    config = load_config(model_dir, scan_layers=scan_layers, dtype=dtype)
    engine = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=8,
                          max_model_len=32, warmup=False, backend=backend)
    graphdef, state = abstract_model(config)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    kv_cache = jax.ShapeDtypeStruct(kv_cache_shape(config, 8, 4), config.dtype)
    batch, indices = empty_batch(tokens, 4, 8)
    lowered = jit_steps(graphdef, engine).forward.lower(
        abstract, kv_cache, batch, indices, np.full(tokens, -1, np.int32),
        jax.ShapeDtypeStruct((4,), np.int32), jax.eval_shape(lambda: rotary_table(config, 32)))
    return lowered.compile().as_text() if optimized else lowered.as_text()


@pytest.mark.parametrize("scan_layers,backend,dtype,tokens,used", [
    (False, "auto", None, 16, True),           # f32 layers on the CPU's kernels
    (True, "cpu", None, 32, True),             # scanned too
    (True, "cpu", None, 8, True),              # scanned, any rows: XLA's dot would copy
    (False, "auto", None, 8, True),            # few rows too: read faster than XLA's dot
    (False, "reference", None, 16, False),     # the plain-jnp path asked for
    (False, "auto", "bfloat16", 16, False),    # f32 weights only
])
def test_the_step_skips_padding_rows_only_for_f32_layers_on_the_cpu_kernels(
        hf_model_dirs, scan_layers, backend, dtype, tokens, used):
    text = compiled_forward_text(hf_model_dirs["llama"], scan_layers=scan_layers,
                                 backend=backend, dtype=dtype, tokens=tokens)
    assert ("ember_dense_matmul" in text) == used


@pytest.mark.parametrize("tied,rows,kernel", [
    (False, 12, True),    # an untied f32 head of more rows than FEW_HEAD_ROWS: the kernel
    (False, 8, False),    # a few rows: XLA's dot reads the head as fast
    (True, 12, False),    # a tied head is the embedding table, held [vocab, hidden]
])
def test_the_sampler_head_computes_only_the_real_rows_on_the_kernel(tied, rows, kernel):
    config = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
    model = Transformer(config, rngs=nnx.Rngs(0))
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((rows, 32)), jnp.float32)
    want = np.asarray(model.logits(hidden))   # no hints: XLA's dot, every row
    hints = ProductHints(num_rows=jnp.asarray([5], jnp.int32))   # as the sampler passes them
    head = nnx.jit(lambda m, h: m.logits(h, hints))
    assert ("ember_dense_matmul" in head.lower(model, hidden).as_text()) == kernel
    got = np.asarray(head(model, hidden))
    np.testing.assert_allclose(got[:5], want[:5], rtol=1e-5, atol=1e-5)
    if kernel:
        np.testing.assert_array_equal(got[5:], 0.0)   # padding rows: never computed
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows", [17, 3, 50])   # tiles; the few-rows path; packed blocks
def test_a_stacked_weight_gives_the_layer_asked_for_clipped_into_the_stack(rows):
    # Scanned layers hand the kernel every layer's weight and the layer's index
    # (models/layer_slice.py); an index outside the stack is clipped into it.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((56, 96)).astype(np.float32)
    stack = rng.standard_normal((3, 96, 72)).astype(np.float32)
    step = jax.jit(cpu.dense_matmul_cpu)
    for layer, taken in ((0, 0), (1, 1), (2, 2), (5, 2), (-4, 0)):
        y = np.asarray(step(x, stack, jnp.asarray([rows], jnp.int32), jnp.int32(layer)))
        exact = x[:rows].astype(np.float64) @ stack[taken]
        magnitude = np.abs(x[:rows]).astype(np.float64) @ np.abs(stack[taken])
        assert (np.abs(y[:rows] - exact) <= 1e-6 * magnitude + 1e-6).all(), layer
        np.testing.assert_array_equal(y[rows:], 0.0)


@pytest.mark.parametrize("backend,tokens,copied", [("cpu", 16, False), ("cpu", 1, False),
                                                    ("reference", 16, True)])
def test_scanned_layers_copy_no_weight_out_of_the_stack_for_the_kernel(hf_model_dirs, backend,
                                                                       tokens, copied):
    # A dynamic-slice of a stacked weight [L, in, out] feeding an unfused operand is a copy
    # of that layer's weight each step. The kernel reads the layer in place, at any rows;
    # XLA's own dots (the reference path) still take the copied slice, which shows the check
    # sees one.
    text = compiled_forward_text(hf_model_dirs["llama"], scan_layers=True, backend=backend,
                                 tokens=tokens, optimized=True)
    config = load_config(hf_model_dirs["llama"])
    h, i = config.hidden_size, config.intermediate_size
    weight_slices = [f"f32[1,{h},{i}]", f"f32[1,{i},{h}]", f"f32[1,{h},{h}]"]
    sliced = [line for line in text.splitlines()
              if "dynamic-slice(" in line and any(s in line for s in weight_slices)]
    assert bool(sliced) == copied
