"""Offline throughput: Ember's LLM.generate against transformers' generate, side by side.

Builds a random-weight Llama of a real shape, makes a seeded workload of random prompt and
output lengths, and measures in one run:
  - this CPU's f32 matmul rate and large-copy bandwidth (the ceilings),
  - Ember: warm-up (compile) time, compilations after warm-up, output tokens/s, TTFT and
    per-token latency p50/p99, prefix-cache hit rate, peak memory,
  - transformers (torch CPU, same weights, same prompts, padded batches): the same numbers,
    in a subprocess so each peak memory is its own,
  - the compute roofline of the workload ((prompt + output tokens) x 2 FLOPs per weight a
    token multiplies by, over the matmul rate) and batch-1 decode against the memory roofline
    (the weights a decode token reads, over the copy bandwidth: every parameter but an
    untied embedding table, of which a token reads one row),
  - async scheduling on (the default) and off on the same workload: output tokens/s, the
    host's milliseconds per step and the share of wall time the device waited for the host
    (engine/worker/timeline.py),
  - an honest roofline: for every step the engine ran, max(FLOPs / matmul rate, bytes /
    copy bandwidth), where FLOPs count the weights' and attention's work and bytes count
    the weights, the K/V read by attention (whole pages) and the K/V written; the share of
    its sum that Ember's wall time reaches is printed beside the weight-only one, with what
    bounds it: the rate at which the engine's decode attention reads K/V pages, the
    rest of a decode step (its matmuls, LM head and sampling) against their roofline, and
    the device's time by class of step (prompts fed or decodes only, by sequences) beside
    that class's share of the roofline.

With --structured FRACTION it measures instead Ember's output tokens/s with FRACTION of the
requests under a JSON schema against none, in one run (scripts/offline_structured.py); with
--model, on that checkpoint or GGUF ("default": the default model) instead of the preset.

Usage: python scripts/bench_offline.py [--preset 25m|60m|1b-2l] [--requests 64] [--seed 0]
           [--layers auto|scan|unrolled] [--backend auto|reference]
       python scripts/bench_offline.py --structured 0.5 [--model default]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH1_RUNS = 3   # batch-1 decode runs of 128 tokens, their median reported
PRESETS = {  # Llama shapes; vocab kept modest so the LM head does not dominate on a CPU
    "25m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=8),
    "60m": dict(vocab_size=16384, hidden_size=640, intermediate_size=1728,
                num_hidden_layers=10, num_attention_heads=10, num_key_value_heads=5),
    # Llama-3.2-1B's layer (widths that are multiples of 1024, as real models' are), 2 of them
    "1b-2l": dict(vocab_size=8192, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8),
}


def build_model(preset: str, out_dir: Path) -> Path:
    import torch
    import transformers

    from tests.hf_models import save_byte_tokenizer, spread_weights

    config = transformers.LlamaConfig(**PRESETS[preset], max_position_embeddings=1024,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    spread_weights(model)
    model.save_pretrained(out_dir)
    save_byte_tokenizer(out_dir)
    return out_dir


def workload(args):
    rng = np.random.default_rng(args.seed)
    prompts, outputs = [], []
    for _ in range(args.requests):
        prompts.append(rng.integers(3, 259, size=int(rng.integers(args.min_prompt,
                                                                  args.max_prompt + 1))).tolist())
        outputs.append(int(rng.integers(args.min_output, args.max_output + 1)))
    return prompts, outputs


def percentiles(values):
    values = np.asarray(values) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_ceilings():
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        matmul(a).block_until_ready()
    flops = 2 * n ** 3 * reps / (time.perf_counter() - start)
    return flops, copy_bandwidth()


def copy_bandwidth() -> float:
    """A plain memcpy of 256 MiB, far beyond the caches: bytes read plus bytes written; the
    faster of numpy's own buffers and buffers in huge pages (where the engine's weights lie
    on a CPU: models/huge_pages.py), so the roofline is the faster memory's."""
    from models.huge_pages import huge_page_buffer, huge_pages_available

    source = np.random.default_rng(1).standard_normal(64 * 2 ** 20).astype(np.float32)
    rates = [_copy_rate(source, np.empty_like(source))]
    if huge_pages_available():
        in_huge_pages = huge_page_buffer(source.nbytes).view(np.float32)
        in_huge_pages[...] = source
        rates.append(_copy_rate(in_huge_pages, huge_page_buffer(source.nbytes).view(np.float32)))
    return max(rates)


