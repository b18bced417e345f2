"""One engine's measured runs for scripts/bench_gpu_e2e.py: the device's copy bandwidth,
weight bytes a token, batch-1 decode, N requests at once with the DeviceTimeline's per-step
breakdown (engine/worker/timeline.py: host, in jitted calls, device busy and idle, by step
kind), and a cProfile of the host. The engines are bench_gpu_e2e's (make_engine)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def device_bandwidth(quick: bool) -> float:
    """Bytes/s of a large on-device copy (x + 1: read and write), best of 10."""
    import jax
    import jax.numpy as jnp

    n = (1 << 24) if quick else (1 << 30)    # f32 elements: 64 MiB / 4 GiB
    x = jnp.ones((n,), jnp.float32)
    step = jax.jit(lambda a: a + 1)
    step(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        step(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best


def bytes_per_token(engine) -> int:
    """Weights read for one decode token: every parameter, less an untied embedding table."""
    import jax
    from flax import nnx

    total = embed = 0
    for path, variable in nnx.to_flat_state(engine.runner.params):
        nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(variable.get_value()))
        total += nbytes
        embed += nbytes if "embed_tokens" in map(str, path) else 0
    tied = engine.model_config.tie_word_embeddings
    return total if tied else total - embed


def run_requests(engine, prompts: list[list[int]], max_tokens: int, limit_s: float) -> dict:
    """Every prompt at once, stepped until done or `limit_s`; the DeviceTimeline's per-step
    breakdown, token times (the first token of each request, and each token after), the
    shapes compiled meanwhile (0 once an untimed run of the same shape went before) and the
    first request's token ids."""
    from engine import SamplingParams
    from engine.worker.timeline import DeviceTimeline

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    timeline = engine.runner.timeline = DeviceTimeline()
    compiled_before = engine.compilations_after_warmup
    start = time.perf_counter()
    ids = [f"r{start}-{index}" for index in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    produced, token_times, finished, steps, in_step, first_ids = {}, [], 0, 0, 0.0, []
    host_by_kind = {"prefill": [], "decode": [], "drain": []}   # each step's host seconds
    kinds = record_step_kinds(engine)
    try:
        while engine.has_unfinished_requests() and time.perf_counter() - start < limit_s:
            step_start, waited = time.perf_counter(), timeline.waited_s
            outputs = engine.step()
            now = time.perf_counter()
            in_step += now - step_start
            host_by_kind[kinds[-1]].append(now - step_start - (timeline.waited_s - waited))
            steps += 1
            for output in outputs:
                count = len(output.outputs[0].token_ids)
                token_times += [now] * (count - produced.get(output.request_id, 0))
                produced[output.request_id] = count
                finished += output.finished
                if output.request_id == ids[0]:
                    first_ids = list(output.outputs[0].token_ids)
    finally:
        del engine.scheduler.schedule   # record_step_kinds' wrapper: the class's method again
    elapsed = time.perf_counter() - start
    compilations = engine.compilations_after_warmup - compiled_before
    device = timeline.summary()
    engine.runner.timeline = None
    partial = engine.has_unfinished_requests()
    for request_id in ids:   # a run cut by its limit: the rest aborted, the engine reusable
        engine.abort(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    per_step = 1000 / max(steps, 1)
    return dict(output_tokens=len(token_times), seconds=elapsed, finished=finished,
                requests=len(prompts), partial=partial, steps=steps, token_times=token_times,
                compilations=compilations, token_ids=first_ids,
                host_ms=per_step * (in_step - device.waited_s),
                dispatch_ms=per_step * device.dispatch_s, busy_ms=per_step * device.busy_s,
                idle_ms=per_step * device.idle_s, idle_share=device.idle_share,
                host_ms_by_kind={kind: 1000 * sum(times) / len(times)
                                 for kind, times in host_by_kind.items() if times},
                busy_ms_by_kind={kind: 1000 * busy / len(host_by_kind[kind])
                                 for kind, busy in device.busy_by_kind.items()
                                 if host_by_kind.get(kind)})


def record_step_kinds(engine) -> list[str]:
    """A list that gets, for each step the engine schedules from now on, "prefill" (the
    step feeds prompt tokens), "decode" (one token a sequence; the runner labels the
    timeline's computations alike) or "drain" (nothing launched: the call only applies the
    step before), by wrapping the engine's scheduler (the benchmark's own instrumentation;
    `del engine.scheduler.schedule` undoes it). A step whose host time is the device's
    shows which kind waits."""
    kinds, schedule = [], engine.scheduler.schedule

    def recording():
        scheduled = schedule()
        kinds.append("drain" if scheduled.is_empty else
                     "prefill" if scheduled.feeds_prompts else "decode")
        return scheduled

    engine.scheduler.schedule = recording
    return kinds


def batch1_decode(engine, tokens: int, limit_s: float) -> dict:
    """One greedy request: decode tokens/s from its first token to its last (prefill out),
    after an untimed one of the same lengths (compiles a cold engine's shapes). The prompts
    are the same on every engine (a variant's tokens compare with the default's)."""
    untimed, timed = np.random.default_rng(1).integers(
        3, engine.model_config.vocab_size, size=(2, 32)).tolist()
    run_requests(engine, [untimed], tokens, limit_s / 2)
    run = run_requests(engine, [timed], tokens, limit_s / 2)   # no prefix-cache hit
    times = run.pop("token_times")
    decoded = len(times) - 1
    run["tokens_per_s"] = decoded / (times[-1] - times[0]) if decoded > 0 else 0.0
    return run


def throughput(engine, concurrency: int, workload: dict, limit_s: float, rng) -> dict:
    """Output and total tokens/s of `concurrency` requests at once (a warmed-up engine)."""
    prompts = rng.integers(3, engine.model_config.vocab_size,
                           size=(concurrency, workload["prompt_len"])).tolist()
    run = run_requests(engine, prompts, workload["output_len"], limit_s)
    run.pop("token_times")
    run.pop("token_ids")
    run["tokens_per_s"] = run["output_tokens"] / run["seconds"]
    prompt_tokens = workload["prompt_len"] * run["finished"]
    run["total_tokens_per_s"] = (run["output_tokens"] + prompt_tokens) / run["seconds"]
    return run


def profile_host(engine, concurrency: int, workload: dict, limit_s: float, rng) -> list[str]:
    """One more run of `concurrency` requests under cProfile (slower: its figures are not
    reported), the functions that held the host longest (own time), one line each."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        throughput(engine, concurrency, workload, limit_s, rng)
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:25]
    return [f"{own * 1e3:9.1f} ms own {total * 1e3:9.1f} ms cumulative {calls:8d} calls  "
            f"{Path(file).name}:{line} {name}"
            for (file, line, name), (_, calls, own, total, _) in rows]


def make_engine(model_dir: Path, workload: dict, *, max_num_seqs: int, warmup: bool,
                quantization: str | None = None, **overrides):
    """A dummy-weight engine for `max_num_seqs` requests of the workload's lengths, compiled
    cold (no persistent cache, as on a fresh machine); (engine, load seconds). `overrides`:
    other EngineConfig fields (e.g. scan_layers=False)."""
    from engine import EngineConfig, LLMEngine

    page = workload["page_size"]
    max_model_len = workload["prompt_len"] + workload["output_len"] + page
    config = EngineConfig(
        load_format="dummy", dtype="bfloat16", quantization=quantization, seed=0,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max(
            workload["max_num_batched_tokens"], max_num_seqs),
        page_size=page, max_model_len=max_model_len,
        num_pages=max_num_seqs * -(-max_model_len // page) + 2, warmup=warmup,
        compilation_cache_dir="", **overrides)
    start = time.perf_counter()
    engine = LLMEngine(model_dir, config)
    return engine, time.perf_counter() - start - engine.warmup_seconds
