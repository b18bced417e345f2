"""Load time of one model from Hugging Face safetensors and from Ember's orbax conversion.

Each load runs in a fresh subprocess (cold imports excluded, file cache warm after a first
untimed read), repeated; prints the median of each. A mapped checkpoint defers page faults to
the first use of each weight, so the script also times one precompiled pass that reads every
weight right after the load ("+ first read").

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
import jax, jax.numpy as jnp
from flax import nnx
from models import load_config, load_model
from models.checkpoint import abstract_model
shapes = jax.tree.leaves(abstract_model(load_config(sys.argv[1]))[1])
read_all = jax.jit(lambda weights: sum(jnp.sum(w.astype(jnp.float32)) for w in weights))
read_all = read_all.lower([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in shapes]).compile()
start = time.perf_counter()
model = load_model(sys.argv[1])
weights = jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
loaded = time.perf_counter()
read_all(weights).block_until_ready()
print(loaded - start, time.perf_counter() - start)
"""


def timed_load(model_dir: Path) -> tuple[float, float]:
    """Seconds to load, and to load and then read every weight once."""
    result = subprocess.run([sys.executable, "-c", _TIMED_LOAD, str(model_dir)],
                            capture_output=True, text=True, check=True)
    load, load_and_read = result.stdout.strip().splitlines()[-1].split()
    return float(load), float(load_and_read)


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
            runs = [timed_load(directory) for _ in range(args.repeats)]
            results[label] = [statistics.median(column) for column in zip(*runs)]
        params = load_config(hf_dir).num_parameters
    print(f"model: {params / 1e6:.1f}M params; median of {args.repeats} loads, "
          f"each in a fresh process")
    print(f"  {'':12s} {'load':>8s} {'+ first read':>13s}")
    for label, (load, load_and_read) in results.items():
        print(f"  {label:12s} {load:7.3f}s {load_and_read:12.3f}s")
    (orbax_load, orbax_read), (st_load, st_read) = results["orbax"], results["safetensors"]
    print(f"  orbax / safetensors: load {orbax_load / st_load:.2f}, "
          f"load + first read {orbax_read / st_read:.2f}")


if __name__ == "__main__":
    main()
