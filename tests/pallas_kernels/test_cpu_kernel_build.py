"""Building the CPU attention kernel (pallas_kernels/cpu): where no compiler works, "auto" falls
back to the reference and backend="cpu" says why; concurrent first uses share one build. Each
case runs in a fresh process with its own cache directory (the build is once per process)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import jax.numpy as jnp
import pallas_kernels
print("auto:", pallas_kernels.resolve_backend("auto"))
try:
    out = pallas_kernels.ragged_paged_attention(
        jnp.ones((1, 2, 8)), jnp.ones((2, 4, 2, 8)), jnp.array([3], jnp.int32),
        jnp.array([[1]], jnp.int32), jnp.array([0, 1], jnp.int32), jnp.array([1], jnp.int32),
        sm_scale=1.0, backend="cpu")
    print("cpu:", float(out.sum()))
except RuntimeError as error:
    print("cpu refused:", error)
"""


def probe(cache_dir, **env):
    return subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "EMBER_CACHE_DIR": str(cache_dir), **env})


def test_without_a_compiler_auto_is_the_reference_and_cpu_is_refused(tmp_path):
    out, err = probe(tmp_path, CXX=str(tmp_path / "no-such-compiler")).communicate(timeout=120)
    assert "auto: reference" in out
    assert "cpu refused: backend='cpu'" in out and "backend='reference'" in out
    assert "falls back to the plain-jnp reference" in err
    assert not list(tmp_path.rglob("*.so"))


def test_concurrent_first_uses_share_one_build(tmp_path):
    runs = [probe(tmp_path) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for out, err in outputs:
        assert "auto: cpu" in out, err
        assert "cpu: 16.0" in out, err     # ones attend to ones: every output element is 1
    (library,) = (tmp_path / "cpu_kernels").iterdir()   # no temporary left behind
    assert library.suffix == ".so"
