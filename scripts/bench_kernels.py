"""Benchmarks Ember's GPU kernels against the ceilings of the same GPU and other paths.

  python scripts/bench_kernels.py [--out DIR] [--quick]

Times are medians over repeats of (a batch of back-to-back calls, then block_until_ready),
per call. Ceilings are measured in the same run: a large device-to-device copy (bandwidth)
and a large bf16 matmul (FLOP/s). Other paths: the plain-jnp reference (XLA), jax's own
Pallas GPU ops (decode_attention, paged_attention, flash attention) where they import, and
a sort-based top-p sampler. --quick shrinks every shape (a smoke run, e.g. on a CPU).
--attention-kernels only checks the Triton and the Mosaic GPU attention kernels (decode, then
prefill) against the reference and times them side by side (exit status 1 if one fails or
differs).
--layer-matmul only checks and times the GPU layer matmul (pallas_kernels/gpu/layer_matmul.py)
against XLA's dot over a scan of stacked layers (which copies each layer's slice), at
Llama-3-8B's narrowest and widest shapes (one row; 64 rows of gate_proj), q, k and v in one
call against three dots, and int8 and int4 weights against XLA's path for them (gate_proj,
one row); with --sweep every shape at 1, 64, 128 and 256 rows, a few tile choices at one row
and XLA's dot over separate weights (the ideal it should reach). Exit status 1 if a product
fails or differs from XLA's.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pallas_kernels  # noqa: E402

REPEATS = 5


def median_seconds(fn, *args, budget_s=0.15):
    """Median seconds per call of fn(*args): compiled first, then REPEATS timed batches."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(2, min(200, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples), samples


def report_difference(what, compute):
    try:
        print(f"  {what}: {float(compute()):.3g}", flush=True)
    except Exception as error:
        print(f"  {what}: failed: {type(error).__name__}: {str(error)[:2000]}", flush=True)


class Results:
    def __init__(self):
        self.rows, self.raw = [], {}

    def add(self, kernel, shape, impl, seconds, samples, *, bytes_moved=None, flops=None,
            ceiling=None):
        row = dict(kernel=kernel, shape=shape, impl=impl, median_us=seconds * 1e6)
        if bytes_moved is not None:
            row["achieved"] = f"{bytes_moved / seconds / 1e9:.0f} GB/s"
            row["of_ceiling"] = bytes_moved / seconds / ceiling if ceiling else None
        if flops is not None:
            row["achieved"] = f"{flops / seconds / 1e12:.1f} TFLOP/s"
            row["of_ceiling"] = flops / seconds / ceiling if ceiling else None
        self.rows.append(row)
        self.raw[f"{kernel} {shape} {impl}"] = samples
        print(f"  {kernel:9s} {shape:34s} {impl:24s} {seconds * 1e6:10.1f} us", flush=True)
        return seconds

    def try_add(self, kernel, shape, impl, make_fn, *args, **metrics):
        try:
            seconds, samples = median_seconds(make_fn(), *args)
        except Exception as error:  # other projects' kernels may not import or fit here
            print(f"  {kernel:9s} {shape:34s} {impl:24s} skipped: {type(error).__name__}: "
                  f"{str(error)[:1500]}", flush=True)
            return None
        return self.add(kernel, shape, impl, seconds, samples, **metrics)


def measure_ceilings(results, quick):
    size = (1 << 20) if quick else (1 << 30)                       # bf16 elements: 2 GiB
    x = jnp.ones((size,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    seconds = results.add("ceiling", f"copy {size * 2 >> 20} MiB", "xla", *median_seconds(copy, x))
    bandwidth = 2 * size * 2 / seconds
    n = 512 if quick else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.bfloat16))
    seconds = results.add("ceiling", f"matmul {n}^3 bf16", "xla", *median_seconds(matmul, a, a))
    return bandwidth, 2 * n ** 3 / seconds


# (name, in, out): Llama-3-8B's narrowest product (k_proj) and its two widest.
LAYER_MATMUL_SHAPES = (("k_proj", 4096, 1024), ("gate_proj", 4096, 14336),
                       ("down_proj", 14336, 4096))


