"""transformers' `generate` on random-weight Llamas: the baseline of scripts/bench_gpu_e2e.py.

Run as a child process (its own device memory, and a hang costs only its time limit). Reads
one JSON spec from argv (jobs, configs, lengths, and a time.time() deadline: a job that
cannot start min_s before it is skipped, one out of device memory is skipped too) and prints
one JSON line per job, so a caller that kills it at its time limit keeps what was done:

  {"shape": "8b", "concurrency": 64, "tokens_per_s": ..., "seconds": ..., "device": ...}

Each job: `concurrency` prompts of `prompt_len` random tokens (all one length, so the padded
batch has no padding), greedy, exactly `output_len` new tokens (min = max), in one batch;
after one short untimed generate per model (CUDA context, kernels).
"""

from __future__ import annotations

import json
import sys
import time


def build(hf_config: dict, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_default_dtype(dtype)
    with torch.device(device):   # initialised where it runs: no host copy of the weights
        model = LlamaForCausalLM(LlamaConfig(**hf_config)).eval()
    generate(model, 1, 8, 2, device)   # untimed: CUDA context, kernels, allocator
    return model


def generate(model, batch: int, prompt_len: int, output_len: int, device: str) -> float:
    """Seconds for one greedy generate of `batch` random prompts."""
    import torch

    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=generator)
    ids = ids.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=output_len, min_new_tokens=output_len,
                             pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape == (batch, prompt_len + output_len), out.shape
    return seconds


def main(spec: dict) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":   # --quick: threads spinning on a few shared cores cost 100x
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = {}
    for job in spec["jobs"]:
        if time.time() + job["min_s"] > spec["deadline"]:   # the caller's clock: time.time()
            print(json.dumps({**job, "skipped": "out of time"}), flush=True)
            continue
        shape = job["shape"]
        try:
            if shape not in models:
                models[shape] = build(spec["configs"][shape], device, dtype)
            seconds = generate(models[shape], job["concurrency"], spec["prompt_len"],
                               spec["output_len"], device)
        except torch.cuda.OutOfMemoryError:   # e.g. 256 padded prompts: the others still run
            print(json.dumps({**job, "skipped": "out of device memory"}), flush=True)
            torch.cuda.empty_cache()
            continue
        tokens = job["concurrency"] * spec["output_len"]
        print(json.dumps({**job, "tokens_per_s": tokens / seconds, "seconds": seconds,
                          "device": device, "dtype": str(dtype).removeprefix("torch.")}),
              flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
