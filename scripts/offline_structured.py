"""bench_offline.py --structured FRACTION: one workload run free and with FRACTION of its
requests under a JSON schema, on one engine after one warm-up (each kind twice: see measure).

Both runs have the same prompts and max_tokens, with ignore_eos: a free request generates
exactly max_tokens, a constrained one stops ("stop") as soon as its JSON is complete. So
each run's tok/s counts the output tokens it actually generated, and the figure compared is
structured tok/s / free tok/s. Each run starts from an empty prefix cache.

The host's mask work is timed by a wrapper around the name the runner calls
(`engine.worker.runner.fill_bitmasks`, replaced here; the engine is not changed). The runner
fills the masks after dispatching the forward, so that time overlaps the device step.
"""

from __future__ import annotations

import json
import time

# A realistic object: typed properties, an enum, an array, required fields. Strings are
# bounded so that a random-weight model's greedy output still completes.
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "editor", "viewer", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "role", "tags"], "additionalProperties": False}


def constrained_indices(num_requests: int, fraction: float) -> list[int]:
    """Requests spread evenly: i is constrained when floor((i + 1) f) > floor(i f), so 0.5
    is every other request and int(num_requests * f) are chosen in all."""
    return [i for i in range(num_requests) if int((i + 1) * fraction) > int(i * fraction)]


def install_fill_clock() -> dict:
    """Wraps the runner's fill_bitmasks; returns the running totals it adds to."""
    import engine.worker.runner as runner

    clock, fill = {"seconds": 0.0, "calls": 0, "rows": 0}, runner.fill_bitmasks

    def timed_fill(rows, bitmask):
        start = time.perf_counter()
        fill(rows, bitmask)
        clock["seconds"] += time.perf_counter() - start
        clock["calls"] += 1
        clock["rows"] += len(rows)

    runner.fill_bitmasks = timed_fill
    return clock


def run_pass(engine, label: str, prompts, outputs, specs: dict) -> dict:
    """Adds every request at once and steps until all finish.

    Args:
      specs: request index -> StructuredOutput for the constrained ones.
    Returns:
      tokens (generated), seconds (wall) and finished (index -> CompletionOutput).
    """
    from engine import SamplingParams

    engine.scheduler.reset_prefix_cache()   # the free run's prompts must not speed this one
    finished = {}
    start = time.perf_counter()
    for index, (prompt, count) in enumerate(zip(prompts, outputs)):
        params = SamplingParams(max_tokens=count, temperature=0, ignore_eos=True,
                                structured_output=specs.get(index))
        engine.add_request(f"{label}-{index}", {"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[int(output.request_id.rsplit("-", 1)[1])] = output.outputs[0]
    seconds = time.perf_counter() - start
    return dict(tokens=sum(len(o.token_ids) for o in finished.values()), seconds=seconds,
                finished=finished)


def check_json(finished: dict, indices: list[int]) -> dict:
    """Of the constrained outputs that ended by themselves ("stop"): how many parse as JSON
    and how many are valid against SCHEMA."""
    import jsonschema

    stopped = [finished[i].text for i in indices if finished[i].finish_reason == "stop"]
    first = finished[indices[0]] if indices else None
    parsed = valid = 0
    for text in stopped:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        parsed += 1
        valid += jsonschema.Draft202012Validator(SCHEMA).is_valid(value)
    return dict(stopped=len(stopped), parsed=parsed, valid=valid,
                example=f"{first.finish_reason}: {first.text[:120]!r}" if first else "")


def measure(engine, prompts, outputs, fraction: float) -> tuple[dict, dict, dict]:
    """Warms up, then runs the workload free, structured, structured, free: each kind twice,
    so that a machine growing busier or quieter (other jobs share it) weighs on both alike.

    Returns:
      free and structured totals (tokens, seconds, fill_seconds, fill_rows), and the JSON
      check of the last structured run.
    """
    from engine.structured import StructuredOutput

    spec = StructuredOutput.json_schema(SCHEMA)
    indices = constrained_indices(len(prompts), fraction)
    clock = install_fill_clock()
    # Warm-up beyond the engine's own: every prompt's prefill once (a first run was slower
    # by half without it), the grammar compiler for this vocabulary, the schema's compiled
    # grammar and llguidance's thread pool (24 ms on its first fill).
    run_pass(engine, "warm", prompts, [4] * len(prompts), {i: spec for i in indices})
    totals = {label: dict(tokens=0, seconds=0.0, fill_seconds=0.0, fill_rows=0)
              for label in ("free", "structured")}
    last_structured = None
    for label in ("free", "structured", "structured", "free"):
        before = dict(clock)
        run = run_pass(engine, label, prompts, outputs,
                       {i: spec for i in indices} if label == "structured" else {})
        print(f"{label} run: {run['tokens']} output tokens in {run['seconds']:.1f} s")
        last_structured = run if label == "structured" else last_structured
        total = totals[label]
        total["tokens"] += run["tokens"]
        total["seconds"] += run["seconds"]
        total["fill_seconds"] += clock["seconds"] - before["seconds"]
        total["fill_rows"] += clock["rows"] - before["rows"]
    finished = last_structured["finished"]
    checked = check_json(finished, indices)
    checked["constrained_tokens"] = sum(len(finished[i].token_ids) for i in indices)
    checked["constrained"] = len(indices)
    return totals["free"], totals["structured"], checked


def compare(engine, prompts, outputs, fraction: float) -> None:
    """Measures (see `measure`) and prints the comparison."""
    free, structured, checked = measure(engine, prompts, outputs, fraction)
    free_rate = free["tokens"] / free["seconds"]
    rate = structured["tokens"] / structured["seconds"]
    print(f"\n{checked['constrained']} of {len(prompts)} requests under a JSON schema "
          f"({len(SCHEMA['properties'])} properties: string, integer, enum, array, boolean); "
          f"compilations after warm-up: {engine.compilations_after_warmup}")
    print(f"free runs: {free['tokens']} output tokens in {free['seconds']:.1f} s = "
          f"{free_rate:.1f} tok/s")
    print(f"structured runs: {structured['tokens']} output tokens in "
          f"{structured['seconds']:.1f} s = {rate:.1f} tok/s ({checked['constrained_tokens']} "
          f"of each run's constrained)")
    print(f"constrained outputs: {checked['stopped']} of {checked['constrained']} ended by "
          f"themselves (the rest hit max_tokens); {checked['parsed']} of those parse as JSON, "
          f"{checked['valid']} valid against the schema")
    if checked["example"]:
        print(f"  first constrained output, {checked['example']}")
    fill_s = structured["fill_seconds"]
    print(f"mask fill (host): {fill_s:.2f} s for {structured['fill_rows']} rows = "
          f"{fill_s / structured['seconds']:.1%} of the structured runs' wall time")
    print(f"structured {fraction:.2f}: {rate:.1f} tok/s vs {free_rate:.1f} tok/s unconstrained "
          f"= {rate / free_rate:.1%} (target >= 90%)")
