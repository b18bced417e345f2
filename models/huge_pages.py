"""A CPU's weights in transparent huge pages.

A decode step of a few sequences reads every weight once, so on a CPU it runs at the speed
the memory streams them. XLA's allocator hands out 4 KiB pages, and a stream over them misses
the TLB every 4 KiB: two threads summing 76 MB read 26-33 GB/s on this project's 2-core VM,
34-40 GB/s from the same bytes in 2 MiB pages (docs/perf.md). So `load_model` moves a
single-device CPU model's weights into one anonymous mapping advised MADV_HUGEPAGE, which jax
adopts slice by slice without a copy (a CPU client takes a 64-byte aligned host buffer as it
is; the array keeps the buffer, and so the mapping, alive).

Where the kernel has no transparent huge pages (not Linux, or `enabled` is `never`), or a jax
would copy the buffer instead of adopting it, the weights stay where they are. A donated
buffer is never adopted (jax copies it), so the KV cache, donated every step, stays in XLA's
buffer, whose address a donating step keeps (its output aliases it): `collapse_into_huge_pages`
asks the kernel to move that buffer's whole 2 MiB pages into huge pages in place (madvise
MADV_HUGEPAGE, then MADV_COLLAPSE, Linux 6.1+), without a copy on jax's side.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import jax
import numpy as np
from flax import nnx

HUGE_PAGE_BYTES = 2 << 20
ALIGN_BYTES = 64   # the alignment at which a CPU client adopts a host buffer
MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)   # Linux 6.1+; Python 3.11's mmap lacks it
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """True where madvise(MADV_HUGEPAGE) can give a mapping huge pages: a Linux kernel whose
    transparent huge pages are `always` or `madvise` (the bracketed word of THP_ENABLED)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_ENABLED.read_text()
    except OSError:
        return False


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """u8[nbytes] in a fresh private anonymous mapping advised MADV_HUGEPAGE, starting on a
    huge page (pages are given as they are first written, so writing it fills it with huge
    pages where the kernel has them free)."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES,
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -_address(np.frombuffer(mapping, np.uint8, count=1)) % HUGE_PAGE_BYTES
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, np.uint8, count=nbytes, offset=start)


def move_weights_to_huge_pages(model: nnx.Module) -> bool:
    """Copies every array of `model` that lives on one CPU device into one huge-page buffer
    and has jax adopt its slice in place of the array (committed arrays stay committed to
    their device). Returns False, changing nothing, where huge pages are unavailable, the
    model is not on one CPU device, or this jax would not adopt the buffer."""
    variables = [variable for _, variable in nnx.iter_graph(model)
                 if isinstance(variable, nnx.Variable) and _on_one_cpu(variable.get_value())]
    if not variables or not huge_pages_available() or not _adopts_host_buffers():
        return False
    offsets, total = [], 0
    for variable in variables:
        offsets.append(total)
        total += -(-variable.get_value().nbytes // ALIGN_BYTES) * ALIGN_BYTES
    buffer = huge_page_buffer(total)
    for variable, offset in zip(variables, offsets):
        array = variable.get_value()
        host = buffer[offset:offset + array.nbytes].view(array.dtype).reshape(array.shape)
        host[...] = np.asarray(array)
        # One weight at a time: its XLA buffer is freed as its variable lets it go.
        variable.set_value(jax.device_put(host, array.sharding) if array.committed
                           else jax.device_put(host))
    _return_freed_memory()
    return True


def collapse_into_huge_pages(tree) -> int:
    """Best effort: for every array of `tree` on one CPU device, asks the kernel to back the
    whole 2 MiB pages inside its buffer with huge pages (MADV_HUGEPAGE, so pages written later
    come as huge pages, then MADV_COLLAPSE, which moves the present ones now; the contents
    stay). Returns the bytes asked for (0 where huge pages are unavailable or no array spans a
    whole huge page); a kernel without MADV_COLLAPSE leaves the present pages to khugepaged."""
    if not huge_pages_available():
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    asked = 0
    for array in jax.tree.leaves(tree):
        if not _on_one_cpu(array):
            continue
        array.block_until_ready()
        start = array.unsafe_buffer_pointer()
        first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        end = (start + array.nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if end <= first:
            continue
        madvise(first, end - first, mmap.MADV_HUGEPAGE)
        madvise(first, end - first, MADV_COLLAPSE)
        asked += end - first
    return asked


def _return_freed_memory() -> None:
    """Hands the heap's free memory back to the kernel (glibc's malloc_trim): the weights'
    old XLA buffers of a few MB each came from the heap, which otherwise keeps them for
    reuse; a model of 110 MB kept 90 MB of them (docs/perf.md)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _on_one_cpu(value) -> bool:
    return (isinstance(value, jax.Array) and len(value.devices()) == 1
            and next(iter(value.devices())).platform == "cpu")


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _adopts_host_buffers() -> bool:
    """Whether this jax's CPU client adopts an aligned host buffer (checked once per call on
    a small one: jax 0.10.2 to 0.12 do)."""
    host = huge_page_buffer(ALIGN_BYTES).view(np.float32)
    return jax.device_put(host).unsafe_buffer_pointer() == _address(host)