def _copy_rate(source: np.ndarray, target: np.ndarray, reps: int = 10) -> float:
    np.copyto(target, source)
    start = time.perf_counter()
    for _ in range(reps):
        np.copyto(target, source)
    return 2 * source.nbytes * reps / (time.perf_counter() - start)


def engine_config(args):
    from engine import EngineConfig

    return EngineConfig(max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=1024, num_pages=args.num_pages,
                        compilation_cache_dir=args.cache_dir, backend=args.backend,
                        scan_layers={"auto": None, "scan": True, "unrolled": False}[args.layers])


def run_ember(model_dir, prompts, outputs, args):
    from engine import LLMEngine

    config = engine_config(args)
    engine = LLMEngine(model_dir, config)
    # First the workload with the host's work in line (its own cache salt: no prefix hits);
    # it also touches the KV cache's memory for the first time, which the second run does
    # not pay for again.
    engine.async_scheduling = False
    steps = record_steps(engine)
    sync = run_workload(engine, prompts, outputs, cache_salt="sync")
    sync["steps"] = steps[:]
    del steps[:]   # from here the async run's steps
    engine.async_scheduling = True
    result = run_workload(engine, prompts, outputs)
    result["sync"] = sync
    steps = list(steps)   # the workload's steps only
    stats = engine.stats()
    # Batch-1 decode, the median of BATCH1_RUNS (one 128-token run moves by 10-20% on a
    # shared VM), and the copy bandwidth again just before it: the roofline takes the larger
    # of that and the run's first measurement, so a slow spell cannot lower it.
    batch1_bandwidth = copy_bandwidth()
    batch1 = statistics.median(decode_batch1(engine, prompts[0], async_scheduling=True)
                               for _ in range(BATCH1_RUNS))
    batch1_in_line = statistics.median(
        decode_batch1(engine, prompts[0], async_scheduling=False) for _ in range(BATCH1_RUNS))
    compilations = engine.compilations_after_warmup
    dense = measure_dense_decode(engine, steps)   # its own Runner: compiles its own step
    return dict(result, dense=dense, warmup_s=engine.warmup_seconds,
                compilations_after_warmup=compilations,
                prefix_hit_rate=stats.prefix_cache_hit_rate, batch1_tokens_per_s=batch1,
                batch1_in_line_tokens_per_s=batch1_in_line, batch1_bandwidth=batch1_bandwidth,
                peak_mb=peak_rss_mb(), steps=steps, page_size=config.page_size)


