"""Tensor-parallel scaling: decode step time and the collectives of one step, per mesh size.

For N = 1, 2, 4, 8 (powers of two up to the device count that split the model's heads), runs
one engine with tensor_parallel_size=N over the same decode batch and prints a table: the
median decode step, each device's weight bytes, and the collectives XLA compiled into one
step, counted from the HLO text of the forward (per token rung) and of the sampling step.

On a CPU the script asks XLA for 8 fake devices (XLA_FLAGS), so the table shows the plan,
not a speed-up: the fake devices share the same cores. On a machine with several GPUs or TPU
chips it times N = 1 .. the device count.

Usage: python scripts/bench_scaling.py [--preset 25m|60m] [--seqs 8] [--context 64]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the host platform reads it; real GPUs and TPUs are counted as they are.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r" = (.*?) (%s)(?:-start)?\(" % "|".join(COLLECTIVES))
_ARRAY_TYPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def count_collectives(hlo_text: str) -> tuple[Counter, Counter]:
    """Collective ops in compiled HLO text (an async pair counts once, by its -start), and
    the bytes of their results per kind."""
    counts, result_bytes = Counter(), Counter()
    for result_type, kind in _COLLECTIVE.findall(hlo_text):
        counts[kind] += 1
        for dtype, dims in _ARRAY_TYPE.findall(result_type):
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            result_bytes[kind] += size * _ITEM_BYTES.get(dtype, 4)
    return counts, result_bytes


def step_collectives(runner, num_tokens: int, num_seqs: int) -> tuple[tuple, tuple]:
    """The collectives of one step, (counts, bytes) for its forward (token rung) and its
    sampling (seq rung)."""
    import numpy as np

    batch, indices = runner._empty_batch(num_tokens)
    previous_rows = np.full(num_tokens, -1, np.int32)   # no token from a step before
    forward = runner._forward.lower(runner.param_leaves, runner.kv_cache, batch, indices,
                                    previous_rows, runner._no_draws, runner.rotary_table)
    # A padding-only step (it writes page 0) gives last_hidden as sampling receives it.
    runner.kv_cache, _, last_hidden = runner._forward(runner.param_leaves, runner.kv_cache,
                                                      batch, indices, previous_rows,
                                                      runner._no_draws, runner.rotary_table)
    sampling, _ = runner._sampling_arrays([], num_seqs, False)
    sample = runner._sample.lower(runner.param_leaves, last_hidden, sampling, None, None,
                                  None, num_seqs=num_seqs, num_top=0)
    return (count_collectives(forward.compile().as_text()),
            count_collectives(sample.compile().as_text()))


def device_weight_bytes(runner) -> int:
    """Bytes of weights on the first device of the mesh."""
    import jax

    leaves = jax.tree.leaves(runner.params)
    device = next(iter(leaves[0].devices()))
    return sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards
               if shard.device == device)


def timed_decode(model_dir: Path, size: int, args) -> dict:
    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.worker.runner import rung

    config = EngineConfig(max_num_seqs=args.seqs, max_num_batched_tokens=max(64, args.seqs),
                          page_size=16, num_pages=args.seqs * (args.context // 16 + 4) + 8,
                          max_model_len=args.context + args.steps + 16, warmup=False,
                          compilation_cache_dir="", tensor_parallel_size=size)
    engine = LLMEngine(model_dir, config)
    params = SamplingParams(max_tokens=args.steps + 4, temperature=0, ignore_eos=True)
    for index in range(args.seqs):
        engine.add_request(str(index), {"prompt_token_ids": [3 + index % 250] * args.context},
                           params)
    while any(engine.scheduler.get_request(str(i)).num_output_tokens == 0
              for i in range(args.seqs)):
        engine.step()   # prefill, in chunks of max_num_batched_tokens
    engine.step()   # the first decode compiles its rung
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    runner = engine.runner
    forward, sample = step_collectives(runner, rung(config.token_ladder, args.seqs),
                                       rung(config.seq_ladder, args.seqs))
    return dict(step_ms=statistics.median(times) * 1000, forward=forward, sample=sample,
                weight_mib=device_weight_bytes(runner) / 2 ** 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="25m", help="a scripts/bench_offline.py preset")
    parser.add_argument("--model", type=Path, default=None, help="a model directory instead")
    parser.add_argument("--seqs", type=int, default=8, help="sequences decoding together")
    parser.add_argument("--context", type=int, default=64, help="prompt tokens of each")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    args = parser.parse_args()
    import jax

    from models import load_config
    from scripts.bench_offline import build_model

    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].device_kind} "
          f"({jax.default_backend()})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(args.preset, Path(tmp) / "model")
        config = load_config(model_dir)
        sizes = [n for n in (1, 2, 4, 8, 16) if n <= len(devices)
                 and config.num_heads % n == 0 and config.intermediate_size % n == 0
                 and (config.num_kv_heads % n == 0 or n % config.num_kv_heads == 0)]
        print(f"model: {config.num_layers} layers, {config.num_heads} heads, "
              f"{config.num_kv_heads} kv heads, vocab {config.vocab_size}; decode of "
              f"{args.seqs} sequences at context {args.context}", flush=True)
        rows = []
        for size in sizes:
            result = timed_decode(model_dir, size, args)
            rows.append((size, result))
            print(f"  N={size}: {result['step_ms']:.2f} ms/step", flush=True)
    print_table(rows, jax.default_backend() == "cpu")


def print_table(rows, fake_devices: bool) -> None:
    def collectives(found: tuple[Counter, Counter]) -> str:
        counts, result_bytes = found
        return ", ".join(f"{counts[kind]} {kind} ({result_bytes[kind] / 1024:.0f} KiB)"
                         for kind in COLLECTIVES if counts[kind]) or "-"

    print()
    print("| N | decode step (ms) | weights per device (MiB) | forward collectives "
          "| sampling collectives |")
    print("| ---: | ---: | ---: | --- | --- |")
    for size, r in rows:
        print(f"| {size} | {r['step_ms']:.2f} | {r['weight_mib']:.1f} | "
              f"{collectives(r['forward'])} | {collectives(r['sample'])} |")
    if fake_devices:
        print("\nFake CPU devices share this machine's cores: the table shows the plan "
              "(what each step communicates), not a speed-up.")


if __name__ == "__main__":
    main()
