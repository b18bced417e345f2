"""Persistent XLA compilation cache and a count of compilations (the zero-after-warm-up rule)."""

from __future__ import annotations

import threading
from pathlib import Path

import jax

# jax emits this once per lowering of a new (function, shape) pair, whether the executable
# then comes from the persistent cache or from the compiler: exactly a "compilation".
_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lock = threading.Lock()
_count = 0
_registered = False


def _on_event(event: str, duration: float, **_) -> None:
    global _count
    if event == _LOWERING_EVENT:
        with _lock:
            _count += 1


def compilations() -> int:
    """Lowerings (new compiled shapes) in this process so far."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _registered = True
        return _count


def enable_persistent_cache(directory: str) -> None:
    """Caches every compiled executable on disk, so a restart skips the compiler."""
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