def run_workload(engine, prompts, outputs, cache_salt=None) -> dict:
    """Runs every request to the end: tokens/s, TTFT and per-token latency, and from a
    DeviceTimeline the host's milliseconds per step (step() time not spent waiting for
    results) and the share of wall time the device waited for the host."""
    from engine import SamplingParams
    from engine.worker.timeline import DeviceTimeline

    timeline = engine.runner.timeline = DeviceTimeline()
    start = time.perf_counter()
    arrival, first, last, gaps, total = {}, {}, {}, [], 0
    for index, (prompt, count) in enumerate(zip(prompts, outputs)):
        request = {"prompt_token_ids": prompt}
        if cache_salt:
            request["cache_salt"] = cache_salt
        engine.add_request(f"{cache_salt or ''}{index}", request,
                           SamplingParams(max_tokens=count, temperature=0, ignore_eos=True))
        arrival[f"{cache_salt or ''}{index}"] = start
    num_steps, in_step = 0, 0.0
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        step_outputs = engine.step()
        in_step += time.perf_counter() - step_start
        num_steps += 1
        for output in step_outputs:
            now = time.perf_counter()
            rid = output.request_id
            if rid not in first:
                first[rid] = now
            else:
                gaps.append(now - last[rid])
            last[rid] = now
            if output.finished:
                total += len(output.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    device = timeline.summary()
    engine.runner.timeline = None
    return dict(tokens_per_s=total / elapsed, seconds=elapsed,
                ttft=percentiles([first[r] - arrival[r] for r in first]), itl=percentiles(gaps),
                host_ms=1000 * (in_step - device.waited_s) / num_steps,
                dispatch_ms=1000 * device.dispatch_s / num_steps,
                idle_share=device.idle_share, num_steps=num_steps, busy_each=device.busy_each)


def record_steps(engine) -> list:
    """Records each step's (tokens fed, context after the step, sampled) per sequence, by
    wrapping the engine's scheduler (the benchmark's own instrumentation)."""
    steps, schedule = [], engine.scheduler.schedule

    def recording(*args, **kwargs):
        output = schedule(*args, **kwargs)
        steps.append([(len(s.token_ids), s.start_position + len(s.token_ids), s.sample)
                      for s in output.scheduled])
        return output

    engine.scheduler.schedule = recording
    return steps


def step_classes(config, steps, busy_each, page_size, flops, bandwidth) -> list | None:
    """Where the device's time went, by class of step: (class, steps, device seconds,
    honest-roofline seconds). A step's computations are its forward and, when a row
    samples, its sampler, as the runner records them (engine/worker/timeline.py); None when
    the recorded computations do not line up with the steps so."""
    counts = [2 if any(sample for _, _, sample in step) else 1 for step in steps]
    if sum(counts) != len(busy_each):
        return None
    classes: dict[tuple, list] = {}
    first = 0
    for step, count in zip(steps, counts):
        feeds = any(fed > 1 for fed, _, _ in step)
        width = 0 if len(step) <= 8 else 1 if len(step) <= 32 else 2
        row = classes.setdefault((feeds, width), [0, 0.0, 0.0])
        row[0] += 1
        row[1] += sum(busy_each[first:first + count])
        row[2] += honest_roofline_seconds(config, [step], page_size, flops, bandwidth)
        first += count
    return [(f"{'prompt tokens fed' if feeds else 'decodes only'}, "
             f"{('1-8', '9-32', '33+')[width]} sequences", *row)
            for (feeds, width), row in sorted(classes.items())]


def decode_weights(config) -> int:
    """The weights one decode token reads and multiplies by: every parameter but an untied
    embedding table (of which it reads one row; a tied one is the LM head, read whole)."""
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_parameters - embedding


def honest_roofline_seconds(config, steps, page_size, flops, bandwidth, dtype_bytes=4):
    """Sum over steps of max(FLOPs / flops, bytes / bandwidth) (see the module docstring)."""
    c = config
    linear = c.num_layers * (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                             + 3 * c.hidden_size * c.intermediate_size)
    head = c.hidden_size * c.vocab_size
    kv_per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * dtype_bytes
    total = 0.0
    for step in steps:
        tokens = sum(fed for fed, _, _ in step)
        sampled = sum(1 for _, _, sample in step if sample)
        # Query t of a sequence whose context ends at n sits at n - fed + t: it sees that +1.
        attended = sum(fed * (context - fed) + fed * (fed + 1) // 2 for fed, context, _ in step)
        work = 2 * linear * tokens + 2 * head * sampled + 4 * c.num_layers * c.num_heads * (
            c.head_dim * attended)
        pages = sum(-(-context // page_size) for _, context, _ in step)
        moved = ((linear + head) * dtype_bytes + pages * page_size * kv_per_token
                 + tokens * kv_per_token)
        total += max(work / flops, moved / bandwidth)
    return total


def measure_decode_attention(config, steps, page_size, bandwidth, backend="auto"):
    """The decode attention the engine ran (`backend`; "auto": the C++ kernel on a CPU where
    it builds, else the reference) over the K/V pages of the workload's step with the most
    decoding sequences, one layer: (backend, K/V bytes read per second, sequences, share of
    copy bandwidth). The honest roofline counts those pages at copy bandwidth."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels
    from scripts.bench_kernels import median_seconds, paged_decode_batch

    decodes = [[context for fed, context, _ in step if fed == 1] for step in steps]
    contexts = max(decodes, key=len)
    args = paged_decode_batch(np.random.default_rng(0), len(contexts), contexts, page_size,
                              config.num_heads, config.num_kv_heads, config.head_dim,
                              dtype=jnp.float32)
    backend = pallas_kernels.resolve_backend(backend)
    attend = jax.jit(lambda *a: pallas_kernels.ragged_paged_attention(
        *a, sm_scale=config.head_dim ** -0.5, backend=backend))
    seconds, _ = median_seconds(attend, *args)
    pages = sum(-(-context // page_size) for context in contexts)
    rate = pages * args[1][0].nbytes / seconds
    return backend, rate, len(contexts), rate / bandwidth


def measure_dense_decode(engine, steps, context=16) -> tuple[int, float]:
    """The workload's largest decode batch as one step at a `context`-token context, where
    attention is negligible: (sequences, median wall seconds of the step: forward, sampling
    and the transfer, as scripts/bench_step.py times it). What the weights' matmuls, the LM
    head and sampling cost a decode step, to set against their roofline."""
    import dataclasses

    from flax import nnx

    from scripts.bench_step import timed_steps

    batch = max(sum(1 for fed, _, _ in step if fed == 1) for step in steps)
    model = nnx.merge(engine.runner.graphdef, engine.runner.params)
    config = dataclasses.replace(engine.config, warmup=False)
    num_pages = 1 + batch * -(-(context + 1) // config.page_size)
    wall, _ = timed_steps(model, config, num_pages, batch, context, repeats=10)
    return batch, wall


def decode_batch1(engine, prompt, async_scheduling: bool, tokens=128) -> float:
    """Decode tokens/s of one greedy request (a 16-token prompt, `tokens` outputs), timed
    from its first token to its last, with async scheduling on or off."""
    from engine import SamplingParams

    engine.async_scheduling = async_scheduling
    request_id = f"batch1-{async_scheduling}"
    engine.add_request(request_id, {"prompt_token_ids": prompt[:16]},
                       SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    first = 0
    while not first:   # the prefill's token (with async scheduling, a step later)
        first = max((len(o.outputs[0].token_ids) for o in engine.step()), default=0)
    start, last = time.perf_counter(), first
    while engine.has_unfinished_requests():
        last = max([last] + [len(o.outputs[0].token_ids) for o in engine.step()])
    seconds = time.perf_counter() - start
    engine.async_scheduling = True
    return (last - first) / seconds


def run_transformers(model_dir, prompts, outputs, batch_size):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    ttft, gaps, total = [], [], 0
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        chosen = order[first:first + batch_size]
        width = max(len(prompts[i]) for i in chosen)
        ids = torch.zeros((len(chosen), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chosen):  # left padding, as decoder-only generate expects
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        stamps = []

        class Stamp(transformers.LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                           max_new_tokens=max(outputs[i] for i in chosen),
                           min_new_tokens=max(outputs[i] for i in chosen),
                           logits_processor=[Stamp()])
        ttft += [stamps[0] - start] * len(chosen)
        gaps += list(np.diff(stamps))
        total += sum(outputs[i] for i in chosen)  # only the tokens each request asked for
    elapsed = time.perf_counter() - start
    return dict(tokens_per_s=total / elapsed, seconds=elapsed, ttft=percentiles(ttft),
                itl=percentiles(gaps), peak_mb=peak_rss_mb())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="25m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-output", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--num-pages", type=int, default=2048)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto",
                        help="EngineConfig.scan_layers: auto (scans models of more than 8 "
                        "layers, as the engine does), scan or unrolled")
    parser.add_argument("--backend", default="auto", help="EngineConfig.backend (kernels): "
                        "auto (on a CPU the C++ attention where it builds), reference, ...")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "ember-bench-xla"))
    parser.add_argument("--structured", type=float, default=0.0, metavar="FRACTION",
                        help="run the workload free and with this fraction of the requests "
                        "under a JSON schema, and compare Ember's tok/s (default 0: off)")
    parser.add_argument("--model", help="with --structured: a checkpoint directory or GGUF, "
                        "or 'default', instead of the random-weight preset")
    parser.add_argument("--transformers-only", help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if not 0 <= args.structured <= 1:
        parser.error(f"--structured {args.structured}: expected a fraction in [0, 1]")
    if args.model and not args.structured:
        parser.error(f"--model {args.model}: only with --structured")
    if args.transformers_only:
        model_dir, prompts, outputs = json.loads(Path(args.transformers_only).read_text())
        print(json.dumps(run_transformers(model_dir, prompts, outputs, args.hf_batch_size)))
        return
    if args.structured:
        run_structured(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.preset, Path(tmp) / "model")
        prompts, outputs = workload(args)
        hf = None
        if not args.skip_transformers:
            job = Path(tmp) / "job.json"
            job.write_text(json.dumps([str(model_dir), prompts, outputs]))
            result = subprocess.run([sys.executable, __file__, "--transformers-only", str(job),
                                     "--hf-batch-size", str(args.hf_batch_size)],
                                    capture_output=True, text=True, check=True)
            hf = json.loads(result.stdout.strip().splitlines()[-1])
        from engine.config import EngineConfig  # noqa: F401  (jax starts here, after torch)
        flops, bandwidth = measure_ceilings()
        ember = run_ember(model_dir, prompts, outputs, args)
        from models import load_config
        model_config = load_config(model_dir)
        params = model_config.num_parameters
        honest = honest_roofline_seconds(model_config, ember["steps"], ember["page_size"], flops,
                                         bandwidth)
        attention = measure_decode_attention(model_config, ember["steps"], ember["page_size"],
                                             bandwidth, args.backend)
    report(args, params, prompts, outputs, flops, bandwidth, ember, hf, honest, attention,
           model_config)


def run_structured(args):
    from engine import LLMEngine
    from scripts.offline_structured import compare

    prompts, outputs = workload(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(args.preset, Path(tmp) / "model")
        engine = LLMEngine(None if model == "default" else model, engine_config(args))
        print(f"model: {engine.model_path}; warm-up (compile) {engine.warmup_seconds:.1f} s")
        compare(engine, prompts, outputs, args.structured)


def report(args, params, prompts, outputs, flops, bandwidth, ember, hf, honest, attention,
           model_config):
    prompt_tokens, output_tokens = sum(map(len, prompts)), sum(outputs)
    weights = decode_weights(model_config)   # f32: 4 bytes each
    roofline = output_tokens / ((prompt_tokens + output_tokens) * 2 * weights / flops)
    memory_roofline = max(bandwidth, ember["batch1_bandwidth"]) / (4 * weights)
    print(f"\nmodel: random-weight Llama, {params / 1e6:.1f}M params (preset {args.preset}, "
          f"layers {args.layers}); {args.requests} requests, {prompt_tokens} prompt + "
          f"{output_tokens} output tokens")
    print(f"ceilings: f32 matmul {flops / 1e9:.1f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")
    print(f"compute roofline: {roofline:.0f} output tok/s; batch-1 memory roofline: "
          f"{memory_roofline:.0f} tok/s ({4 * weights / 1e6:.1f} MB of weights a token, over "
          f"the larger of this copy bandwidth and the {ember['batch1_bandwidth'] / 1e9:.1f} "
          "GB/s measured before the batch-1 runs)\n")
    rows = [("output tok/s", "tokens_per_s", "{:.1f}"), ("wall s", "seconds", "{:.1f}"),
            ("TTFT p50/p99 ms", "ttft", "{0[0]:.0f} / {0[1]:.0f}"),
            ("per-token p50/p99 ms", "itl", "{0[0]:.1f} / {0[1]:.1f}"),
            ("peak RSS MB", "peak_mb", "{:.0f}")]
    print("| metric | ember | transformers |\n|---|---|---|")
    for label, key, fmt in rows:
        theirs = fmt.format(hf[key]) if hf else "skipped"
        print(f"| {label} | {fmt.format(ember[key])} | {theirs} |")
    print(f"| warm-up (compile) s | {ember['warmup_s']:.1f} | - |")
    print(f"| compilations after warm-up | {ember['compilations_after_warmup']} | - |")
    print(f"| prefix-cache hit rate | {ember['prefix_hit_rate']:.1%} | - |")
    print(f"\nember / compute roofline (weights' FLOPs only): "
          f"{ember['tokens_per_s'] / roofline:.1%}")
    print(f"ember / honest roofline ({len(ember['steps'])} steps; weights, attention, K/V pages "
          f"read and written): {honest / ember['seconds']:.1%} (target >= 70%; roofline "
          f"{honest:.2f} s of {ember['seconds']:.2f} s)")
    backend, rate, num_seqs, share = attention
    print(f"what bounds it: decode attention ({backend}, one layer, the step with the most "
          f"decodes, {num_seqs} sequences) reads K/V pages at {rate / 1e9:.1f} GB/s = "
          f"{share:.0%} of copy bandwidth, which the honest roofline assumes")
    num_seqs, wall = ember["dense"]
    dense_roofline = honest_roofline_seconds(model_config, [[(1, 16, True)] * num_seqs],
                                             ember["page_size"], flops, bandwidth)
    print(f"and the rest of a decode step: {num_seqs} sequences at a 16-token context "
          f"(attention negligible) take {wall * 1e3:.1f} ms, {dense_roofline / wall:.0%} of "
          f"their roofline ({dense_roofline * 1e3:.1f} ms): the matmuls of {num_seqs} rows "
          f"(on the CPU backend Ember's kernel, else XLA's), the LM head "
          f"and sampling")
    sync = ember["sync"]
    classes = step_classes(model_config, sync["steps"], sync["busy_each"], ember["page_size"],
                           flops, bandwidth)
    if classes is None:
        print("where the device's time went: the in-line run's computations do not line up "
              "with its steps")
    else:
        print(f"\nwhere the device's time went (the in-line run, {sync['seconds']:.2f} s):\n"
              "| steps | count | device s | roofline s | share of roofline | share of wall |"
              "\n|---|---|---|---|---|---|")
        for label, count, device, roof in classes:
            print(f"| {label} | {count} | {device:.2f} | {roof:.2f} | {roof / device:.0%} | "
                  f"{device / sync['seconds']:.0%} |")
    if hf:
        print(f"ember / transformers: {ember['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    print("\n| scheduling | output tok/s | host ms per step (in jitted calls) | device idle "
          "(share of wall) |\n|---|---|---|---|")
    for label, run in (("async (default)", ember), ("in line (--no-async-scheduling)", sync)):
        print(f"| {label} | {run['tokens_per_s']:.1f} | {run['host_ms']:.2f} "
              f"({run['dispatch_ms']:.2f}) | {run['idle_share']:.1%} |")
    print(f"device idle with async scheduling: {ember['idle_share']:.1%} (target < 5%)")
    print(f"batch-1 decode (median of {BATCH1_RUNS} runs): "
          f"{ember['batch1_tokens_per_s']:.1f} tok/s = "
          f"{ember['batch1_tokens_per_s'] / memory_roofline:.1%} of the memory roofline "
          f"(target >= 80%); in line (--no-async-scheduling) "
          f"{ember['batch1_in_line_tokens_per_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
