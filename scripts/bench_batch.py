"""`ember batch` throughput against LLM.generate on the same requests, and resume overhead.

    python scripts/bench_batch.py                       # embedded default model
    python scripts/bench_batch.py --model DIR --requests 2048 --max-tokens 128

1. Throughput: the same N completions (a shared prefix plus a random tail, greedy,
   ignore_eos, max_tokens fixed, so both do exactly the same work) run through one engine,
   alternately with LLM.generate and with run_batch (what `ember batch` runs: server
   parsing, response bodies, output lines, fsync and ledger billing once a second). Each is
   timed --repeats times after a warm-up run; the best time counts. Target: batch within 5%.
2. Resume overhead: an output of --resume-lines finished lines (copies of the real lines),
   re-read as a resumed run does (OutputFile: torn-line check and finished custom_ids); also
   the whole resumed start (input parsed too, and the ledger reconciled). Target: < 1 s per
   100k lines.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = ("def class return import yield lambda for while with self None True False "
         "value items result index key data path name").split()


def make_lines(count: int, max_tokens: int, prefix_words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    shared = " ".join(rng.choice(WORDS) for _ in range(prefix_words))
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                      "ignore_eos": True,
                      "prompt": shared + " " + " ".join(rng.choice(WORDS) for _ in range(
                          rng.randint(4, 32)))}} for i in range(count)]


def time_generate(llm, lines: list[dict]) -> tuple[float, int]:
    from engine import SamplingParams

    params = [SamplingParams(max_tokens=line["body"]["max_tokens"], temperature=0,
                             ignore_eos=True) for line in lines]
    start = time.perf_counter()
    outputs = llm.generate([line["body"]["prompt"] for line in lines], params, use_tqdm=False)
    return time.perf_counter() - start, sum(o.usage.completion_tokens for o in outputs)


def time_batch(llm, input_path: Path, work: Path, run: int) -> tuple[float, int]:
    from engine.batch.job import open_batch, run_batch
    from engine.metering import Ledger

    start = time.perf_counter()
    files = open_batch(input_path, work / f"out-{run}.jsonl")
    with Ledger(f"sqlite:///{work / f'ledger-{run}.db'}") as ledger:
        summary = run_batch(llm.engine, files, model_name="bench", ledger=ledger,
                            key=ledger.anonymous_key(), progress=False)
    files.close()
    assert summary.succeeded == summary.total, summary
    return time.perf_counter() - start, summary.completion_tokens


def bench_throughput(llm, lines: list[dict], work: Path, repeats: int) -> dict:
    input_path = work / "in.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    time_generate(llm, lines[:max(1, len(lines) // 8)])   # warm: compiles, fills the prefix
    best = {"generate": None, "batch": None}
    for run in range(repeats):
        for name, seconds_tokens in (("generate", time_generate(llm, lines)),
                                     ("batch", time_batch(llm, input_path, work, run))):
            seconds, tokens = seconds_tokens
            print(f"  run {run} {name:<8} {seconds:7.2f} s  {tokens / seconds:9.1f} tok/s")
            if best[name] is None or seconds < best[name][0]:
                best[name] = (seconds, tokens)
    return best


def bench_resume(work: Path, num_lines: int) -> dict:
    """Seconds to re-read an output of num_lines finished lines, and to open a resume."""
    from engine.batch.job import open_batch, reconcile
    from engine.batch.jsonl import OutputFile
    from engine.metering import Ledger

    sample = (work / "out-0.jsonl").read_bytes().splitlines()[0]
    template = json.loads(sample)
    lines, inputs = [], []
    for i in range(num_lines):
        template["custom_id"] = f"c{i}"
        template["response"]["request_id"] = f"cmpl-resume-{i}"
        lines.append(json.dumps(template, ensure_ascii=False))
        inputs.append(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                  "url": "/v1/completions", "body": {"prompt": "x"}}))
    output, input_path = work / "resume-out.jsonl", work / "resume-in.jsonl"
    output.write_text("\n".join(lines) + "\n")
    input_path.write_text("\n".join(inputs) + "\n")
    with Ledger(f"sqlite:///{work / 'resume.db'}") as ledger:
        key = ledger.anonymous_key()
        for start in range(0, num_lines, 5000):   # billed, as a finished run leaves them
            ledger.record_finished(key, "bench", [(f"cmpl-resume-{i}", 10, 0, 10) for i in
                                                  range(start, min(start + 5000, num_lines))])
        start = time.perf_counter()
        with OutputFile(output) as opened:
            assert len(opened.finished) == num_lines
        reread = time.perf_counter() - start
        start = time.perf_counter()
        files = open_batch(input_path, output)
        assert not files.pending
        billed = reconcile(files.output, ledger, key, "bench", 0.5)
        files.close()
        full = time.perf_counter() - start
    assert billed == 0
    size_mb = output.stat().st_size / 1e6
    return {"lines": num_lines, "mb": size_mb, "reread_s": reread, "open_and_reconcile_s": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefix-words", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resume-lines", type=int, default=100_000)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args()

    from engine import LLM

    llm = LLM(args.model, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, warmup=not args.no_warmup)
    lines = make_lines(args.requests, args.max_tokens, args.prefix_words, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"throughput: {args.requests} requests x {args.max_tokens} tokens")
        best = bench_throughput(llm, lines, work, args.repeats)
        rate = {name: tokens / seconds for name, (seconds, tokens) in best.items()}
        print(f"best: generate {rate['generate']:.1f} tok/s, batch {rate['batch']:.1f} tok/s "
              f"= {rate['batch'] / rate['generate']:.1%} of generate (target >= 95%)")
        resume = bench_resume(work, args.resume_lines)
        per_100k = 100_000 / resume["lines"]
        print(f"resume: {resume['lines']} lines ({resume['mb']:.0f} MB): re-read "
              f"{resume['reread_s']:.2f} s ({resume['reread_s'] * per_100k:.2f} s per 100k, "
              f"target < 1 s); open + reconcile {resume['open_and_reconcile_s']:.2f} s")


if __name__ == "__main__":
    main()
