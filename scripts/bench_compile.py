"""Warm-up compile time of the engine's step, layers scanned against unrolled.

For each model shape, lowers and compiles the engine's jitted step functions
(engine/worker/step.py: jit_steps) for every rung the engine warms: the forward and the
prompt logprobs per token rung, sampling per sequence rung x {penalties or not} x {0, 20 top
logprobs}, and the penalty slot's fill once (counted with sampling). Everything is
abstract (`jax.ShapeDtypeStruct`: no weight and no KV cache is allocated), so an 8B or 70B
shape compiles on a laptop's CPU. The persistent compilation
cache is off: each number is a cold compile. Only the forward depends on depth.

Usage: python scripts/bench_compile.py [--shapes smollm2,llama3-8b,llama3-70b]
           [--modes scan,unrolled] [--layers N] [--forward-only] [--max-seconds 1200]
           [--json out.json]

--layers gives every shape that depth instead of its own; --forward-only skips the sampling
and prompt-logprob compiles, which do not depend on depth.

--max-seconds stops a (shape, mode) once its forward compiles have taken that long and
reports the rungs done (an unrolled 70B forward takes many minutes per rung on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # Hugging Face config.json fields of each shape ("tiny": the test suite's models)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=320),
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                    vocab_size=49152, tie_word_embeddings=True, torch_dtype="bfloat16"),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                      vocab_size=128256, rope_theta=500000.0, torch_dtype="bfloat16"),
    "llama3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, intermediate_size=28672,
                       vocab_size=128256, rope_theta=500000.0, torch_dtype="bfloat16"),
}


def model_config(shape: str, scan_layers: bool, num_layers: int | None = None):
    from models.config import ModelConfig

    hf = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 8192,
          **SHAPES[shape]}
    if num_layers:
        hf["num_hidden_layers"] = num_layers
    return ModelConfig.from_hf(hf, scan_layers=scan_layers)


def abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def timed_compile(jitted, *args, **kwargs) -> tuple[float, float]:
    """(wall, CPU) seconds to lower and compile, CPU time summed over this process's
    threads (the steadier number on a shared machine)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    jitted.lower(*args, **kwargs).compile()
    return time.perf_counter() - start, time.process_time() - start_cpu


def compile_warmup(shape: str, scan_layers: bool, engine, max_seconds: float,
                   num_layers: int | None = None, forward_only: bool = False) -> dict:
    """(wall, CPU) seconds to compile each warmed rung of one (shape, mode), on abstract
    arrays: {"forward": {rung: (wall, cpu)}, "prompt_logprobs": (wall, cpu), "sample": ...}."""
    import jax
    import numpy as np

    from engine.worker.host_arrays import empty_batch, empty_slot_history, sampling_arrays
    from engine.worker.step import TOP_LOGPROBS, PenaltyState, jit_steps
    from models.checkpoint import abstract_model
    from models.paged import kv_cache_shape
    from models.transformer import rotary_table

    config = model_config(shape, scan_layers, num_layers)
    graphdef, state = abstract_model(config)
    params = abstract(state)
    steps = jit_steps(graphdef, engine)
    dtype = np.dtype(config.dtype)
    kv_cache = jax.ShapeDtypeStruct(kv_cache_shape(config, 1024, engine.page_size), dtype)
    pages_per_seq = math.ceil(engine.max_model_len / engine.page_size)
    last_hidden = jax.ShapeDtypeStruct((engine.max_num_seqs, config.hidden_size), dtype)
    draws = jax.ShapeDtypeStruct((engine.max_num_seqs,), np.int32)   # the previous step's
    rotation = jax.eval_shape(lambda: rotary_table(config, pages_per_seq * engine.page_size))
    counts = (engine.max_num_seqs, config.vocab_size)
    penalty_state = PenaltyState(jax.ShapeDtypeStruct(counts, np.int32),
                                 jax.ShapeDtypeStruct(counts, np.bool_))
    result = {"forward": {}, "prompt_logprobs": (0.0, 0.0), "sample": (0.0, 0.0),
              "complete": True}
    for rung in engine.token_ladder:
        if sum(wall for wall, _ in result["forward"].values()) > max_seconds:
            result["complete"] = False
            break
        batch, indices = abstract(empty_batch(rung, engine.max_num_seqs, pages_per_seq))
        result["forward"][rung] = timed_compile(
            steps.forward, params, kv_cache, batch, indices,
            jax.ShapeDtypeStruct((rung,), np.int32), draws, rotation)
        wall, cpu = result["forward"][rung]
        print(f"  {shape} {'scan' if scan_layers else 'unrolled'} forward T={rung}: "
              f"{wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        if not forward_only:
            hidden = jax.ShapeDtypeStruct((rung, config.hidden_size), dtype)
            result["prompt_logprobs"] = _add(result["prompt_logprobs"], timed_compile(
                steps.prompt_logprobs, params, hidden, jax.ShapeDtypeStruct((rung,), np.int32),
                num_top=TOP_LOGPROBS))
    for num_seqs in () if forward_only else engine.seq_ladder:
        for with_penalties in (False, True):
            sampling, penalties = abstract(sampling_arrays([], num_seqs, with_penalties))
            for num_top in (0, TOP_LOGPROBS):
                result["sample"] = _add(result["sample"], timed_compile(
                    steps.sample, params, last_hidden, sampling, penalties,
                    penalty_state if with_penalties else None, None,
                    num_seqs=num_seqs, num_top=num_top))
    if not forward_only:   # once, whatever the ladders
        result["sample"] = _add(result["sample"], timed_compile(
            steps.init_penalty_slot, penalty_state,
            *abstract(empty_slot_history(engine.max_model_len)), draws))
    return result


def _add(total: tuple[float, float], more: tuple[float, float]) -> tuple[float, float]:
    return total[0] + more[0], total[1] + more[1]


def table(results: list[dict], engine) -> str:
    """A markdown table; each cell is wall / CPU seconds."""
    lines = [f"| shape | layers | mode | forward, {len(engine.token_ladder)} rungs | max per "
             "rung | prompt logprobs | sampling | warm-up total |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        forward = (0.0, 0.0)
        for seconds in r["forward"].values():
            forward = _add(forward, seconds)
        total = _add(_add(forward, r["prompt_logprobs"]), r["sample"])
        slowest = max(r["forward"].values())
        done = "" if r["complete"] else f" ({len(r['forward'])} rungs, stopped)"
        cells = [forward, slowest, r["prompt_logprobs"], r["sample"], total]
        lines.append(f"| {r['shape']} | {r['layers']} | "
                     f"{r['mode']} | " + " | ".join(f"{wall:.1f} / {cpu:.1f}"
                                                    for wall, cpu in cells)
                     .replace(" |", done + " |", 1) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2,llama3-8b,llama3-70b")
    parser.add_argument("--modes", default="scan,unrolled")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import jax

    from engine.config import EngineConfig

    engine = dataclasses.replace(EngineConfig(), max_model_len=4096)
    results = []
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            result = compile_warmup(shape, mode == "scan", engine, args.max_seconds,
                                    args.layers, args.forward_only)
            layers = args.layers or SHAPES[shape]["num_hidden_layers"]
            results.append({"shape": shape, "layers": layers, "mode": mode, **result})
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\njax {jax.__version__}, {jax.default_backend()}; token rungs "
          f"{engine.token_ladder}, sequence rungs {engine.seq_ladder}, max_model_len "
          f"{engine.max_model_len}, page_size {engine.page_size}; seconds, wall / CPU")
    print(table(results, engine))


if __name__ == "__main__":
    main()