def bench_layer_matmul(results, bandwidth, quick, interpret, sweep_tiles=False):
    """The layer matmul over every layer of a stack (a scan, as the scanned model runs it)
    against XLA's dot on the same scan (and, sweeping, on separate weights); then int8 (per
    channel) and int4 weights at one row against XLA's path for them
    (models/quantization.quantized_matmul over the layer's slices). Per-call bytes are the
    weights'. Returns whether every product matched XLA's (relative error < 1e-2)."""
    from pallas_kernels.gpu.layer_matmul import (TILES, LayerMatmulTiles,
                                                 grouped_layer_matmul_gpu, layer_matmul_gpu,
                                                 layer_matmul_reference,
                                                 quantized_layer_matmul_gpu)
    layers = 2 if quick else 32
    shapes = (("small", 256, 128),) if quick else LAYER_MATMUL_SHAPES
    # The H200's 2026-11-30 sweep: the default best by 1-15% over the next three; the last
    # three (more bytes in flight a program) not yet run.
    sweep = (TILES, TILES._replace(block_n=128), TILES._replace(programs=1024),
             LayerMatmulTiles(block_n=64, block_k=64, programs=1024, num_stages=4),
             TILES._replace(block_k=256), TILES._replace(num_stages=4),
             TILES._replace(num_warps=8))
    if not sweep_tiles:
        sweep = sweep[:1]
    if quick:
        sweep = (LayerMatmulTiles(block_n=64, block_k=64, programs=4),)

    def over_layers(product, width=None):   # width: the product's columns (the stack's)
        def run(x, *stacks):
            def body(total, layer):
                return total + product(x, stacks, layer).astype(jnp.float32), None
            start = jnp.zeros((x.shape[0], width or stacks[0].shape[2]), jnp.float32)
            layer_ids = jnp.arange(stacks[0].shape[0], dtype=jnp.int32)
            return jax.lax.scan(body, start, layer_ids)[0]
        return jax.jit(run)

    ok = True

    def check_and_time(shape, label, mine, want, args, metrics):
        nonlocal ok
        try:
            got = mine(*args)
            error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        except Exception as failure:  # noqa: BLE001 - reported, the rest still run
            print(f"  layer matmul {shape} {label}: failed: {type(failure).__name__}: "
                  f"{str(failure)[:1500]}", flush=True)
            ok = False
            return
        print(f"  layer matmul {shape} {label} vs xla: {error:.3g}", flush=True)
        ok &= error < 1e-2
        results.try_add("layer mm", shape, label, lambda: mine, *args, **metrics)

    unstacked = jax.jit(lambda x, weights: sum(
        jnp.dot(x, w, preferred_element_type=jnp.float32) for w in weights))
    # Without --sweep (the device check's stage, 40 s): 64 rows of gate_proj only, the
    # quantized weights on gate_proj only.
    # With --sweep also 128 and 256 rows, which the kernel takes but the engine does not give
    # it yet (kernel_choice.LAYER_MATMUL_MAX_ROWS).
    wide = shapes if quick or sweep_tiles else shapes[1:2]
    for rows in (1,) if quick else (1, 64, 128, 256) if sweep_tiles else (1, 64):
        for name, fan_in, fan_out in shapes if rows == 1 else wide:
            keys = jax.random.split(jax.random.PRNGKey(rows + fan_in), 2)
            x = jax.random.normal(keys[0], (rows, fan_in), jnp.bfloat16)
            stack = jax.random.normal(keys[1], (layers, fan_in, fan_out), jnp.bfloat16)
            shape = f"{name} {rows}x{fan_in}x{fan_out} L{layers}"
            metrics = dict(bytes_moved=stack.size * 2, ceiling=bandwidth)
            xla = over_layers(lambda x, stacks, layer: layer_matmul_reference(x, stacks[0],
                                                                             layer))
            want = xla(x, stack)
            for tiles in sweep if rows == 1 else sweep[:1]:
                label = (f"pallas n{tiles.block_n} k{tiles.block_k} p{tiles.programs} "
                         f"s{tiles.num_stages} w{tiles.num_warps}")
                mine = over_layers(lambda x, stacks, layer, tiles=tiles: layer_matmul_gpu(
                    x, stacks[0], layer, tiles=tiles, interpret=interpret))
                check_and_time(shape, label, mine, want, (x, stack), metrics)
            results.try_add("layer mm", shape, "xla dot, scanned stack", lambda: xla, x, stack,
                            **metrics)
            if sweep_tiles:
                weights = tuple(stack[i] for i in range(layers))
                results.try_add("layer mm", shape, "xla dot, separate weights",
                                lambda: unstacked, x, weights, **metrics)
                del weights
            del stack
    for rows in ((1,) if quick or not sweep_tiles else (1, 64)):   # q, k, v in one call
        widths = (128, 64, 64) if quick else (4096, 1024, 1024)
        fan_in = 256 if quick else 4096
        keys = jax.random.split(jax.random.PRNGKey(rows), 4)
        x = jax.random.normal(keys[0], (rows, fan_in), jnp.bfloat16)
        stacks = tuple(jax.random.normal(key, (layers, fan_in, width), jnp.bfloat16)
                       for key, width in zip(keys[1:], widths))
        shape = f"qkv {rows}x{fan_in}x{'+'.join(map(str, widths))} L{layers}"
        metrics = dict(bytes_moved=sum(stack.size * 2 for stack in stacks), ceiling=bandwidth)
        xla = over_layers(lambda x, stacks, layer: jnp.concatenate(
            [layer_matmul_reference(x, stack, layer) for stack in stacks], axis=1), sum(widths))
        mine = over_layers(lambda x, stacks, layer: jnp.concatenate(grouped_layer_matmul_gpu(
            x, stacks, layer, tiles=sweep[0], interpret=interpret), axis=1), sum(widths))
        check_and_time(shape, "pallas, one call", mine, xla(x, *stacks), (x, *stacks), metrics)
        results.try_add("layer mm", shape, "xla dots, scanned stacks", lambda: xla, x, *stacks,
                        **metrics)
        del stacks
    for kind in ("int8", "int4"):
        for name, fan_in, fan_out in wide:
            x, arrays = quantized_stacks(kind, layers, fan_in, fan_out)
            shape = f"{name} 1x{fan_in}x{fan_out} L{layers} {kind}"
            metrics = dict(bytes_moved=sum(a.size * a.dtype.itemsize for a in arrays),
                           ceiling=bandwidth)
            xla = over_layers(functools.partial(quantized_reference, kind=kind))
            mine = over_layers(lambda x, stacks, layer, kind=kind: quantized_layer_matmul_gpu(
                x, stacks, layer, kind=kind, tiles=sweep[0], interpret=interpret))
            check_and_time(shape, f"pallas {kind}", mine, xla(x, *arrays), (x, *arrays),
                           metrics)
            results.try_add("layer mm", shape, f"xla {kind}, scanned stack", lambda: xla, x,
                            *arrays, **metrics)
            del arrays
    return ok


