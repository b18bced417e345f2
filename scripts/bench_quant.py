"""Quality and speed of the default model's weight and KV-cache modes, side by side in one run.

For SmolLM2-135M-Instruct (the default model's GGUF, Q4_1 blocks), each mode below is loaded
with `engine.LLM` and measured on the same inputs:
  - perplexity on a fixed held-out text every machine has: the documentation strings of a
    few Python standard-library modules, cut into windows of --window tokens;
  - batch-1 decode tokens/s (one greedy request, --decode-tokens tokens, EOS ignored);
  - offline throughput: --requests requests of random prompts, --output-tokens tokens each.
llama.cpp on the same GGUF (llama-cpp-python, an optional extra: it builds from source) runs
the same batch-1 decode and the same throughput workload one request after another (its Python
binding serves one sequence at a time); it is skipped with a message where absent.

Usage: python scripts/bench_quant.py [--modes f32,bf16,int8,int4,kv-bf16,kv-fp8,kv-int8]
       [--window 512] [--tokens 4096] [--requests 64] [--skip-llama-cpp] [--quality-only]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> LLM options. "int4" keeps the file's Q4_1 blocks (no float round trip); "f32" is the
# same values dequantized, so the two should agree to float rounding.
MODES = {
    "f32": dict(dtype="float32", quantization="none"),
    "bf16": dict(dtype="bfloat16", quantization="none"),
    "int8": dict(dtype="float32", quantization="int8"),
    "int4": dict(dtype="float32", quantization=None),
    "kv-bf16": dict(dtype="float32", quantization="none", kv_cache_dtype="bfloat16"),
    "kv-fp8": dict(dtype="float32", quantization="none", kv_cache_dtype="float8_e4m3fn"),
    "kv-int8": dict(dtype="float32", quantization="none", kv_cache_dtype="int8"),
}
DOC_MODULES = ("json", "textwrap", "functools", "itertools", "collections", "pathlib",
               "argparse", "logging", "subprocess", "shutil", "tempfile", "csv", "heapq",
               "bisect", "statistics", "fractions", "decimal", "datetime", "string", "re")


def held_out_text() -> str:
    """Docstrings of DOC_MODULES' public members, in a fixed order."""
    import importlib

    parts = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member_name in sorted(dir(module)):
            if member_name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, member_name, None))
            if doc and len(doc) > 80:
                parts.append(f"{name}.{member_name}: {doc}")
    return "\n\n".join(parts)


def perplexity(llm, token_ids: list[int], window: int) -> float:
    from engine import SamplingParams

    windows = [token_ids[i:i + window] for i in range(0, len(token_ids) - window + 1, window)]
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows],
                           SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    total, count = 0.0, 0
    for w, output in zip(windows, outputs):
        for position in range(1, len(w)):
            total += output.prompt_logprobs[position][w[position]].logprob
            count += 1
    return math.exp(-total / count)


def batch1_decode(llm, tokens: int) -> float:
    """Decode tokens/s of one greedy request: (time for N+1 tokens - time for 1) / N."""
    from engine import SamplingParams

    prompt = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    times = {}
    for count in (1, tokens + 1, 1, tokens + 1):   # twice each: the first pair warms caches
        params = SamplingParams(max_tokens=count, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        llm.chat(prompt, params, use_tqdm=False)
        times[count] = time.perf_counter() - started
    return tokens / (times[tokens + 1] - times[1])


def throughput(llm, prompts: list[list[int]], output_tokens: int) -> float:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def llama_cpp_figures(path: Path, prompts, args) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: skipped (pip install llama-cpp-python; it builds from source)")
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=os.cpu_count(), n_batch=512,
                          verbose=False)
    eos = llm.token_eos()

    def decode(prompt_ids: list[int], count: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds for `count` tokens) of one greedy sequence."""
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt_ids)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(count):
            logits = np.asarray(llm.scores[llm.n_tokens - 1])
            logits[eos] = -np.inf
            llm.eval([int(np.argmax(logits))])
        return prefill, time.perf_counter() - started

    chat = llm.tokenize(b"<|im_start|>user\nWrite a long story about a lighthouse keeper."
                        b"<|im_end|>\n<|im_start|>assistant\n", special=True)
    decode(chat, 8)
    _, seconds = decode(chat, args.decode_tokens)
    figures = {"decode": args.decode_tokens / seconds}
    started, produced = time.perf_counter(), 0
    for prompt in prompts[:args.llama_cpp_requests]:
        decode(prompt, args.output_tokens)
        produced += args.output_tokens
    figures["throughput"] = produced / (time.perf_counter() - started)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--llama-cpp-requests", type=int, default=8,
                        help="llama.cpp runs requests one by one: this many are timed")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--quality-only", action="store_true",
                        help="perplexity only: bf16 and fp8 are emulated on a CPU and slow")
    args = parser.parse_args()

    from engine import LLM
    from engine.default_model.fetch import ensure_default_model

    path = Path(args.model) if args.model else ensure_default_model()
    rng = np.random.default_rng(0)
    rows, text = [], held_out_text()
    for name in filter(None, args.modes.split(",")):
        llm = LLM(str(path), max_model_len=max(args.window, 1024), **MODES[name],
                  warmup=not args.quality_only)   # scoring alone compiles little
        token_ids = llm.get_tokenizer().encode(text, add_special_tokens=False)[:args.tokens]
        vocab = llm.get_tokenizer().vocab_size
        prompts = [rng.integers(100, vocab - 100, args.prompt_tokens).tolist()
                   for _ in range(args.requests)]
        speed = (math.nan, math.nan) if args.quality_only else (
            batch1_decode(llm, args.decode_tokens), throughput(llm, prompts, args.output_tokens))
        rows.append((name, perplexity(llm, token_ids, args.window), *speed))
        print(f"{name:8s} perplexity {rows[-1][1]:8.3f}  batch-1 decode {rows[-1][2]:7.1f} tok/s"
              f"  {args.requests}-request throughput {rows[-1][3]:7.1f} tok/s", flush=True)
        del llm
        gc.collect()
    reference = {name: ppl for name, ppl, _, _ in rows}.get("f32")
    print(f"\n| mode | perplexity | vs f32 | batch-1 decode tok/s | {args.requests}-request "
          "tok/s |\n|---|---|---|---|---|")
    for name, ppl, decode, tput in rows:
        change = f"{100 * (ppl / reference - 1):+.2f}%" if reference else "-"
        print(f"| {name} | {ppl:.3f} | {change} | {decode:.1f} | {tput:.1f} |")
    if not args.skip_llama_cpp:
        prompts = [rng.integers(100, 49000, args.prompt_tokens).tolist()
                   for _ in range(args.llama_cpp_requests)]
        figures = llama_cpp_figures(path, prompts, args)
        if figures:
            print(f"| llama.cpp ({path.name}) | - | - | {figures['decode']:.1f} | "
                  f"{figures['throughput']:.1f} (one request at a time) |")
    print(f"\nheld-out text: {args.tokens} tokens of standard-library docstrings, windows of "
          f"{args.window}; {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
