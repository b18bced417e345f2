"""The CPU's C++ kernels, called through the XLA FFI and built with the machine's C++ compiler
on first use: ragged paged attention (ragged_paged_attention.cc), the quantized matmul of a
decode's few rows (quantized_matmul.cc, used by models/quantization.py), an LM head from a
GGUF's Q8_0 blocks (its own or the tied embedding table's) for a decode's few rows
(table_matmul.cc, the same), and the f32 matmul of a step's real rows, its padding skipped
(dense_matmul.cc, used by models/transformer.py).

Pallas has no CPU target, and XLA compiles the plain-jnp reference to a gather of the K/V
pages and small dots that read them at a fifth of copy bandwidth on the CPU (docs/perf.md);
the attention kernel reads each page once, in place. Same contract and numerics (f32) as
pallas_kernels/reference.py, and the reference stays the yardstick in the tests.

The shared library (every kernel) is cached under $EMBER_CACHE_DIR (default ~/.cache/ember),
keyed by the sources, the compiler flags, jaxlib (whose FFI headers it is built against) and
the CPU's features (-march=native), and written atomically, so concurrent processes share one
build.
Where no compiler is found or the build fails, `available()` is False (the reason logged
once), backend "auto" stays on the reference and quantized weights on their XLA loop.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_cache import is_quantized

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("ragged_paged_attention.cc", "quantized_matmul.cc",
                             "dense_matmul.cc", "table_matmul.cc"))
HEADERS = tuple(Path(__file__).with_name(name)   # included by the sources
                for name in ("for_each_item.h", "layer_stack.h", "vec16.h"))
# FFI target name -> the handler's symbol in the library.
TARGETS = {"ember_ragged_paged_attention": "EmberRaggedPagedAttention",
           "ember_quantized_matmul": "EmberQuantizedMatmul",
           "ember_dense_matmul": "EmberDenseMatmul",
           "ember_table_matmul": "EmberTableMatmul"}
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300
_lock = threading.Lock()
_loaded: list[bool] = []     # [whether the kernel is registered], once tried


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(compiler: str) -> Path:
    import jaxlib
    key = hashlib.sha256("\0".join([
        *(source.read_text() for source in SOURCES + HEADERS), compiler, *FLAGS, jaxlib.__version__,
        platform.machine(), _cpu_features()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("EMBER_CACHE_DIR") or Path.home() / ".cache" / "ember")
    return cache / "cpu_kernels" / f"ember_cpu_kernels-{key}.so"


def _build(compiler: str, library: Path) -> None:
    """Compiles each source to an object file, all at once (the attention kernel alone takes
    about as long as the other three: on two cores the build takes half the time of one
    compiler call over every source), then links them."""
    library.parent.mkdir(parents=True, exist_ok=True)
    compile_flags = [flag for flag in FLAGS if flag != "-shared"]
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        commands = [[compiler, *compile_flags, f"-I{jax.ffi.include_dir()}", "-c", str(source),
                     "-o", str(Path(scratch) / f"{source.stem}.o")] for source in SOURCES]
        built = Path(scratch) / library.name
        commands.append([compiler, *FLAGS, *(command[-1] for command in commands), "-o",
                         str(built)])
        with tempfile.TemporaryFile("w+") as errors:   # the compilers' warnings and errors
            compiles = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
                        for command in commands[:-1]]
            try:
                failed = [command for command, process in zip(commands, compiles)
                          if process.wait(timeout=BUILD_TIMEOUT_S) != 0]
            finally:
                for process in compiles:
                    process.kill()   # no compiler outlives a timeout
            link = None if failed else subprocess.run(commands[-1], stdout=subprocess.DEVNULL,
                                                      stderr=errors, timeout=BUILD_TIMEOUT_S)
            if failed or link.returncode != 0:
                errors.seek(0)
                raise RuntimeError(f"{' '.join((failed or commands[-1:])[0])} failed:\n"
                                   f"{errors.read()[-2000:]}")
        os.replace(built, library)   # atomic: another process sees all of it or none


def available() -> bool:
    """Builds (once per machine and source) and registers the kernels; False where it cannot."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> bool:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler (g++, c++ or $CXX): attention on the CPU falls back "
                       "to the plain-jnp reference")
        return False
    library = _library_path(compiler)
    try:
        if not library.exists():
            _build(compiler, library)
        loaded = ctypes.cdll.LoadLibrary(str(library))
        handlers = {target: getattr(loaded, symbol) for target, symbol in TARGETS.items()}
    except (OSError, RuntimeError, subprocess.TimeoutExpired, AttributeError) as error:
        logger.warning("the CPU kernels could not be built or loaded (%s): attention on the "
                       "CPU falls back to the plain-jnp reference", error)
        return False
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def ragged_paged_attention_cpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale, sliding_window=None, soft_cap=None, kv_scales=None):
    """pallas_kernels.ragged_paged_attention's contract (arguments checked there), on the CPU.

    Raises:
      RuntimeError: the kernel is not available here (`available()`); backend "auto" never
        asks for it then.
    """
    if not available():
        raise RuntimeError("backend='cpu': the CPU attention kernel could not be built here "
                           "(see the log); use backend='reference'")
    if kv_scales is None or not is_quantized(kv_pages.dtype):
        kv_scales = jnp.zeros((1,), jnp.float32)   # the handler reads scales only for 8 bits
    call = jax.ffi.ffi_call("ember_ragged_paged_attention",
                            jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens, num_seqs,
                sm_scale=np.float32(sm_scale), sliding_window=np.int64(sliding_window or 0),
                soft_cap=np.float32(soft_cap or 0.0))


def quantized_matmul_cpu(x, weight, scale, minimum=None, layer=None):
    """f32[T, out] = x f32[T, in] @ the dequantized weight, for models/quantization.py's
    layouts (which checks the shapes): int8 `weight` i8[in, out] with scale f32|f16[in / group,
    out], or int4 `weight` packed u8[in / 2, out] with scale and minimum f32|f16[in / 32, out].
    Stacked over layers (each array with a leading [L] axis), `layer` (i32[]) picks one: the
    kernel reads it in place. Only where `available()`."""
    if minimum is None:
        minimum = jnp.zeros((1, 1), jnp.float32)   # read only for int4
    call = jax.ffi.ffi_call("ember_quantized_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], weight.shape[-1]), jnp.float32))
    return call(x, weight, scale, minimum, _layer_operand(layer))


def dense_matmul_cpu(x, weight, num_rows, layer=None):
    """f32[T, out] = x f32[T, in] @ weight f32[in, out] for rows < num_rows i32[1] (clipped to
    [0, T]); the rows after it are zeros, never computed. A stacked weight [L, in, out] and
    `layer` (i32[]) take that layer in place. Only where `available()`."""
    call = jax.ffi.ffi_call("ember_dense_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], weight.shape[-1]), jnp.float32))
    return call(x, weight, num_rows, _layer_operand(layer))


def table_matmul_cpu(x, q, scale):
    """f32[T, out] = x f32[T, in] @ the dequantized table's transpose, for a table held one
    output per row: q i8[out, in], scale f32|f16[out, in / 32] (a GGUF Q8_0 embedding
    table's own order; models/quantization.py checks the shapes). Only where `available()`."""
    call = jax.ffi.ffi_call("ember_table_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32))
    return call(x, q, scale)


def _layer_operand(layer) -> jax.Array:
    """i32[1]: the layer of a stacked weight the kernel takes (0 for one matrix)."""
    return jnp.zeros((1,), jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(
        jnp.int32)
