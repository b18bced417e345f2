"""Does a dispatch block the host while the device is busy? One probe per kind of call.

An engine step overlaps host work with the device only if launching a computation returns
before the computations queued ahead of it finish. On an H200 (2026-11-30, docs/perf.md) the
engine's host time at 64 requests was the whole step (25 ms, of it 20 ms of device work,
and the device idle 5 ms a step, about what the host's Python takes): as if some call
in the step waited for the device. This script finds which kinds of call do, without a
model: it queues a computation that keeps the device busy for about --busy-ms, then times
the host's return from one probe call, for each probe:

  device args        a jitted call on device arrays only (the baseline)
  numpy 256 B ...    the same with one numpy argument of 256 B, 4, 16 and 64 KiB and 1 MiB
                     (a step's page table is 292 B at batch 1, 18.7 KB at 64 sequences and
                     75 KB at 256 in bench_gpu_e2e's workload)
  16 numpy args      sixteen small numpy arguments (a step's batch and sampling arrays)
  device_put 64 KiB  jax.device_put of a numpy array, alone
  donated busy out   a call donating the busy computation's own output (the KV cache that
                     the step before writes)
  step-like          donating the busy output, with sixteen numpy arguments (an engine's
                     forward: the cache the step before writes, and the batch's arrays)
  lax.cond           a call whose body holds a lax.cond on a device value
  while (dynamic)    a call whose body holds a while loop with a trip count read on the device
  scan (static)      a call whose body holds a lax.scan of fixed length (the scanned layers)
  to host, ready     np.asarray of a small array computed before the busy one (collect())
  copy to host, busy copy_to_host_async of the busy computation's output (the runner starts
                     each sampler output's trip to the host so, right after dispatching it)
  busy again, ...    the busy program itself once more, on the same input buffer, on
                     another one, on a numpy array (an engine's next step: the same
                     executable, its inputs in new buffers). XLA's GPU backend replays
                     recorded CUDA graphs (command buffers) and records them again when an
                     input's address changes: a wait there shows in these rows, and
                     running the script again with XLA_FLAGS=--xla_gpu_enable_command_buffer=
                     (none) tells whether the graphs are the cause

A probe "blocks" when its return took more than half of what the busy computation had left.
Rows: probe, host ms of the call, the busy computation's ms, blocks yes/no. --out DIR writes
NAME.json there (--name, default dispatch).

  python scripts/bench_dispatch.py [--busy-ms 30] [--out DIR] [--name dispatch]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

BLOCKS_AT = 0.5   # share of the busy computation's time a probe's return may take
LAYERS = 8        # of the busy computation's scan


def busy_computation(busy_ms: float):
    """(a jitted function keeping the device busy about busy_ms, its input): layers as an
    engine's forward runs them, a scan over a stack of weights (each iteration slicing its
    layer, a norm, two products), repeated a number of times calibrated here."""
    gpu = jax.default_backend() == "gpu"
    side, dtype = (4096, jnp.bfloat16) if gpu else (256, jnp.float32)
    keys = jax.random.split(jax.random.key(0))
    weights = jax.random.normal(keys[0], (LAYERS, side, side), dtype) / side ** 0.5
    x = jax.random.normal(keys[1], (side, side), dtype)

    def layer(y, weight):
        normed = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + 1e-6)
        return y + jnp.tanh(normed @ weight) @ weight, None

    @functools.partial(jax.jit, static_argnames="repeats")
    def layered(x, weights, repeats):
        return jax.lax.fori_loop(0, repeats, lambda _, y: jax.lax.scan(layer, y, weights)[0],
                                 x)

    one = timed(lambda: layered(x, weights, repeats=4).block_until_ready()) / 4
    repeats = max(1, round(busy_ms / 1e3 / one))
    return functools.partial(layered, weights=weights, repeats=repeats), x


def timed(call) -> float:
    """Seconds of call() after a first, untimed one (compiles)."""
    call()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def probes(busy, x: jax.Array) -> dict:
    """name -> (prepare(busy_output) -> call, run once untimed first)."""
    small = jnp.ones((64,), jnp.int32)
    add = jax.jit(lambda a, b: a + b.sum())
    many = jax.jit(lambda a, *rest: a + sum(r.sum() for r in rest))
    donate = jax.jit(lambda y: y * 2, donate_argnums=0)
    step = jax.jit(lambda y, *rest: y * 2 + sum(r.sum() for r in rest), donate_argnums=0)
    batch = [np.arange(64, dtype=np.int32)] * 16
    cond = jax.jit(lambda a: jax.lax.cond(a.sum() > 0, lambda v: v + 1, lambda v: v - 1, a))
    dynamic = jax.jit(lambda a: jax.lax.while_loop(lambda c: c[0] < c[1][0] % 5 + 3,
                                                   lambda c: (c[0] + 1, c[1] + 1),
                                                   (0, a))[1])
    scan = jax.jit(lambda a: jax.lax.scan(lambda c, _: (c + 1, None), a, None, length=32)[0])
    ready = small + 1
    other_x = x + 0   # the same values in another buffer
    host_x = np.asarray(x)
    jax.block_until_ready((ready, other_x))

    def numpy_arg(nbytes):
        host = np.arange(nbytes // 4, dtype=np.int32)
        return lambda _: lambda: add(small, host)

    return {
        "device args": lambda _: lambda: add(small, small),
        "numpy 256 B": numpy_arg(256),
        "numpy 4 KiB": numpy_arg(4 << 10),
        "numpy 16 KiB": numpy_arg(16 << 10),
        "numpy 64 KiB": numpy_arg(64 << 10),
        "numpy 1 MiB": numpy_arg(1 << 20),
        "16 numpy args": lambda _: lambda: many(small, *batch),
        "device_put 64 KiB": lambda _: lambda: jax.device_put(np.ones(16 << 10, np.int32)),
        "donated busy out": lambda out: lambda: donate(out),
        "step-like": lambda out: lambda: step(out, *batch),
        "lax.cond": lambda _: lambda: cond(small),
        "while (dynamic)": lambda _: lambda: dynamic(small),
        "scan (static)": lambda _: lambda: scan(small),
        "to host, ready": lambda _: lambda: np.asarray(ready),
        "copy to host, busy": lambda out: out.copy_to_host_async,
        "busy again, same input": lambda _: lambda: busy(x),
        "busy again, other input": lambda _: lambda: busy(other_x),
        "busy again, numpy input": lambda _: lambda: busy(host_x),
    }


def probe(busy, x, prepare) -> tuple[float, float]:
    """(seconds the probe call took to return, seconds the busy computation ran) with the
    busy computation queued just before it."""
    out = busy(x)
    wait_for(out, prepare(out)())   # compiles the probe for these inputs
    start = time.perf_counter()
    out = busy(x)
    call = prepare(out)
    call_start = time.perf_counter()
    result = call()
    returned = time.perf_counter() - call_start
    wait_for(out, result)
    return returned, time.perf_counter() - start


def wait_for(busy_out: jax.Array, result) -> None:
    """Until the busy computation (unless its output was donated) and the probe (if it
    returned a device array) are done."""
    jax.block_until_ready([a for a in (busy_out, result) if isinstance(a, jax.Array)
                           and not a.is_deleted()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy-ms", type=float, default=30.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="dispatch", help="the JSON file's name in --out")
    args = parser.parse_args()
    busy, x = busy_computation(args.busy_ms)
    busy_s = timed(lambda: busy(x).block_until_ready())
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, busy computation "
          f"{busy_s * 1e3:.1f} ms")
    print("| probe | call returned (ms) | busy ran (ms) | blocks |")
    print("| --- | ---: | ---: | --- |")
    rows = []
    for name, prepare in probes(busy, x).items():
        returned, ran = probe(busy, x, prepare)
        blocks = returned > BLOCKS_AT * busy_s
        rows.append(dict(probe=name, returned_ms=returned * 1e3, busy_ms=ran * 1e3,
                         blocks=blocks))
        print(f"| {name} | {returned * 1e3:.2f} | {ran * 1e3:.1f} | "
              f"{'yes' if blocks else 'no'} |", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(
            dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                 xla_flags=os.environ.get("XLA_FLAGS", ""),
                 busy_ms=busy_s * 1e3, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
