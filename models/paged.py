"""The paged forward pass: the transformer over one flattened ragged batch and the KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import pallas_kernels
from models.batch import Batch
from models.transformer import Transformer


def init_kv_caches(model: Transformer, num_pages: int, page_size: int, dtype=None
                   ) -> list[jax.Array]:
    """One [num_pages, page_size, 2 * num_kv_heads, head_dim] array per layer."""
    c = model.config
    shape = (num_pages, page_size, 2 * c.num_kv_heads, c.head_dim)
    return [jnp.zeros(shape, dtype or c.dtype) for _ in range(c.num_layers)]


def forward_paged(model: Transformer, kv_caches: list[jax.Array], batch: Batch, *,
                  backend: str = "auto", interpret: bool = False
                  ) -> tuple[list[jax.Array], Float[Array, "T hidden"]]:
    """Writes the step's K/V into the cache and returns (new caches, hidden states [T, H])."""
    config = model.config
    caches = list(kv_caches)
    scale = config.head_dim ** -0.5

    def attend(layer_index, q, k, v):  # q: [T, Hq, D]; k, v: [T, Hkv, D]
        cache = pallas_kernels.write_kv_pages(caches[layer_index], k, v, batch.slot_mapping,
                                              backend=backend, interpret=interpret)
        caches[layer_index] = cache
        return pallas_kernels.ragged_paged_attention(
            q, cache, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs,
            sm_scale=scale, sliding_window=config.sliding_window, backend=backend,
            interpret=interpret)

    hidden = model.hidden_states(batch.input_ids, batch.positions, attend)
    return caches, hidden
