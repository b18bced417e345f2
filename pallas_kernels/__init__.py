"""Ember's kernels behind one contract (DESIGN.md), dispatched by backend.

backend: "auto" (by jax.default_backend()), "reference" (plain jnp, the CPU default),
"gpu" (Pallas Triton), "tpu" (Pallas Mosaic). interpret=True runs a Pallas kernel in
interpret mode, so the GPU and TPU kernels can be checked on a CPU.
"""

from pallas_kernels.reference import (ragged_paged_attention_reference,
                                      write_kv_pages_reference)

BACKENDS = ("auto", "reference", "gpu", "tpu")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    import jax
    platform = jax.default_backend()
    return {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform, "reference")


def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                           sliding_window=None, soft_cap=None, backend="auto", interpret=False):
    backend = resolve_backend(backend)
    return ragged_paged_attention_reference(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                            num_seqs, sm_scale=sm_scale,
                                            sliding_window=sliding_window, soft_cap=soft_cap)


def write_kv_pages(kv_pages, k, v, slot_mapping, *, backend="auto", interpret=False):
    return write_kv_pages_reference(kv_pages, k, v, slot_mapping)
