"""The paged forward pass: the transformer over one flattened ragged batch and the KV cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import pallas_kernels
from models.batch import Batch
from models.sharding import HEADS, KV_PAGES
from models.transformer import Transformer
from pallas_kernels.compat import shard_map


def init_kv_caches(model: Transformer, num_pages: int, page_size: int, dtype=None,
                   sharding: NamedSharding | None = None) -> list[jax.Array]:
    """One [num_pages, page_size, 2 * num_kv_heads, head_dim] array per layer; with a
    sharding (KV_PAGES on a mesh), each device allocates only its kv heads."""
    c = model.config
    shape = (num_pages, page_size, 2 * c.num_kv_heads, c.head_dim)
    if sharding is None:
        return [jnp.zeros(shape, dtype or c.dtype) for _ in range(c.num_layers)]
    zeros = _sharded_zeros(shape, jnp.dtype(dtype or c.dtype), sharding)
    return [zeros() for _ in range(c.num_layers)]


@functools.cache
def _sharded_zeros(shape, dtype, sharding):
    # Cached, so re-creating a lost cache reuses the compiled program.
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


def forward_paged(model: Transformer, kv_caches: list[jax.Array], batch: Batch, *,
                  backend: str = "auto", interpret: bool = False, mesh: Mesh | None = None
                  ) -> tuple[list[jax.Array], Float[Array, "T hidden"]]:
    """Runs the model over one step's batch.

    Each layer writes its K/V rows into its pages (at batch.slot_mapping), then attends over
    them; the updated pages come back, one array per layer. With a mesh, the write and the
    attention run per device under shard_map, on the device's own heads and kv pages, with
    no communication: q, k, v and the pages split on their head axis, the batch replicated.

    Returns:
      (kv_caches after this step, final-norm hidden states [T, hidden]).
    """
    config = model.config
    scale = config.head_dim ** -0.5

    # cache: [num_pages, page_size, 2 * Hkv, D]; q: [T, Hq, D]; k, v: [T, Hkv, D]
    # (per device under a mesh: Hq / N query heads, Hkv / N kv heads)
    def write_and_attend(cache, q, k, v, batch):
        cache = pallas_kernels.write_kv_pages(cache, k, v, batch.slot_mapping, backend=backend,
                                              interpret=interpret)
        return cache, pallas_kernels.ragged_paged_attention(
            q, cache, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs,
            sm_scale=scale, sliding_window=config.sliding_window, backend=backend,
            interpret=interpret)

    if mesh is not None:
        write_and_attend = shard_map(write_and_attend, mesh=mesh,
                                     in_specs=(KV_PAGES, HEADS, HEADS, HEADS, P()),
                                     out_specs=(KV_PAGES, HEADS))

    def attend(cache, q, k, v):
        return write_and_attend(cache, q, k, v, batch)

    return model.hidden_states(batch.input_ids, batch.positions, attend, kv_caches)
