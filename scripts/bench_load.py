"""Load time of one model from Hugging Face safetensors and from Ember's orbax conversion.

Each load runs in a fresh subprocess (cold imports excluded, file cache warm after a first
untimed read), repeated; prints the median of each.

Usage: python scripts/bench_load.py [--model DIR] [--repeats 3]
       (default: a random-weight 60M-parameter Llama built for the purpose)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_TIMED_LOAD = """
import sys, time
import jax
from models import load_model
start = time.perf_counter()
model = load_model(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(model))
print(time.perf_counter() - start)
"""


def timed_load(model_dir: Path) -> float:
    result = subprocess.run([sys.executable, "-c", _TIMED_LOAD, str(model_dir)],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from models import convert_to_orbax, load_config
    from scripts.bench_offline import build_model

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.model or build_model("60m", Path(tmp) / "hf")
        orbax_dir = convert_to_orbax(hf_dir, Path(tmp) / "orbax")
        results = {}
        for label, directory in (("safetensors", hf_dir), ("orbax", orbax_dir)):
            timed_load(directory)  # warms the file cache
            results[label] = statistics.median(timed_load(directory)
                                               for _ in range(args.repeats))
        params = load_config(hf_dir).num_parameters
    print(f"model: {params / 1e6:.1f}M params; median of {args.repeats} loads, "
          f"each in a fresh process")
    for label, seconds in results.items():
        print(f"  {label:12s} {seconds:.3f} s")
    print(f"  orbax / safetensors: {results['orbax'] / results['safetensors']:.2f}")


if __name__ == "__main__":
    main()
