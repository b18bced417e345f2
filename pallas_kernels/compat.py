"""The one place that knows which Pallas (and jax) names each jax version has (jax 0.10.2 to
0.12).

Kernel files, and models/paged.py for shard_map, import these shims instead of probing jax
themselves.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl


def triton_compiler_params(*, num_warps: int, num_stages: int):
    """Compiler params that select the Triton lowering for a GPU pallas_call.

    jax >= 0.7 calls the class `pallas.triton.CompilerParams`; older releases called it
    `TritonCompilerParams` (in `pallas.triton` or `pallas` itself).
    """
    from jax.experimental.pallas import triton as plgpu
    params_class = (getattr(plgpu, "CompilerParams", None)
                    or getattr(plgpu, "TritonCompilerParams", None)
                    or getattr(pl, "TritonCompilerParams"))
    return params_class(num_warps=num_warps, num_stages=num_stages)


def gpu_load(ref, *, mask=None, other=None):
    """A masked load from a Triton ref (index it first with `ref.at[...]`)."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref, mask=mask, other=other)


def gpu_store(ref, value, *, mask=None):
    """A masked store into a Triton ref (index it first with `ref.at[...]`)."""
    from jax.experimental.pallas import triton as plgpu
    plgpu.store(ref, value, mask=mask)


def gpu_block_barrier(*, interpret: bool):
    """__syncthreads: global-memory writes of a program become visible to all its threads.

    Interpret mode runs a program as one sequential computation and needs none.
    """
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        plgpu.debug_barrier()


def tpu_interpret_params():
    """The value for `pallas_call(interpret=...)` that runs a Mosaic kernel on a CPU.

    jax >= 0.7: `pltpu.InterpretParams()`; jax 0.6: `pltpu.TPUInterpretParams()`.
    """
    from jax.experimental.pallas import tpu as pltpu
    params_class = (getattr(pltpu, "InterpretParams", None)
                    or getattr(pltpu, "TPUInterpretParams"))
    return params_class()


def tpu_compiler_params(*, dimension_semantics: tuple[str, ...], vmem_limit_bytes=None):
    """Mosaic compiler params (`pltpu.CompilerParams`, formerly `TPUCompilerParams`)."""
    from jax.experimental.pallas import tpu as pltpu
    params_class = (getattr(pltpu, "CompilerParams", None)
                    or getattr(pltpu, "TPUCompilerParams"))
    return params_class(dimension_semantics=dimension_semantics,
                        vmem_limit_bytes=vmem_limit_bytes)


def shard_map(f, *, mesh, in_specs, out_specs):
    """`f` run once per device on its shards, with no replication checks (a Pallas kernel
    inside is opaque to them).

    `jax.shard_map(check_vma=)` where jax has it (0.10.2 to 0.12 all do); else the older
    `jax.experimental.shard_map.shard_map(check_rep=)`, deprecated since jax 0.8.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy_shard_map
    return legacy_shard_map(f, mesh, in_specs, out_specs, check_rep=False)


@functools.cache
def device_kind() -> str:
    """The first device's kind, e.g. "NVIDIA H100 80GB HBM3"; "" if it cannot be read."""
    try:
        return jax.devices()[0].device_kind
    except (RuntimeError, IndexError):
        return ""


def detect_cluster() -> tuple[str | None, int | None, int | None]:
    """(coordinator address, process count, this process's id) from jax's own cluster
    detection (SLURM, Open MPI, TPU pod slices on GCE and GKE, Kubernetes): what
    `jax.distributed.initialize()` with no arguments would use; Nones where no cluster
    environment is found. jax has no public name for it, so it is called here only."""
    import inspect

    from jax._src import clusters
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    wanted = dict(coordinator_address=None, num_processes=None, process_id=None,
                  local_device_ids=None, cluster_detection_method=None,
                  initialization_timeout=None)
    accepted = inspect.signature(detect).parameters
    address, count, process_id, _ = detect(**{name: value for name, value in wanted.items()
                                              if name in accepted})
    return address, count, process_id
