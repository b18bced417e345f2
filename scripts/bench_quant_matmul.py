"""Times x @ w with weights kept int8/int4 (models/quantization.py) against an f32 dense matmul,
in each formulation considered, and says what the compiled program allocates.

  python scripts/bench_quant_matmul.py [--shapes 576x1536,4096x14336] [--batches 1,64]
                                       [--only loop,dense]

Formulations (each computes x @ w from the same dequantized values, except int8-act):
  dense         f32 x @ w, the baseline
  dequant-dot   x @ dequantize(w): a full f32 [in, out] unless XLA fuses the convert
  direct        quantized_matmul with block_rows = in: one dot per nibble half (int4)
  loop          quantized_matmul's CPU default: a loop over blocks of input rows
  group-einsum  per group (x_g @ q_g) * s_g (+ sum(x_g) * m_g), the [groups, 32, out] form
  reduce        one fused multiply-reduce, no dot
  int8-act      x quantized per row to int8, an i32-accumulated int8 dot (int8 per channel)

Times are the best of 5 batches of calls (the machine may be shared). "largest buffer" is the
biggest array a non-fused instruction of the compiled program produces (parameters excluded):
what a formulation materialises per call. "error" is the max |y - x @ dequantize(w)| against a
float64 reference. On a GPU, compare "direct" (the default off a CPU) with "loop".
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import quantization as quant  # noqa: E402

REPEATS = 5
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(")
_SKIPPED_OPS = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant", "copy-start"}


def best_us(fn, *args, budget_s=0.2) -> float:
    """Fastest of REPEATS timed batches, per call (the least disturbed by other load)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, min(200, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    samples = []
    for _ in range(REPEATS if calls > 1 else 2):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return min(samples) * 1e6


def largest_buffer(compiled_text: str) -> str:
    """dtype[shape] of the biggest array a non-fused instruction produces."""
    best, best_bytes, in_fusion = "-", 0, False
    for line in compiled_text.splitlines():
        if line and not line[0].isspace():                  # a computation's header
            in_fusion = "fused" in line.split("(")[0] or "fusion" in line.split("(")[0]
            continue
        match = _INSTRUCTION.match(line)
        if in_fusion or not match or match.group(3) in _SKIPPED_OPS:
            continue
        dtype, dims = match.group(1), [int(d) for d in match.group(2).split(",") if d]
        size = int(np.prod(dims)) * max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
        if size > best_bytes:
            best, best_bytes = f"{dtype}[{match.group(2)}]", size
    return best


def formulations(weight):
    in_features = weight.shape[0]
    table = {
        "dequant-dot": lambda x, w: x @ quant.dequantize(w),
        "direct": lambda x, w: quant.quantized_matmul(x, w, block_rows=in_features),
        "loop": lambda x, w: quant.quantized_matmul(
            x, w, block_rows=quant.default_block_rows(w, backend="cpu")),
        "group-einsum": _group_einsum,
        "reduce": lambda x, w: jnp.sum(x[:, :, None] * quant.dequantize(w), axis=1),
    }
    if isinstance(weight, quant.Int8Weight) and weight.scale.shape[0] == 1:
        table["int8-act"] = _int8_activations
    return table


def _group_einsum(x, weight):
    scale = weight.scale.astype(jnp.float32)
    if isinstance(weight, quant.Int8Weight):
        q = weight.q.reshape(scale.shape[0], -1, weight.shape[1]).astype(jnp.float32)
        xg = x.reshape(x.shape[0], scale.shape[0], -1)
        return jnp.einsum("bgo,go->bo", jnp.einsum("bgk,gko->bgo", xg, q), scale)
    packed = weight.packed.reshape(scale.shape[0], 16, weight.shape[1])
    q = jnp.concatenate([packed & 15, packed >> 4], axis=1).astype(jnp.float32)
    xg = x.reshape(x.shape[0], scale.shape[0], 32)
    partial = jnp.einsum("bgk,gko->bgo", xg, q)
    return (jnp.einsum("bgo,go->bo", partial, scale)
            + xg.sum(-1) @ weight.minimum.astype(jnp.float32))


def _int8_activations(x, weight):
    x_scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
    x_q = jnp.round(x / x_scale).astype(jnp.int8)
    product = jnp.dot(x_q, weight.q, preferred_element_type=jnp.int32).astype(jnp.float32)
    return product * x_scale * weight.scale[0].astype(jnp.float32)


def weights(in_features: int, out_features: int, rng):
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as Q
    w = rng.standard_normal((in_features, out_features), np.float32) * 0.02
    as_gguf = lambda qtype: quant.from_gguf_blocks(
        qtype, quants.quantize(np.ascontiguousarray(w.T), qtype), (out_features, in_features))
    host = {"int8": quant.quantize_int8(w), "q8_0": as_gguf(Q.Q8_0),
            "int4": quant.quantize_int4(w), "q4_1": as_gguf(Q.Q4_1)}
    return w, {name: jax.tree.map(jnp.asarray, value) for name, value in host.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="576x1536,4096x14336")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--only", default="", help="comma-separated formulation names")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'shape':>11} {'batch':>5} {'weight':>6} {'formulation':>13} {'us':>10} "
          f"{'error':>9}  largest buffer")
    for shape in args.shapes.split(","):
        in_features, out_features = map(int, shape.split("x"))
        w, quantized = weights(in_features, out_features, rng)
        for batch in map(int, args.batches.split(",")):
            x = jnp.asarray(rng.standard_normal((batch, in_features), np.float32))
            rows = [("f32", "dense", lambda x, w: x @ w, jnp.asarray(w), w)]
            for name, weight in quantized.items():
                exact = np.asarray(quant.dequantize(weight), np.float64)
                rows += [(name, f, fn, weight, exact) for f, fn in formulations(weight).items()]
            for name, formulation, fn, weight, exact in rows:
                if only and formulation not in only:
                    continue
                jitted = jax.jit(fn)
                buffer = largest_buffer(jitted.lower(x, weight).compile().as_text())
                error = np.abs(np.asarray(jitted(x, weight), np.float64)
                               - np.asarray(x, np.float64) @ exact).max()
                print(f"{shape:>11} {batch:>5} {name:>6} {formulation:>13} "
                      f"{best_us(jitted, x, weight):>10.1f} {error:>9.2g}  {buffer}",
                      flush=True)


if __name__ == "__main__":
    main()
