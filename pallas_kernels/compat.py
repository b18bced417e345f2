"""The one place that knows which Pallas (and jax) names each jax version has (jax 0.10.2 to
0.12).

Kernel files, and models/paged.py for shard_map, import these shims instead of probing jax
themselves.
"""

from __future__ import annotations

import contextlib
import functools

import jax
from jax.experimental import pallas as pl


def triton_compiler_params(*, num_warps: int, num_stages: int):
    """Compiler params that select the Triton lowering for a GPU pallas_call."""
    params_class = _triton_params_class()
    if params_class is None:
        raise ImportError(f"jax {jax.__version__} has no Pallas Triton lowering")
    return params_class(num_warps=num_warps, num_stages=num_stages)


def _triton_params_class():
    """The Pallas Triton compiler-params class, None where this jax has none (the lowering is
    deprecated since jax 0.11, to be removed). jax >= 0.7 calls it
    `pallas.triton.CompilerParams`; older releases `TritonCompilerParams` (in
    `pallas.triton` or `pallas` itself)."""
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:
        return None
    return (getattr(plgpu, "CompilerParams", None)
            or getattr(plgpu, "TritonCompilerParams", None)
            or getattr(pl, "TritonCompilerParams", None))


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


def cuda_lowering_target(device_kind: str = "NVIDIA H200"):
    """A context in which GPU kernels lower for `device_kind` without a GPU (tests, export).

    jax 0.11.2 and 0.12 read the compute capability for the Triton lowering from the device,
    or from the abstract mesh's device on a machine without one (and fail without either);
    jax 0.10.2 needs neither and ignores it. On a GPU, the GPU itself is the target.
    """
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    try:
        return use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device))
    except TypeError:  # an AbstractMesh without abstract_device
        return contextlib.nullcontext()


@functools.cache
def has_pallas_triton() -> bool:
    """True where this jax still has the Pallas Triton lowering (`pallas.triton` and its
    compiler params)."""
    return _triton_params_class() is not None


@functools.cache
def has_mosaic_gpu() -> bool:
    """True where this jax has the Pallas Mosaic GPU backend with `plgpu.kernel`."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:
        return False
    return hasattr(plgpu, "kernel") and hasattr(plgpu, "wgmma")


def mosaic_gpu_interpret_params():
    """The `interpret=` value that runs a Mosaic GPU kernel on a CPU.

    `plgpu.InterpretGPUParams` from jax 0.11 on; jax 0.10.2 has the class but does not
    export it.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    params_class = getattr(plgpu, "InterpretGPUParams", None)
    if params_class is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params_class = InterpretGPUParams
    return params_class()


def mosaic_gpu_interprets_wgmma() -> bool:
    """Whether GPU interpret mode runs wgmma on a transposed shared-memory operand.

    jax 0.11.2 and 0.12 do (checked); jax 0.10.2's interpreter has no rule for the transpose
    (nor for layout_cast). Told apart by `plgpu.InterpretGPUParams`, which only the newer
    ones export.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return hasattr(plgpu, "InterpretGPUParams")


def mosaic_gpu_layout_cast(x, layout_name: str, *, interpret: bool):
    """x in the Mosaic GPU register layout `plgpu.Layout.<layout_name>` ("WGMMA",
    "WGMMA_ROW": its reduction over columns); x itself in interpret mode, where layouts
    mean nothing and jax 0.10.2's GPU interpreter has no rule for layout_cast."""
    if interpret:
        return x
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if layout_name == "WGMMA_ROW":
        return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))
    return plgpu.layout_cast(x, getattr(plgpu.Layout, layout_name))


def cuda_compute_capability() -> float | None:
    """The first device's CUDA compute capability (9.0 on Hopper), None off NVIDIA GPUs."""
    try:
        return float(jax.devices()[0].compute_capability)
    except (RuntimeError, IndexError, AttributeError, TypeError, ValueError):
        return None


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
