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
    """Runs the model over one step's batch.

    Each layer writes its K/V rows into its pages (at batch.slot_mapping), then attends over
    them; the updated pages come back, one array per layer.

    Returns:
      (kv_caches after this step, final-norm hidden states [T, hidden]).
    """
    config = model.config
    scale = config.head_dim ** -0.5

    # cache: [num_pages, page_size, 2 * Hkv, D]; q: [T, Hq, D]; k, v: [T, Hkv, D]
    def attend(cache, q, k, v):
        cache = pallas_kernels.write_kv_pages(cache, k, v, batch.slot_mapping, backend=backend,
                                              interpret=interpret)
        return cache, pallas_kernels.ragged_paged_attention(
            q, cache, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs,
            sm_scale=scale, sliding_window=config.sliding_window, backend=backend,
            interpret=interpret)

    return model.hidden_states(batch.input_ids, batch.positions, attend, kv_caches)
