"""Step time of the engine's compiled decode step, layers scanned against unrolled.

Builds a random-weight model of a shape (scripts/bench_compile.py's SHAPES), a Runner (the
engine's jitted forward and sampling, the KV cache donated) and a decode batch of --batches
sequences at --context tokens each, then times
forward + greedy sampling + the one host transfer, as Runner.execute runs them: the median
of --repeats steps after two untimed ones, in wall-clock and in this process's CPU time (on
a shared machine the CPU time is the steadier of the two). For each mode it also times the
same step with a KV cache --big-cache times larger: a cache updated in place costs the same
whatever its size.

Usage: python scripts/bench_step.py [--shapes tiny,smollm2] [--batches 1,8] [--context 256]
           [--dtype float32] [--repeats 20] [--big-cache 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def decode_step(runner, batch_size: int, context: int):
    """The SchedulerOutput of one decode step: each sequence at `context` tokens, on its
    own pages."""
    from engine.core.request import ScheduledRequest, SchedulerOutput

    page_size = runner.config.page_size
    pages_per_seq = -(-(context + 1) // page_size)
    scheduled = tuple(ScheduledRequest(
        request_id=str(s), token_ids=(7,), start_position=context,
        page_table=tuple(range(1 + s * pages_per_seq, 1 + (s + 1) * pages_per_seq)),
        sample=True, is_prefill=False) for s in range(batch_size))
    return SchedulerOutput(scheduled=scheduled, num_batched_tokens=batch_size,
                           preempted_ids=(), finished_ids=())


def timed_steps(model, config, num_pages: int, batch_size: int, context: int,
                repeats: int) -> tuple[float, float]:
    """Median seconds of one decode step (forward, sampling, transfer): (wall, CPU)."""
    import jax
    import numpy as np

    from engine.worker.runner import Runner, rung

    runner = Runner(model, config, max_model_len=context + 16, num_pages=num_pages)
    scheduled = decode_step(runner, batch_size, context)
    batch, indices, previous_rows = runner._build_batch(scheduled, [None] * batch_size)
    num_seqs = rung(config.seq_ladder, batch_size)
    sampling, _ = runner._sampling_arrays([], num_seqs, False)
    wall, cpu = [], []
    for step in range(repeats + 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        runner.kv_cache, _, last_hidden = runner._forward(
            runner.param_leaves, runner.kv_cache, batch, indices, previous_rows, runner._no_draws,
            runner.rotary_table)
        packed, _, _ = runner._sample(runner.param_leaves, last_hidden, sampling, None, None, None,
                                      num_seqs=num_seqs, num_top=0)
        np.asarray(jax.device_get(packed))
        if step >= 2:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,smollm2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--big-cache", type=int, default=16)
    args = parser.parse_args()

    import jax
    from flax import nnx

    from engine.config import EngineConfig
    from models.transformer import Transformer
    from scripts.bench_compile import SHAPES, model_config

    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=64,
                          compilation_cache_dir="", warmup=False)
    print(f"jax {jax.__version__}, {jax.default_backend()}; decode at context {args.context}, "
          f"{args.dtype}; median of {args.repeats} steps")
    print("Each cell: wall ms / CPU ms per step.")
    print("| shape | layers | batch | scanned | unrolled | scanned, cache x"
          f"{args.big_cache} | unrolled, cache x{args.big_cache} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shapes.split(","):
        models = {scan: Transformer(dataclasses.replace(model_config(shape, scan),
                                                        dtype=args.dtype), rngs=nnx.Rngs(0))
                  for scan in (True, False)}
        for batch_size in batches:
            num_pages = 1 + batch_size * -(-(args.context + 1) // config.page_size)
            cells = []
            for pages in (num_pages, num_pages * args.big_cache):
                for scan in (True, False):
                    cells.append(timed_steps(models[scan], config, pages, batch_size,
                                             args.context, args.repeats))
            layers = SHAPES[shape]["num_hidden_layers"]
            print(f"| {shape} | {layers} | {batch_size} | " + " | ".join(
                f"{1000 * wall:.2f} / {1000 * cpu:.2f}" for wall, cpu in cells) + " |",
                flush=True)


if __name__ == "__main__":
    main()
