"""Shared switches for the kernel tests.

Kernel test classes set INTERPRET = GPU_INTERPRET (or TPU_INTERPRET): on a CPU the Pallas
kernels run in interpret mode; on a GPU (or with EMBER_PALLAS_INTERPRET=0) they run natively.
"""

import os

import jax
import numpy as np


def _interpret_for(platform: str) -> bool:
    forced = os.environ.get("EMBER_PALLAS_INTERPRET")
    if forced is not None:
        return forced not in ("0", "false", "False")
    return jax.default_backend() != platform


GPU_INTERPRET = _interpret_for("gpu")
# Mosaic kernels only compile for a TPU; elsewhere they run under TPU interpret mode.
TPU_INTERPRET = jax.default_backend() != "tpu"
# Native GPU runs use the device; interpreted runs stay tiny to fit the CPU budget.
ON_GPU = jax.default_backend() == "gpu"
NATIVE_GPU = ON_GPU and not GPU_INTERPRET


def row_keys(seed: int, num_rows: int, first_position: int = 0):
    """u32[num_rows, 2]: fold_in(PRNGKey(seed), position) for consecutive output positions."""
    base = jax.random.PRNGKey(seed)
    positions = np.arange(first_position, first_position + num_rows)
    return jax.vmap(lambda p: jax.random.key_data(jax.random.fold_in(base, p)))(positions)
