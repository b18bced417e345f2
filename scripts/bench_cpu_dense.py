"""Times the CPU dense kernel (pallas_kernels/cpu/dense_matmul.cc) against XLA's dot, side by
side in one process, on f32 products of given shapes and row counts.

  python scripts/bench_cpu_dense.py [--shapes 512x1376,2048x8192] [--rows 16,64,256]
                                    [--chain 6] [--rounds 20]

Each timed call is a jitted chain of `--chain` products of the same x by distinct weights
(as a layer's products follow one another, each weight read from wherever it lies), the kernel
and XLA's dot in turn, `--rounds` times; medians are reported as GFLOP/s (2 rows in out per
product) and the kernel's time over XLA's. Every real row is computed (num_rows = rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import cpu  # noqa: E402

# The bench_offline 25m preset's shapes (the LM head last), then a Llama-3.2-1B layer's.
DEFAULT_SHAPES = "512x512,512x1376,1376x512,512x8192,2048x2048,2048x8192,8192x2048"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in shape.split("x")) for shape in text.split(",")]


def time_pair(rows: int, fan_in: int, fan_out: int, chain: int, rounds: int):
    rng = np.random.default_rng(fan_in * 7 + fan_out)
    weights = [jnp.asarray(rng.standard_normal((fan_in, fan_out), np.float32))
               for _ in range(chain)]
    x = jnp.asarray(rng.standard_normal((rows, fan_in), np.float32))
    num_rows = jnp.asarray([rows], jnp.int32)
    kernel = jax.jit(lambda x, ws: sum(cpu.dense_matmul_cpu(x, w, num_rows) for w in ws))
    xla = jax.jit(lambda x, ws: sum(x @ w for w in ws))
    want, got = np.asarray(xla(x, weights)), np.asarray(kernel(x, weights))
    error = np.abs(got - want).max() / np.abs(want).max()
    if error > 1e-4:
        raise SystemExit(f"{rows}x{fan_in}x{fan_out}: the kernel differs from XLA's dot "
                         f"(relative error {error:.2e})")
    times = {"kernel": [], "xla": []}
    for _ in range(rounds):
        for name, fn in (("kernel", kernel), ("xla", xla)):
            start = time.perf_counter()
            fn(x, weights).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="in x out, comma-separated")
    parser.add_argument("--rows", default="16,64,256")
    parser.add_argument("--chain", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if jax.default_backend() != "cpu" or not cpu.available():
        raise SystemExit("the C++ kernels need the CPU backend and a C++ compiler")
    print("| rows x in x out | kernel GFLOP/s | XLA GFLOP/s | kernel time / XLA's |")
    print("| --- | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        for fan_in, fan_out in parse_shapes(args.shapes):
            seconds = time_pair(rows, fan_in, fan_out, args.chain, args.rounds)
            flops = 2 * rows * fan_in * fan_out * args.chain
            print(f"| {rows} x {fan_in} x {fan_out} | {flops / seconds['kernel'] / 1e9:.0f} | "
                  f"{flops / seconds['xla'] / 1e9:.0f} | "
                  f"{seconds['kernel'] / seconds['xla']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
