"""Serving benchmark: a concurrency sweep against a running `ember serve`.

For each concurrency level, `--requests` streaming completions (seeded random token-id prompts
and output lengths, a fresh draw per level so that no level finds its prompts in the server's
prefix cache; ignore_eos so every output has its length) are sent by that many client
threads, each starting its next request as the last one ends. Prints per level: requests/s,
output tokens/s, TTFT p50/p99, the gap between chunks that carry text (ITL) p50/p99, time per
output token after the first (TPOT: a request's last text chunk less its first, over its
tokens less one) p50, end-to-end p50. A chunk can carry more than one token (a character
split over byte tokens is sent whole), so ITL can exceed TPOT.

  --plot FILE.png       throughput and latencies against concurrency (needs matplotlib)
  --offline-compare     the same requests through LLM.generate in this process, at the same
                        concurrency (max_num_seqs = level), and the server / offline ratio of
                        output tokens/s (target: the server within 5% of offline). Needs
                        --model and the server's engine flags; on one accelerator, start the
                        server with a lower --memory-fraction so both fit. Also the same
                        engine fed as the clients feed the server ("closed loop": `level`
                        requests at a time, the next one added once one has finished), whose
                        ratio leaves out what the offline engine gains by holding every
                        request from the start (no slot empty between a request and the
                        next): what is left is HTTP, JSON and the ledger, and the machine's
                        drift between the runs (each level's three runs come one after the
                        other).

Usage: python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --api-key KEY \\
           [--concurrency 1,4,16,64] [--requests 128] [--seed 0] [--plot sweep.png]
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_offline import percentiles  # noqa: E402  (ms p50, p99)


@dataclass(slots=True)
class Result:
    """One request as the client saw it."""

    ttft: float
    gaps: list[float]                 # between successive chunks carrying text
    e2e: float
    output_tokens: int
    tpot: float | None                # (last text chunk - first) / (tokens - 1)


@dataclass(slots=True)
class Level:
    concurrency: int
    seconds: float
    results: list[Result] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict:
        tokens = sum(r.output_tokens for r in self.results)
        gaps = [gap for r in self.results for gap in r.gaps] or [0.0]
        ttft = percentiles([r.ttft for r in self.results] or [0.0])
        itl = percentiles(gaps)
        tpots = [r.tpot for r in self.results if r.tpot is not None] or [0.0]
        return {"concurrency": self.concurrency, "requests_per_s": len(self.results) / self.seconds,
                "output_tokens_per_s": tokens / self.seconds, "ttft_p50_ms": ttft[0],
                "ttft_p99_ms": ttft[1], "itl_p50_ms": itl[0], "itl_p99_ms": itl[1],
                "tpot_p50_ms": percentiles(tpots)[0],
                "e2e_p50_ms": percentiles([r.e2e for r in self.results] or [0.0])[0],
                "errors": self.errors}


def workload(args, draw: int) -> list[tuple[list[int], int]]:
    """`--requests` (prompt, output length) pairs; each `draw` (a concurrency level) its own,
    so that no level finds its prompts in the server's prefix cache from a level before."""
    rng = np.random.default_rng([args.seed, draw])
    low, high = map(int, args.token_range.split(":"))
    return [(rng.integers(low, high, size=int(rng.integers(args.min_prompt, args.max_prompt + 1)))
             .tolist(), int(rng.integers(args.min_output, args.max_output + 1)))
            for _ in range(args.requests)]


def stream_one(session: requests.Session, args, model: str, prompt: list[int],
               max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": args.temperature, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    with session.post(args.base_url + "/v1/completions", json=body, stream=True,
                      headers={"Authorization": f"Bearer {args.api_key}"},
                      timeout=args.timeout) as response:
        response.raise_for_status()
        # chunk_size=None: each of the server's chunks as it arrives. The default (512 bytes)
        # holds an event back until the next fills the buffer, which added up to a chunk's
        # time to every TTFT and gap measured here before 2026-11-30 14:00 UTC.
        for line in response.iter_lines(chunk_size=None):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and (chunk["choices"][0]["text"]
                                     or chunk["choices"][0]["finish_reason"] is None):
                times.append(time.perf_counter())
    end = time.perf_counter()
    times = times or [end]
    tpot = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 and len(times) > 1 else None
    return Result(times[0] - start, list(np.diff(times)), end - start, tokens, tpot)


def run_level(args, model: str, jobs: list, concurrency: int) -> Level:
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        pending.put(job)
    level, lock = Level(concurrency, 0.0), threading.Lock()

    def client() -> None:
        session = requests.Session()
        while True:
            try:
                prompt, max_tokens = pending.get_nowait()
            except queue.Empty:
                return
            try:
                result = stream_one(session, args, model, prompt, max_tokens)
            except requests.RequestException as error:
                print(f"  request failed: {error}", file=sys.stderr)
                with lock:
                    level.errors += 1
                continue
            with lock:
                level.results.append(result)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - start
    return level


