"""The paged forward pass: the transformer over one flattened ragged batch and the KV cache.

The cache of every layer is one array, `kv_cache [L, num_pages, page_size, 2 * Hkv, D]`
(kv head h: its K at index 2h, its V at 2h + 1). It is carried through the layers, scanned or
unrolled, and each layer writes and reads its own pages in place. The kernels take
`[num_pages, page_size, 2 * Hkv, D]` pages and page numbers, so a layer hands them the cache
viewed as the pages of every layer end to end, `[L * num_pages, ...]` (a reshape of leading
axes: no copy), with its page numbers and slots moved past the pages of the layers before it.
A layer never slices its pages out, which would copy them every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

import pallas_kernels
from models.batch import Batch
from models.config import ModelConfig
from models.sharding import HEADS, KV_PAGES, zeros
from models.transformer import LayerCache, Transformer
from pallas_kernels.compat import shard_map


def kv_cache_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    """[L, num_pages, page_size, 2 * Hkv, D] (config: the model as built; on a mesh, its
    layout).

    Raises:
      ValueError when the slots of every layer (L * num_pages * page_size) overflow the
      int32 slot numbers the kernels take.
    """
    c = config
    if c.num_layers * num_pages * page_size >= 2 ** 31:
        raise ValueError(f"num_pages={num_pages}: {c.num_layers} layers x {num_pages} pages x "
                         f"{page_size} tokens overflow int32 slot numbers; expected fewer pages")
    return (c.num_layers, num_pages, page_size, 2 * c.num_kv_heads, c.head_dim)


def init_kv_cache(model: Transformer, num_pages: int, page_size: int, dtype=None,
                  sharding: NamedSharding | None = None) -> jax.Array:
    """Zeros [L, num_pages, page_size, 2 * Hkv, D]; with a sharding (KV_PAGES on a mesh),
    each device allocates only its kv heads."""
    shape = kv_cache_shape(model.config, num_pages, page_size)
    return zeros(shape, dtype or model.config.dtype, sharding)


def forward_paged(model: Transformer, kv_cache: jax.Array, batch: Batch, *,
                  backend: str = "auto", interpret: bool = False, mesh: Mesh | None = None
                  ) -> tuple[jax.Array, Float[Array, "T hidden"]]:
    """Runs the model over one step's batch.

    Each layer writes its K/V rows into its pages (at batch.slot_mapping), then attends over
    them. With a mesh, the write and the attention run per device under shard_map, on the
    device's own heads and kv pages, with no communication: q, k, v and the cache split on
    their head axis, the batch replicated.

    Args:
      kv_cache: [L, num_pages, page_size, 2 * Hkv, D] (donate it: it is updated in place).
    Returns:
      (kv_cache after this step, final-norm hidden states [T, hidden]).
    """
    config = model.config
    scale = config.head_dim ** -0.5

    # kv_cache: [L, num_pages, page_size, 2 * Hkv, D]; layer: i32[]; q: [T, Hq, D];
    # k, v: [T, Hkv, D] (per device under a mesh: Hq / N query heads, Hkv / N kv heads)
    def write_and_attend(kv_cache, layer, q, k, v, batch):
        num_layers, num_pages, page_size = kv_cache.shape[:3]
        pages = kv_cache.reshape(num_layers * num_pages, *kv_cache.shape[2:])
        first_page = layer * num_pages       # this layer's page 0 among every layer's pages
        slots = batch.slot_mapping + first_page * page_size
        if k.shape[0] == 1 and pallas_kernels.resolve_backend(backend) == "reference":
            # XLA turns a one-row scatter into a dynamic-update-slice, and copies the whole
            # cache around it when the cache is read afterwards (on the CPU: a step of token
            # rung 1 grew with num_pages). A second row, into the padding page, keeps it a
            # scatter, updated in place.
            k, v = (jnp.concatenate([x, jnp.zeros_like(x)]) for x in (k, v))
            slots = jnp.concatenate([slots, first_page[None] * page_size])
        pages = pallas_kernels.write_kv_pages(pages, k, v, slots, backend=backend,
                                              interpret=interpret)
        out = pallas_kernels.ragged_paged_attention(
            q, pages, batch.kv_lens, batch.page_indices + first_page, batch.cu_q_lens,
            batch.num_seqs, sm_scale=scale, sliding_window=config.sliding_window,
            backend=backend, interpret=interpret)
        return pages.reshape(kv_cache.shape), out

    if mesh is not None:
        write_and_attend = shard_map(write_and_attend, mesh=mesh,
                                     in_specs=(KV_PAGES, P(), HEADS, HEADS, HEADS, P()),
                                     out_specs=(KV_PAGES, HEADS))

    def attend(cache: LayerCache, q, k, v):
        layer = jnp.asarray(cache.layer, jnp.int32)
        kv_cache, out = write_and_attend(cache.kv, layer, q, k, v, batch)
        return LayerCache(kv_cache, cache.layer), out

    return model.hidden_states(batch.input_ids, batch.positions, attend, kv_cache)
