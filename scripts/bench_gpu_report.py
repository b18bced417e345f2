"""The time budget and the results of scripts/bench_gpu_e2e.py: one markdown table and one JSON
file, rewritten after every part, so a run killed from outside keeps what it measured."""

from __future__ import annotations

import json
import time
from pathlib import Path

# A part starts only with at least this share of its own limit left in the budget: a warm-up
# cannot be cut once started, and one begun with too little time would outlive the budget.
MIN_SHARE_TO_START = 0.3


class Report:
    """Args: budget_s (all parts), out (a folder, or None), spec_bandwidth (bytes/s on
    paper), workload (bench_gpu_e2e's FULL or QUICK), quick (its figures mean nothing)."""

    def __init__(self, budget_s: float, out: Path | None, spec_bandwidth: float,
                 workload: dict, *, quick: bool):
        self.deadline = time.perf_counter() + budget_s
        self.out = out
        self.spec_bandwidth = spec_bandwidth
        self.workload = workload
        self.results = dict(quick=quick, budget_s=budget_s, workload=workload, device=None,
                            bandwidth=None, engines={}, warmup={}, batch1={}, throughput={},
                            transformers={}, skipped=[], notes=[])

    # ------------------------------------------------------------------ the budget
    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def starts(self, part: str, limit_s: float) -> bool:
        """Whether `part` may start; if not it is recorded as skipped."""
        if self.remaining() >= MIN_SHARE_TO_START * limit_s:
            print(f"-- {part} (limit {self.limit(limit_s):.0f} s)", flush=True)
            return True
        self.results["skipped"].append(part)
        self.write()
        return False

    def limit(self, limit_s: float) -> float:
        return max(1.0, min(limit_s, self.remaining()))

    # ------------------------------------------------------------------ results
    def device(self, kind: str, bandwidth: float) -> None:
        self.results.update(device=kind, bandwidth=bandwidth)
        self.write()

    def engine(self, shape: str, weights: str, load_s: float, bytes_per_token: int) -> None:
        self.results["engines"][f"{shape} {weights}"] = dict(load_s=load_s,
                                                             bytes_per_token=bytes_per_token)
        self.write()

    def warmup(self, shape: str, seconds: float, load_s: float, buckets: int) -> None:
        self.results["warmup"][shape] = dict(seconds=seconds, load_s=load_s, buckets=buckets)
        self.write()

    def batch1(self, shape: str, weights: str, run: dict) -> None:
        self.results["batch1"][f"{shape} {weights}"] = run
        self.write()

    def throughput(self, shape: str, concurrency: int | str, run: dict) -> None:
        self.results["throughput"][f"{shape} {concurrency}"] = run
        self.write()

    def transformers(self, record: dict) -> None:
        self.results["transformers"][f"{record['shape']} {record['concurrency']}"] = record
        self.write()

    def note(self, text: str) -> None:
        print("note:", text, flush=True)
        self.results["notes"].append(text)
        self.write()

    def finish(self) -> None:
        print(self.table(), flush=True)
        self.write()

    def write(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "table.md").write_text(self.table())

    # ------------------------------------------------------------------ the table
    def table(self) -> str:
        r, w = self.results, self.workload
        measured = r["bandwidth"]
        title = "# End-to-end" + (" (--quick: tiny shapes, figures mean nothing)"
                                  if r["quick"] else "")
        lines = [title, "", f"Device: {r['device']}; copy bandwidth measured "
                 f"{_num(measured and measured / 1e9)} GB/s, spec "
                 f"{self.spec_bandwidth / 1e9:.0f} GB/s. Random bf16 weights "
                 "(load_format=\"dummy\").", "",
                 f"## Batch-1 decode ({w['batch1_tokens']} greedy tokens, 32-token prompt)", "",
                 "| model | load s | warm-up s | GB read/token | tok/s | roofline tok/s "
                 "(measured / spec) | share of roofline (measured / spec) | host (in jitted "
                 "calls) / device / idle ms per step |", "|---|---|---|---|---|---|---|---|"]
        for name, engine in r["engines"].items():
            run = r["batch1"].get(name)
            size = engine["bytes_per_token"]
            roof = [bandwidth / size for bandwidth in (measured, self.spec_bandwidth)
                    if bandwidth]
            rate = run["tokens_per_s"] if run else None
            shares = " / ".join(f"{rate / ceiling:.0%}" for ceiling in roof) if rate else "-"
            warmup = r["warmup"].get(name.removesuffix(" bf16"), {}) if name.endswith(
                " bf16") else {}
            lines.append(
                f"| {name} | {_num(engine['load_s'])} | {_num(warmup.get('seconds'))}"
                f"{' (%d buckets)' % warmup['buckets'] if warmup else ''} | "
                f"{_num(size / 1e9)} | {_num(rate)} | {' / '.join(_num(c) for c in roof)} | "
                f"{shares} | {_steps(run)} |")
        lines += ["", f"## Throughput ({w['prompt_len']}-token random prompts, "
                  f"{w['output_len']}-token outputs, ignore_eos; all requests at once)", "",
                  "| model, concurrent | Ember output tok/s | total tok/s | transformers "
                  "output tok/s | Ember / transformers | host (in jitted calls) / device / "
                  "idle ms per step (idle share) | note |", "|---|---|---|---|---|---|---|"]
        for name in {**r["throughput"], **r["transformers"]}:
            run, hf = r["throughput"].get(name), r["transformers"].get(name, {})
            hf_rate = hf.get("tokens_per_s")
            ratio = f"{run['tokens_per_s'] / hf_rate:.1f}x" if run and hf_rate else "-"
            note = (f"partial: {run['finished']} of {run['requests']} requests finished "
                    "at the part's limit" if run and run["partial"] else hf.get("skipped", ""))
            if run and run["compilations"]:
                note += f" {run['compilations']} shapes compiled in the timed run"
            by_kind = "; ".join(
                f"{label} ms a step: " + ", ".join(f"{kind} {ms:.2f}"
                                                   for kind, ms in run[key].items())
                for label, key in (("host", "host_ms_by_kind"), ("device", "busy_ms_by_kind"))
                if run and run.get(key))
            note = f"{note} {by_kind}".strip()
            idle = f" ({run['idle_share']:.0%})" if run else ""
            lines.append(
                f"| {name} | {_num(run and run['tokens_per_s'])} | "
                f"{_num(run and run['total_tokens_per_s'])} | {_num(hf_rate)} "
                f"{hf.get('dtype', '')} | {ratio} | {_steps(run)}{idle} | {note} |")
        if r["skipped"]:
            lines += ["", "Skipped (out of time): " + ", ".join(r["skipped"])]
        lines += [f"- {note}" for note in r["notes"]]
        return "\n".join(lines) + "\n"


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _steps(run: dict | None) -> str:
    if not run:
        return "-"
    dispatch = f" ({run['dispatch_ms']:.2f})" if "dispatch_ms" in run else ""
    return (f"{run['host_ms']:.2f}{dispatch} / {run['busy_ms']:.2f} / "
            f"{run['idle_ms']:.2f}")