def offline_tokens_per_s(args, jobs: list, concurrency: int) -> tuple[float, float]:
    """Output tokens/s of the same requests in this process, at most `concurrency` sequences
    at a time: (LLM.generate given them all at once, the engine given `concurrency` at a
    time and the next each time one finishes, as the clients do). Each run has its own
    prefix-cache salt, so neither finds the other's prompts."""
    from engine import LLM, SamplingParams

    options = {name: getattr(args, name) for name in (
        "max_model_len", "max_num_batched_tokens", "page_size", "num_pages", "memory_fraction")
        if getattr(args, name) is not None}
    llm = LLM(args.model, max_num_seqs=min(concurrency, args.max_num_seqs), **options)
    params = [SamplingParams(max_tokens=count, temperature=args.temperature, ignore_eos=True)
              for _, count in jobs]
    prompts = [{"prompt_token_ids": prompt, "cache_salt": "open"} for prompt, _ in jobs]
    llm.generate([{**prompt, "cache_salt": "warm"} for prompt in prompts[:concurrency]],
                 params[:concurrency], use_tqdm=False)   # the KV pages touched once, untimed
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    open_rate = sum(o.usage.completion_tokens for o in outputs) / (time.perf_counter() - start)
    engine, pending, running, tokens = llm.engine, list(enumerate(jobs)), 0, 0
    start = time.perf_counter()
    while pending or running:
        while pending and running < concurrency:
            index, (prompt, _) = pending.pop(0)
            engine.add_request(f"closed-{index}", {"prompt_token_ids": prompt,
                                                   "cache_salt": "closed"}, params[index])
            running += 1
        for output in engine.step(final_only=True):
            running -= 1
            tokens += output.usage.completion_tokens
    return open_rate, tokens / (time.perf_counter() - start)


def plot(summaries: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return
    load = [s["concurrency"] for s in summaries]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4))
    throughput.plot(load, [s["output_tokens_per_s"] for s in summaries], "o-")
    throughput.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s",
                   title="throughput")
    for name in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms"):
        latency.plot(load, [s[name] for s in summaries], "o-", label=name)
    latency.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms",
                title="latency")
    latency.legend()
    for axes in (throughput, latency):
        axes.set_xticks(load, [str(c) for c in load])
        axes.minorticks_off()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default=None,
                        help="served model id (default: the server's); with --offline-compare, "
                             "the model directory")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=128, help="per concurrency level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--token-range", default="3:259", help="prompt token ids LOW:HIGH")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--plot", default=None, metavar="FILE.png")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the summaries")
    parser.add_argument("--offline-compare", action="store_true")
    for name, kind in (("max-num-seqs", int), ("max-model-len", int), ("page-size", int),
                       ("max-num-batched-tokens", int), ("num-pages", int),
                       ("memory-fraction", float)):
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help="offline engine option (match the server's)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    served = requests.get(args.base_url + "/v1/models", timeout=30,
                          headers={"Authorization": f"Bearer {args.api_key}"})
    served.raise_for_status()
    model = served.json()["data"][0]["id"]
    if args.offline_compare and (args.model is None or args.max_num_seqs is None):
        sys.exit("--offline-compare needs --model DIR and --max-num-seqs (the server's)")
    levels = [int(level) for level in args.concurrency.split(",")]
    jobs = [workload(args, draw) for draw in range(len(levels))]
    warm = workload(args, len(levels))             # prompts no level sends
    run_level(args, model, warm[:min(4, len(warm))], 1)   # connections and caches warm
    print(f"{'clients':>7} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8} {'TPOT p50':>9} {'E2E p50':>9}  (ms)")
    summaries = []
    for concurrency, level_jobs in zip(levels, jobs):
        summary = run_level(args, model, level_jobs, concurrency).summary()
        summaries.append(summary)
        print(f"{concurrency:>7} {summary['requests_per_s']:>8.2f} "
              f"{summary['output_tokens_per_s']:>10.1f} {summary['ttft_p50_ms']:>9.1f} "
              f"{summary['ttft_p99_ms']:>8.1f} {summary['itl_p50_ms']:>8.1f} "
              f"{summary['itl_p99_ms']:>8.1f} {summary['tpot_p50_ms']:>9.1f} "
              f"{summary['e2e_p50_ms']:>9.1f}"
              + (f"   {summary['errors']} errors" if summary["errors"] else ""))
    if args.offline_compare:
        print("\nserver vs the engine in-process, same requests and concurrency (offline: "
              "LLM.generate, all at once; closed loop: the next request once one finishes):")
        for summary, level_jobs in zip(summaries, jobs):
            offline, closed = offline_tokens_per_s(args, level_jobs, summary["concurrency"])
            summary["offline_output_tokens_per_s"] = offline
            summary["closed_loop_output_tokens_per_s"] = closed
            served = summary["output_tokens_per_s"]
            ratio = served / offline
            verdict = "ok" if ratio >= 0.95 else "BELOW the 95% target"
            print(f"{summary['concurrency']:>7} clients: server {served:.1f} / offline "
                  f"{offline:.1f} tok/s = {ratio:.3f}  {verdict}; / closed loop "
                  f"{closed:.1f} = {served / closed:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    if args.plot:
        plot(summaries, args.plot)


if __name__ == "__main__":
    main()
