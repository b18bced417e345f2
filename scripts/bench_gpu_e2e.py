"""End-to-end on one device: Llama-shaped models with random bf16 weights (load_format="dummy",
no checkpoint needed), against the device's memory roofline and transformers' `generate`.

For each shape ("8b": Llama-3-8B's sizes, "1b": Llama-3.2-1B's), in one run:
  - load seconds, and warm-up: seconds to compile every ladder rung (EngineConfig.warmup)
    of the throughput engine (256 sequences, 2,048 tokens a step), cold (Llama-3-8B on an
    H200: 143 s for 96 rungs; --warmup on-demand skips it and compiles only what each
    concurrency's run needs, by an untimed run of it first);
  - batch-1 decode tokens/s (one greedy request, ignore_eos, on an engine of one sequence
    after an untimed request of the same lengths), against the HBM roofline:
    bandwidth / bytes of weights read per token, the bandwidth measured here by a large
    device copy (read + write bytes / time) and the spec's (--spec-tbps, H200: 4.8 TB/s).
    Bytes per token are every parameter's bytes, less the embedding table when an LM head
    of its own exists (a lookup reads one row); KV reads (< 1% at these lengths) left out;
  - throughput at 64 and 256 concurrent requests of 1,024 random prompt tokens and 128
    output tokens (ignore_eos): output and total tokens/s, against transformers `generate`
    (scripts/hf_generate.py, a child process run first, before JAX takes device memory:
    same shapes, bf16, the same batch padded as one);
  - the first concurrency once more with the host's work in line (async scheduling off);
  - the step-time breakdown (engine/worker/timeline.py) per step: host ms (time in
    engine.step() not spent waiting for results; of it, in parentheses, the time inside
    the jitted calls, which is where a launch that waits for the device shows:
    scripts/bench_dispatch.py), device busy ms and idle ms;
  - "8b" also int8 and int4 weights: batch-1 decode against the roofline of their bytes;
  - last, if time is left, the first shape's bf16 batch-1 decode again with each kernel
    choice of pallas_kernels/gpu/kernel_choice.py forced (VARIANTS): XLA's dot in place of
    the Pallas layer matmul (EMBER_GPU_LAYER_MATMUL=xla), the Mosaic GPU attention
    (EMBER_GPU_KERNELS=mosaic; Hopper and newer): what setting its flags would change end to
    end, with how many of the greedy tokens equal the default's; and the layers unrolled
    (EngineConfig.scan_layers=False: each layer's weights their own arrays, which XLA's dot
    reads in place at any row count; its compile grows with depth, hence its longer limit),
    and the 64-request throughput with the layers unrolled (compiled on demand);
  - with --profile-host, each concurrency once more under cProfile (its figures not
    reported): the host's slowest functions in results.json (host_profile).

Order (bench_shapes): transformers, the copy bandwidth; per shape (8b first) batch-1 bf16,
the throughput engine's warm-up and 64 requests; per shape 64 requests in line (and under
cProfile), 256 requests; int8 and int4 batch-1; then the variants. A tight budget cuts the
diagnostics and the longer runs before the 1B shape's headline figures.
--parts picks some of them (batch1: bf16 batch-1; quantized: int8 and int4; throughput:
warm-up and the concurrencies; variants), for a lease with little time.
Every part has a time limit (LIMITS) inside one global budget (--budget-s): a throughput
run cut by its limit reports tokens/s over what finished and says so ("partial"); a part
with too little time left is listed as skipped. A compile cannot be cut: a warm-up starts
only with 30% of its limit left, and may overrun the budget by the rest. The table and JSON
are rewritten after each part, so a run killed from outside keeps what it measured. --quick:
tiny shapes, short workloads, transformers on CPU (a smoke test of the whole flow on a
laptop; its figures mean nothing). --host-shapes: the full workload on each shape's vocabulary
with two tiny layers, whose host ms per step on a CPU is what the engine's own work costs
(to set beside a device's host ms: docs/perf.md; the in-line row's, where the CPU's device
work does not share the cores with it).

Usage: python scripts/bench_gpu_e2e.py [--shapes 8b,1b] [--out DIR] [--budget-s 150]
                                      [--parts batch1,quantized,throughput,variants]
                                      [--warmup full|on-demand]
       python scripts/bench_gpu_e2e.py --quick
       python scripts/bench_gpu_e2e.py --host-shapes --shapes 8b --parts throughput \
           --hf-budget-s 0 --warmup on-demand --budget-s 900
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_gpu_report import Report  # noqa: E402
from scripts.e2e_runs import (batch1_decode, bytes_per_token,  # noqa: E402
                              device_bandwidth, make_engine, profile_host,
                              throughput)

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
             rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
             torch_dtype="bfloat16")
SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
               max_position_embeddings=8192, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
               max_position_embeddings=131072, tie_word_embeddings=True),
}
QUICK_SHAPES = {   # the same two kinds (untied, tied) at sizes a CPU runs in seconds
    "8b": dict(SHAPES["8b"], hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=256, vocab_size=1024),
    "1b": dict(SHAPES["1b"], hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, vocab_size=1024),
}
# The shapes' vocabularies and the full workload with two tiny layers (--host-shapes): what
# the host's work costs a step, on a machine without the device the shapes need (a CPU).
HOST_SHAPES = {shape: dict(config, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128)
               for shape, config in SHAPES.items()}
# (prompt_len, output_len, batch-1 tokens, concurrencies, max_num_batched_tokens)
FULL = dict(prompt_len=1024, output_len=128, batch1_tokens=128, concurrencies=(64, 256),
            max_num_batched_tokens=2048, page_size=16)
QUICK = dict(prompt_len=48, output_len=12, batch1_tokens=24, concurrencies=(2, 4),
             max_num_batched_tokens=32, page_size=16)
# Each part's own limit (seconds), within what the global budget has left.
LIMITS = dict(batch1=20, batch1_unrolled=60, warmup=60, untimed=45, untimed_unrolled=120,
              throughput_64=20, throughput_256=30)
PARTS = ("batch1", "quantized", "throughput", "variants")
# (row label, environment, EngineConfig overrides): bf16 batch-1 decode with one kernel
# choice forced, or the layers unrolled (on the H200, 2026-11-30, XLA's dot on separate
# weights took 0.8-1.2x the layer matmul's time at one row and 0.7-0.8x at 64: docs/perf.md).
VARIANTS = (("bf16 xla layer matmul", {"EMBER_GPU_LAYER_MATMUL": "xla"}, {}),
            ("bf16 mosaic-gpu attention", {"EMBER_GPU_KERNELS": "mosaic"}, {}),
            ("bf16 layers unrolled", {}, {"scan_layers": False}))


def write_model_dir(out_dir: Path, hf_config: dict) -> Path:
    """config.json and a byte-level tokenizer (259 ids; the model's vocabulary may be
    larger: ids past the tokenizer's decode to nothing): all load_format="dummy" needs."""
    from tests.hf_models import save_byte_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_byte_tokenizer(out_dir)
    return out_dir


def bench_shapes(model_dirs: dict[str, Path], workload: dict, report: Report, rng,
                 parts: tuple[str, ...] = PARTS, warmup: str = "full",
                 profile: bool = False) -> None:
    """Every shape's figures, in rounds, so that a tight budget cuts diagnostics before any
    shape's headline figures: (1) per shape, bf16 batch-1 decode on an engine of one
    sequence compiling on demand, then the throughput engine (its warm-up: every rung,
    timed; warmup="on-demand": none, each concurrency's shapes compiled by an untimed run of
    it first) and the first concurrency; (2) per shape, that concurrency in line and under
    cProfile (`profile`), then the other concurrencies (the longest last); (3) "8b" int8
    and int4 batch-1 decode. `parts`: which of batch1 (bf16), throughput, quantized run.
    The throughput engines stay alive from round 1 to round 2 (the 8B and 1B shapes' take
    ~55 and ~12 GB)."""
    engines = {}
    first, *others = workload["concurrencies"]
    for shape, model_dir in model_dirs.items():
        if "batch1" in parts:
            attempt(report, shape, bench_batch1, model_dir, shape, "bf16", workload, report)
        if "throughput" in parts:
            engines[shape] = attempt(report, shape, throughput_engine, model_dir, shape,
                                     workload, report, warmup)
        if engines.get(shape) is not None:
            attempt(report, shape, bench_concurrency, engines[shape], shape, first, workload,
                    report, rng, warmup)
    for shape, engine in engines.items():
        if engine is None:
            continue
        attempt(report, shape, bench_concurrency, engine, shape, first, workload, report, rng,
                warmup, diagnostics=True, profile=profile)
        for concurrency in others:
            attempt(report, shape, bench_concurrency, engine, shape, concurrency, workload,
                    report, rng, warmup, profile=profile)
        engines[shape] = engine = None
        gc.collect()
    for weights in ("int8", "int4") if "quantized" in parts and "8b" in model_dirs else ():
        attempt(report, "8b", bench_batch1, model_dirs["8b"], "8b", weights, workload, report)


def attempt(report: Report, shape: str, part, *args, **kwargs):
    """part(*args, **kwargs), or None with a note if it raised: one part's failure ends
    only it."""
    try:
        return part(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - noted; the next part runs
        report.note(f"{shape}: {type(error).__name__}: {str(error)[:400]}")
        return None


def throughput_engine(model_dir: Path, shape: str, workload: dict, report: Report,
                      warmup: str, label: str = "", **overrides):
    """The engine of the throughput runs (as many sequences as the largest concurrency),
    warmed up in full and timed, or (warmup="on-demand") not at all; None if out of time.
    overrides: EngineConfig fields (label: their name in the report)."""
    import jax

    if not report.starts(f"{shape}{label} engine and warm-up", LIMITS["warmup"]):
        return None
    if warmup == "full":
        jax.clear_caches()   # cold, as a fresh process: nothing kept from the engines above
    engine, load_s = make_engine(model_dir, workload, warmup=warmup == "full",
                                 max_num_seqs=max(workload["concurrencies"]), **overrides)
    config = engine.config
    if warmup == "full":
        report.warmup(shape, engine.warmup_seconds, load_s,
                      buckets=2 * len(config.token_ladder) + 8 * len(config.seq_ladder))
    return engine


def bench_concurrency(engine, shape: str, concurrency: int, workload: dict, report: Report,
                      rng, warmup: str, *, diagnostics: bool = False,
                      profile: bool = False, label: str = "",
                      untimed_limit: float | None = None) -> None:
    """`concurrency` requests at once, timed (after an untimed run compiling its shapes,
    unless warmed up in full, limited to untimed_limit, default LIMITS["untimed"]);
    diagnostics: instead, the same with the host's work in line (async scheduling off: as
    fast as async when the overlap is lost somewhere); profile: then one more run under
    cProfile (profile_host); label: after the concurrency in the row's name."""
    limit = LIMITS["throughput_64" if concurrency <= 64 else "throughput_256"]
    untimed_limit = untimed_limit or LIMITS["untimed"]
    if diagnostics:
        if report.starts(f"{shape} in line {concurrency}", limit):
            engine.async_scheduling = False
            try:
                report.throughput(shape, f"{concurrency} in line", throughput(
                    engine, concurrency, workload, report.limit(limit), rng))
            finally:
                engine.async_scheduling = True
    else:
        if warmup != "full" and report.starts(f"{shape} untimed {concurrency}{label}",
                                              untimed_limit + limit):
            throughput(engine, concurrency, workload, report.limit(untimed_limit), rng)
        if report.starts(f"{shape} throughput {concurrency}{label}", limit):
            report.throughput(shape, f"{concurrency}{label}", throughput(
                engine, concurrency, workload, report.limit(limit), rng))
    if profile and report.starts(f"{shape} host profile {concurrency}", limit):
        lines = profile_host(engine, concurrency, workload, report.limit(limit), rng)
        print("\n".join(lines[:15]), flush=True)
        report.results.setdefault("host_profile", {})[f"{shape} {concurrency}"] = lines
        report.write()


def bench_batch1(model_dir: Path, shape: str, weights: str, workload: dict, report: Report,
                 label: str | None = None, limit: float | None = None,
                 **overrides) -> None:
    """Batch-1 decode of `weights` ("bf16", "int8", "int4") on an engine of one sequence,
    not warmed up: the untimed first request compiles the few shapes it needs. label: the
    row's name (default: weights); limit: seconds (default LIMITS["batch1"]); overrides:
    EngineConfig fields."""
    label, limit = label or weights, limit or LIMITS["batch1"]
    if not report.starts(f"{shape} {label} batch-1", limit):
        return
    start = time.perf_counter()
    engine, load_s = make_engine(model_dir, workload, max_num_seqs=1, warmup=False,
                                 quantization=None if weights == "bf16" else weights,
                                 **overrides)
    report.engine(shape, label, load_s, bytes_per_token(engine))
    left = limit - (time.perf_counter() - start)
    report.batch1(shape, label, batch1_decode(
        engine, workload["batch1_tokens"], report.limit(max(left, 5))))
    del engine
    gc.collect()


def bench_variants(model_dir: Path, shape: str, workload: dict, report: Report,
                   rng) -> None:
    """bf16 batch-1 decode with each of VARIANTS' kernel choices forced (read when the engine
    traces its steps) or engine settings, and how many greedy tokens equal the default's;
    then the first concurrency's throughput with the layers unrolled. The Mosaic GPU one is
    skipped off Hopper, on a jax without Mosaic GPU, and when the device check chose Triton
    after its kernel stage failed (EMBER_GPU_KERNELS=triton)."""
    from pallas_kernels.compat import cuda_compute_capability, has_mosaic_gpu
    from pallas_kernels.gpu.kernel_choice import (GPU_KERNELS_VARIABLE,
                                                  MOSAIC_MIN_COMPUTE_CAPABILITY)

    for label, environment, overrides in VARIANTS:
        chosen = os.environ.get(GPU_KERNELS_VARIABLE)
        capability = cuda_compute_capability() or 0
        if GPU_KERNELS_VARIABLE in environment and (
                chosen == "triton" or not has_mosaic_gpu()
                or capability < MOSAIC_MIN_COMPUTE_CAPABILITY):
            report.note(f"{label} skipped: {GPU_KERNELS_VARIABLE}={chosen}, Mosaic GPU "
                        f"{'present' if has_mosaic_gpu() else 'absent'}, compute capability "
                        f"{cuda_compute_capability()}")
            continue
        saved = {name: os.environ.get(name) for name in environment}
        os.environ.update(environment)
        try:
            bench_batch1(model_dir, shape, "bf16", workload, report, label=label,
                         limit=LIMITS["batch1_unrolled" if overrides else "batch1"],
                         **overrides)
        except Exception as error:  # noqa: BLE001 - one variant's failure ends only it
            report.note(f"{shape} {label}: {type(error).__name__}: {str(error)[:400]}")
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        default = report.results["batch1"].get(f"{shape} bf16", {}).get("token_ids")
        variant = report.results["batch1"].get(f"{shape} {label}", {}).get("token_ids")
        if default and variant:
            same = next((i for i, (a, b) in enumerate(zip(default, variant)) if a != b),
                        min(len(default), len(variant)))
            report.note(f"{shape} {label}: the first {same} of {len(default)} greedy tokens "
                        "equal the default kernels' (random weights: near-ties may flip)")
    # Last, the first concurrency with the layers unrolled: scanned, a prefill step (and a
    # decode step of more rows than the layer matmul takes) copies every layer's weights out
    # of its stack; unrolled, none does. Its shapes compile on demand, layer by layer.
    label = " layers unrolled"
    engine = attempt(report, shape, throughput_engine, model_dir, shape, workload, report,
                     "on-demand", label=label, scan_layers=False)
    if engine is not None:
        attempt(report, shape, bench_concurrency, engine, shape, workload["concurrencies"][0],
                workload, report, rng, "on-demand", label=label,
                untimed_limit=LIMITS["untimed_unrolled"])
    del engine
    gc.collect()


def run_transformers(shapes: list[str], configs: dict, workload: dict, budget_s: float,
                     report: Report) -> None:
    """scripts/hf_generate.py in a child process, killed at `budget_s`; the 64 runs first."""
    jobs = [dict(shape=shape, concurrency=concurrency, min_s=4 if concurrency <= 64 else 15)
            for concurrency in workload["concurrencies"] for shape in shapes]
    spec = dict(jobs=jobs, configs=configs, deadline=time.time() + budget_s - 2,
                prompt_len=workload["prompt_len"], output_len=workload["output_len"])
    if budget_s <= 0 or not report.starts("transformers generate", budget_s):
        return
    try:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "hf_generate.py"),
                               json.dumps(spec)], capture_output=True, text=True,
                              timeout=report.limit(budget_s))
        stdout, note = done.stdout, "" if done.returncode == 0 else done.stderr[-600:]
    except subprocess.TimeoutExpired as expired:
        stdout, note = expired.stdout or b"", "killed at its limit"   # bytes, whatever text=
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    for line in stdout.splitlines():
        if line.startswith("{"):
            report.transformers(json.loads(line))
    if note:
        report.note(f"transformers: {note.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8b,1b", help="comma-separated: 8b, 1b")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, CPU smoke test")
    parser.add_argument("--host-shapes", action="store_true",
                        help="the full workload on the shapes' vocabularies with two tiny "
                             "layers: the host's cost per step (e.g. on a CPU, with --parts "
                             "throughput --hf-budget-s 0 --warmup on-demand)")
    parser.add_argument("--out", type=Path, default=None, help="writes table.md, results.json")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="all parts together (default 150; --quick 140)")
    parser.add_argument("--hf-budget-s", type=float, default=None,
                        help="transformers' share of the budget (default 35; --quick 25; "
                             "0 skips it)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, some of {', '.join(PARTS)}")
    parser.add_argument("--warmup", choices=("full", "on-demand"), default="full",
                        help="the throughput engine: compile every rung first, timed (full), "
                             "or only each run's shapes, by an untimed run of it (on-demand)")
    parser.add_argument("--profile-host", action="store_true",
                        help="after each concurrency, one more run under cProfile: its "
                             "slowest host functions go to results.json (host_profile)")
    parser.add_argument("--spec-tbps", type=float, default=4.8,
                        help="the device's HBM bandwidth on paper, TB/s (H200: 4.8)")
    args = parser.parse_args()
    shapes = [shape.strip() for shape in args.shapes.split(",") if shape.strip()]
    if args.quick and args.host_shapes:
        parser.error("--quick and --host-shapes: expected one of them")
    table = QUICK_SHAPES if args.quick else HOST_SHAPES if args.host_shapes else SHAPES
    unknown = [shape for shape in shapes if shape not in table]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; expected some of {sorted(table)}")
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts {args.parts!r}: expected some of {', '.join(PARTS)}")
    workload = QUICK if args.quick else FULL
    if args.host_shapes:   # the full workload on a CPU's device: ten times the GPU's limits
        LIMITS.update({part: 10 * limit for part, limit in LIMITS.items()})
    budget = args.budget_s or (140 if args.quick else 150)
    report = Report(budget, args.out, args.spec_tbps * 1e12, workload, quick=args.quick)
    configs = {shape: {**LLAMA, **table[shape]} for shape in shapes}
    # transformers first: the JAX process below keeps the device memory it takes.
    if "throughput" in parts:
        hf_budget = args.hf_budget_s
        run_transformers(shapes, configs, workload,
                         (25 if args.quick else 35) if hf_budget is None else hf_budget, report)
    import jax

    report.device(str(jax.devices()[0].device_kind), device_bandwidth(args.quick))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="ember-e2e-") as tmp:
        model_dirs = {shape: write_model_dir(Path(tmp) / shape, configs[shape])
                      for shape in shapes}
        bench_shapes(model_dirs, workload, report, rng, parts, args.warmup, args.profile_host)
        if "variants" in parts:
            attempt(report, shapes[0], bench_variants, model_dirs[shapes[0]], shapes[0],
                    workload, report, rng)
    report.finish()


if __name__ == "__main__":
    main()