def quantized_stacks(kind, layers, fan_in, fan_out):
    """x bf16[1, in] and random int8 (per channel) or int4 (groups of 32) arrays stacked on
    [layers], as models/quantization.py lays them out (values drawn directly: any bits)."""
    keys = jax.random.split(jax.random.PRNGKey(fan_in + fan_out), 4)
    x = jax.random.normal(keys[0], (1, fan_in), jnp.bfloat16)
    if kind == "int8":
        q = jax.random.randint(keys[1], (layers, fan_in, fan_out), -127, 128, jnp.int8)
        scale = jax.random.uniform(keys[2], (layers, 1, fan_out), jnp.float32) * 1e-3
        return x, (q, scale)
    packed = jax.random.randint(keys[1], (layers, fan_in // 2, fan_out), 0, 256, jnp.uint8)
    scale = jax.random.uniform(keys[2], (layers, fan_in // 32, fan_out), jnp.float32) * 1e-3
    minimum = -8 * scale
    return x, (packed, scale, minimum)


def quantized_reference(x, stacks, layer, *, kind):
    """XLA's path for a scanned quantized layer: quantized_matmul over the layer's slices."""
    from models.quantization import Int4Weight, Int8Weight, quantized_matmul
    weight = (Int8Weight if kind == "int8" else Int4Weight)(
        *(jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False) for stack in stacks))
    return quantized_matmul(x, weight)


def paged_decode_batch(rng, seqs, context, page_size, num_q_heads, num_kv_heads, head_dim,
                       dtype=jnp.bfloat16):
    """A decode step: one row per sequence, each with `context` tokens (an int, or one per
    sequence) in random pages; page-table entries past a sequence's pages are page 0."""
    contexts = np.broadcast_to(np.asarray(context, np.int32), (seqs,))
    pages_of = -(-contexts // page_size)                                  # i32[seqs]
    num_pages = int(pages_of.sum()) + 1
    kv_pages = jax.random.normal(jax.random.PRNGKey(0),
                                 (num_pages, page_size, 2 * num_kv_heads, head_dim), dtype)
    order, ends = 1 + rng.permutation(num_pages - 1), np.cumsum(pages_of)
    page_indices = np.zeros((seqs, int(pages_of.max())), np.int32)
    for s, (count, end) in enumerate(zip(pages_of, ends)):
        page_indices[s, :count] = order[end - count:end]
    q = jax.random.normal(jax.random.PRNGKey(1), (seqs, num_q_heads, head_dim), dtype)
    return (q, kv_pages, jnp.asarray(contexts), jnp.asarray(page_indices),
            jnp.arange(seqs + 1, dtype=jnp.int32), jnp.asarray([seqs], jnp.int32))


def bench_decode(results, rng, seqs, context, bandwidth, interpret):
    heads, kv_heads, head_dim, page_size = 32, 8, 128, 16
    args = paged_decode_batch(rng, seqs, context, page_size, heads, kv_heads, head_dim)
    q, kv_pages, kv_lens, page_indices = args[:4]
    shape = f"S={seqs} ctx={context} 32/8 d128 p{page_size}"
    kv_bytes = seqs * context * 2 * kv_heads * head_dim * 2
    metrics = dict(bytes_moved=kv_bytes + 2 * q.size * 2, ceiling=bandwidth)
    attention = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=head_dim ** -0.5)
    ours = jax.jit(functools.partial(attention, backend="gpu", interpret=interpret))
    reference = jax.jit(functools.partial(attention, backend="reference"))
    report_difference("decode", lambda: jnp.abs(
        ours(*args).astype(jnp.float32) - reference(*args).astype(jnp.float32)).max())
    mine = results.try_add("decode", shape, "ember gpu", lambda: ours, *args, **metrics)
    results.try_add("decode", shape, "ember reference (xla)", lambda: reference, *args, **metrics)
    bench_decode_kv_dtypes(results, ours, args, shape, bandwidth)

    def jax_paged():
        from jax.experimental.pallas.ops.gpu import paged_attention as ops
        return jax.jit(lambda q, k, v, tables, lens: ops.paged_attention(q, k, v, tables, lens))
    k_pages = jnp.moveaxis(kv_pages[:, :, 0::2], 2, 0)          # [Hkv, pages, page, D]
    v_pages = jnp.moveaxis(kv_pages[:, :, 1::2], 2, 0)
    results.try_add("decode", shape, "jax ops paged_attention", jax_paged, q, k_pages, v_pages,
                    page_indices, kv_lens, **metrics)
    del k_pages, v_pages

    def jax_gqa():
        from jax.experimental.pallas.ops.gpu import decode_attention as ops
        return jax.jit(lambda q, k, v: ops.gqa(q, k, v))
    contiguous = kv_pages[page_indices].reshape(seqs, context, 2 * kv_heads, head_dim)
    results.try_add("decode", shape, "jax ops decode gqa", jax_gqa, q, contiguous[:, :, 0::2],
                    contiguous[:, :, 1::2], **metrics)
    return mine


KERNEL_TOLERANCE = 3e-2   # max |kernel - reference| of bf16 outputs


def compare_kernels(results, kind, args, shape, metrics, interpret) -> bool:
    """Each `kind` ("decode" or "prefill") kernel by name (pallas_kernels/gpu/kernel_choice.py;
    the other kind on Triton), against the reference and timed. True if both ran and stayed
    within KERNEL_TOLERANCE (Mosaic GPU declining this shape, or missing from this jax, counts
    as a pass: Triton runs instead)."""
    from pallas_kernels.compat import has_mosaic_gpu
    from pallas_kernels.gpu.ragged_paged_attention import ragged_paged_attention_gpu
    sm_scale = args[0].shape[2] ** -0.5
    reference = jax.jit(functools.partial(pallas_kernels.ragged_paged_attention,
                                          sm_scale=sm_scale, backend="reference"))
    expected = reference(*args).astype(jnp.float32)
    ok = True
    for kernel in ("triton", "mosaic") if has_mosaic_gpu() else ("triton",):
        choice = dict(decode_kernel="triton", prefill_kernel="triton")
        choice[f"{kind}_kernel"] = kernel
        fn = jax.jit(functools.partial(ragged_paged_attention_gpu, sm_scale=sm_scale,
                                       interpret=interpret, **choice))
        try:
            difference = float(jnp.abs(fn(*args).astype(jnp.float32) - expected).max())
        except Exception as error:
            print(f"  {kind} {kernel}: failed: {type(error).__name__}: {str(error)[:2000]}",
                  flush=True)
            ok = False
            continue
        print(f"  {kind} {kernel} vs reference: {difference:.3g}", flush=True)
        ok &= difference <= KERNEL_TOLERANCE
        results.try_add(kind, shape, f"ember gpu {kernel}", lambda: fn, *args, **metrics)
    return ok


def attention_kernels_only(results, rng, quick, interpret) -> bool:
    """--attention-kernels: both decode kernels on two shapes (bandwidth, no ceiling measured),
    then both prefill kernels on one (FLOP/s)."""
    ok = True
    heads, kv_heads, head_dim, page_size = 32, 8, 128, 16
    for seqs, context in [(4, 256)] if quick else [(64, 4096), (8, 1000)]:
        args = paged_decode_batch(rng, seqs, -(-context // page_size) * page_size, page_size,
                                  heads, kv_heads, head_dim)
        args = (args[0], args[1], jnp.full((seqs,), context, jnp.int32), *args[3:])
        shape = f"S={seqs} ctx={context} 32/8 d128 p{page_size}"
        kv_bytes = seqs * context * 2 * kv_heads * head_dim * 2
        ok &= compare_kernels(results, "decode", args, shape, dict(bytes_moved=kv_bytes),
                              interpret)
    seqs, length = (2, 128) if quick else (8, 2048)
    args, shape, flops = prefill_batch(seqs, length)
    ok &= compare_kernels(results, "prefill", args, shape, dict(flops=flops), interpret)
    return ok


def bench_decode_kv_dtypes(results, ours, args, shape, bandwidth):
    """The same decode step over fp8 and int8 copies of the bf16 cache: bytes moved shrink
    with the cache (int8 adds its scales); the difference is against the bf16 cache's output."""
    from pallas_kernels.kv_cache import kv_cache_bytes_per_token, quantize
    q, kv_pages, kv_lens = args[:3]
    tokens = int(kv_lens.sum())
    num_kv_heads, head_dim = kv_pages.shape[2] // 2, kv_pages.shape[3]
    bf16_out = ours(*args).astype(jnp.float32)
    for name in ("float8_e4m3fn", "int8"):
        cache = jax.jit(quantize, static_argnums=1)(kv_pages, name)   # (values, scales)
        step = functools.partial(ours, kv_scales=cache[1])
        cached = (q, cache[0], *args[2:])
        report_difference(f"decode kv {name} vs bf16 kv", lambda cached=cached: jnp.abs(
            step(*cached).astype(jnp.float32) - bf16_out).max())
        kv_bytes = tokens * kv_cache_bytes_per_token(num_kv_heads, head_dim, name)
        results.try_add("decode", f"{shape} kv {name}", "ember gpu", lambda: step, *cached,
                        bytes_moved=kv_bytes + 2 * q.size * 2, ceiling=bandwidth)
        del cache, cached


def prefill_batch(seqs, length, heads=32, kv_heads=8, head_dim=128, page_size=16):
    """A step of `seqs` whole prompts of `length` tokens in consecutive pages.

    Returns the attention arguments, a shape label and the causal attention's FLOPs."""
    tokens = seqs * length
    key = jax.random.PRNGKey(2)
    q = jax.random.normal(key, (tokens, heads, head_dim), jnp.bfloat16)
    num_pages = tokens // page_size + 1
    kv_pages = jax.random.normal(key, (num_pages, page_size, 2 * kv_heads, head_dim), jnp.bfloat16)
    page_indices = jnp.arange(1, num_pages, dtype=jnp.int32).reshape(seqs, -1)
    args = (q, kv_pages, jnp.full((seqs,), length, jnp.int32), page_indices,
            jnp.arange(seqs + 1, dtype=jnp.int32) * length, jnp.asarray([seqs], jnp.int32))
    flops = 4 * seqs * heads * head_dim * length * (length + 1) / 2
    return args, f"{seqs}x{length} causal {heads}/{kv_heads} d{head_dim}", flops


def bench_prefill(results, seqs, length, flops_ceiling, interpret):
    heads, kv_heads, head_dim = 32, 8, 128
    args, shape, flops = prefill_batch(seqs, length, heads, kv_heads, head_dim)
    q, kv_pages, _, page_indices = args[:4]
    metrics = dict(flops=flops, ceiling=flops_ceiling)
    ours = jax.jit(functools.partial(pallas_kernels.ragged_paged_attention,
                                     sm_scale=head_dim ** -0.5, backend="gpu",
                                     interpret=interpret))
    mine = results.try_add("prefill", shape, "ember gpu", lambda: ours, *args, **metrics)
    # Equal shapes for the dense kernels: [B, L, H, D], K/V heads repeated for MHA-only ones.
    dense_q = q.reshape(seqs, length, heads, head_dim)
    contiguous = kv_pages[page_indices].reshape(seqs, length, 2 * kv_heads, head_dim)
    k, v = contiguous[:, :, 0::2], contiguous[:, :, 1::2]
    repeat = lambda x: jnp.repeat(x, heads // kv_heads, axis=2)

    def jax_flash():
        from jax.experimental.pallas.ops.gpu import attention as ops
        return jax.jit(lambda q, k, v: ops.mha(q, k, v, None, sm_scale=head_dim ** -0.5,
                                               causal=True))
    flash = results.try_add("prefill", shape, "jax ops flash mha", jax_flash, dense_q,
                            repeat(k), repeat(v), **metrics)
    for impl in ("xla", "cudnn"):
        make = lambda impl=impl: jax.jit(functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation=impl))
        results.try_add("prefill", shape, f"jax.nn dpa {impl}", make, dense_q, k, v, **metrics)
    return mine, flash


def sort_top_p(logits, temperature, top_p, keys):
    """The usual sampler this project avoids: full sort, cumulative sum, categorical draw."""
    tempered = logits / temperature[:, None]
    order = jnp.argsort(-tempered, axis=-1)
    ordered = jnp.take_along_axis(tempered, order, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
    masked = jnp.where(keep, ordered, -jnp.inf)
    draw = jax.vmap(lambda k, row: jax.random.categorical(jax.random.wrap_key_data(k), row))
    return jnp.take_along_axis(order, draw(keys, masked)[:, None], axis=-1)[:, 0]


def bench_sampling(results, rows, vocab, interpret):
    key = jax.random.PRNGKey(3)
    logits = jax.random.normal(key, (rows, vocab), jnp.float32) * 3
    temperature = jnp.full((rows,), 0.8, jnp.float32)
    top_k = jnp.zeros((rows,), jnp.int32)
    top_p = jnp.full((rows,), 0.9, jnp.float32)
    min_p = jnp.zeros((rows,), jnp.float32)
    keys = jax.random.key_data(jax.random.split(key, rows))
    args = (logits, temperature, top_k, top_p, min_p, keys)
    shape = f"S={rows} V={vocab} top_p=0.9"
    ours = jax.jit(functools.partial(pallas_kernels.sample, backend="gpu", interpret=interpret))
    reference = jax.jit(functools.partial(pallas_kernels.sample, backend="reference"))
    report_difference("sampling: share of rows where kernel and reference differ", lambda: jnp.mean(
        ours(*args)[0] != reference(*args)[0]))
    mine = results.try_add("sample", shape, "ember gpu", lambda: ours, *args)
    results.try_add("sample", shape, "ember reference (xla)", lambda: reference, *args)
    baseline = results.try_add("sample", shape, "sort-based top-p (xla)",
                               lambda: jax.jit(sort_top_p), logits, temperature, top_p, keys)
    top_k_args = (logits, temperature, jnp.full((rows,), 50, jnp.int32), top_p, min_p, keys)
    results.try_add("sample", f"S={rows} V={vocab} k=50 p=0.9", "ember gpu", lambda: ours,
                    *top_k_args)
    return mine, baseline


def sweep_block_sizes(results, rng, interpret):
    """Times the attention kernels under a few block-size choices (for the tuned table)."""
    from pallas_kernels.gpu.block_sizes import AttentionBlockSizes
    from pallas_kernels.gpu.ragged_paged_attention import ragged_paged_attention_gpu
    seqs, length, heads, kv_heads, head_dim = 8, 2048, 32, 8, 128
    tokens, num_pages = seqs * length, seqs * length // 16 + 1
    key = jax.random.PRNGKey(4)
    prefill = (jax.random.normal(key, (tokens, heads, head_dim), jnp.bfloat16),
               jax.random.normal(key, (num_pages, 16, 2 * kv_heads, head_dim), jnp.bfloat16),
               jnp.full((seqs,), length, jnp.int32),
               jnp.arange(1, num_pages, dtype=jnp.int32).reshape(seqs, -1),
               jnp.arange(seqs + 1, dtype=jnp.int32) * length, jnp.asarray([seqs], jnp.int32))
    for block_m, block_kv, warps, stages in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
                                             (64, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 2)]:
        sizes = AttentionBlockSizes(prefill_block_m=block_m, prefill_block_kv=block_kv,
                                    prefill_num_warps=warps, prefill_num_stages=stages)
        fn = functools.partial(ragged_paged_attention_gpu, sm_scale=0.1, block_sizes=sizes,
                               interpret=interpret)
        results.try_add("sweep", f"prefill m{block_m} kv{block_kv} w{warps} s{stages}",
                        "ember gpu", lambda: fn, *prefill)
    decode = paged_decode_batch(rng, 64, 4096, 16, heads, kv_heads, head_dim)
    for block_kv, warps, stages, splits in [(64, 4, 3, 16), (128, 4, 2, 16), (64, 4, 4, 16),
                                            (32, 4, 4, 16), (64, 4, 3, 4), (128, 8, 3, 16)]:
        sizes = AttentionBlockSizes(decode_block_kv=block_kv, decode_num_warps=warps,
                                    decode_num_stages=stages, decode_max_splits=splits,
                                    decode_target_programs=528)
        fn = functools.partial(ragged_paged_attention_gpu, sm_scale=0.1, block_sizes=sizes,
                               interpret=interpret)
        results.try_add("sweep", f"decode kv{block_kv} w{warps} s{stages} splits<={splits}",
                        "ember gpu", lambda: fn, *decode)


def sweep_sampling(results, interpret):
    from pallas_kernels.gpu.sampling import SamplingBlockSizes, sample_gpu
    from pallas_kernels.sampling_primitives import sampling_noise_bits
    rows, vocab = 256, 128256
    key = jax.random.PRNGKey(5)
    args = (jax.random.normal(key, (rows, vocab), jnp.float32) * 3,
            jnp.full((rows,), 0.8, jnp.float32), jnp.zeros((rows,), jnp.int32),
            jnp.full((rows,), 0.9, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jax.random.key_data(jax.random.split(key, rows)))
    for block_v, search_block_v, radix_bits, warps in [(1024, 512, 4, 8), (2048, 512, 4, 8),
                                                        (1024, 256, 4, 4), (1024, 512, 2, 8),
                                                        (1024, 256, 8, 8), (512, 256, 4, 4)]:
        sizes = SamplingBlockSizes(block_v=block_v, search_block_v=search_block_v,
                                   radix_bits=radix_bits, num_warps=warps)
        fn = jax.jit(functools.partial(sample_gpu, block_sizes=sizes, interpret=interpret))
        results.try_add("sweep", f"sample v{block_v} s{search_block_v} r{radix_bits} w{warps}",
                        "ember gpu", lambda: fn, *args)
    noise = jax.jit(lambda keys: sampling_noise_bits(keys, vocab))
    results.try_add("sweep", "sample noise bits only", "xla", lambda: noise, args[-1])


def markdown(results, targets):
    lines = ["| kernel | shape | impl | median (us) | achieved | of ceiling |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in results.rows:
        share = row.get("of_ceiling")
        lines.append(f"| {row['kernel']} | {row['shape']} | {row['impl']} | "
                     f"{row['median_us']:.1f} | {row.get('achieved', '')} | "
                     f"{'' if share is None else f'{share:.0%}'} |")
    lines += ["", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {name} | {measured} | {verdict} |" for name, measured, verdict in targets]
    return "\n".join(lines)


def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for table.md, timings.json/.csv")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--sweep", action="store_true", help="only time block-size choices")
    parser.add_argument("--layer-matmul", action="store_true",
                        help="only check and time the GPU layer matmul against XLA's dot")
    parser.add_argument("--attention-kernels", action="store_true",
                        help="only check and time the Triton and Mosaic GPU attention kernels")
    options = parser.parse_args()
    quick = options.quick
    interpret = jax.default_backend() != "gpu"  # a CPU smoke run interprets the kernels
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind} ({jax.default_backend()})", flush=True)
    results, rng = Results(), np.random.default_rng(0)
    if options.sweep and not options.layer_matmul:
        sweep_sampling(results, interpret)
        return sweep_block_sizes(results, rng, interpret)
    if options.attention_kernels:
        ok = attention_kernels_only(results, rng, quick, interpret)
        print(f"\n{markdown(results, [])}\n\nattention kernels: {'PASS' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)
    bandwidth, flops = measure_ceilings(results, quick)
    if options.layer_matmul:
        ok = bench_layer_matmul(results, bandwidth, quick, interpret, options.sweep)
        print(f"\n{markdown(results, [])}\n\nlayer matmul: {'PASS' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)
    targets = []
    for seqs, context in ([(4, 256)] if quick else [(64, 4096), (32, 16384)]):
        mine = bench_decode(results, rng, seqs, context, bandwidth, interpret)
        kv_bytes = seqs * context * 2 * 8 * 128 * 2
        share = None if mine is None else kv_bytes / mine / bandwidth
        targets.append((f"decode ctx {context} >= 80% of copy bandwidth",
                        "failed" if share is None else f"{share:.0%}",
                        verdict(None if share is None else share >= 0.8)))
    mine, flash = bench_prefill(results, *((2, 128) if quick else (8, 2048)), flops, interpret)
    ratio = None if mine is None or flash is None else mine / flash
    targets.append(("prefill within 1.5x of jax flash attention",
                    "n/a" if ratio is None else f"{ratio:.2f}x its time",
                    verdict(None if ratio is None else ratio <= 1.5)))
    mine, baseline = bench_sampling(results, *((8, 1000) if quick else (256, 128256)), interpret)
    speedup = None if mine is None or baseline is None else baseline / mine
    targets.append(("sampling >= 3x faster than sort-based top-p",
                    "n/a" if speedup is None else f"{speedup:.2f}x",
                    verdict(None if speedup is None else speedup >= 3)))
    table = markdown(results, targets)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"{stamp}, {device.device_kind}, jax {jax.__version__}"
    print(f"\n{header}\n\n{table}")
    if options.out:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "table.md").write_text(f"{header}\n\n{table}\n")
        (options.out / "timings.json").write_text(json.dumps(
            dict(header=header, rows=results.rows, samples_s=results.raw), indent=1))
        with open(options.out / "timings.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["kernel", "shape", "impl", "median_us", "achieved",
                                             "of_ceiling"])
            writer.writeheader()
            writer.writerows(results.rows)


if __name__ == "__main__":
    main()
