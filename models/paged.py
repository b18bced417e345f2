"""The paged forward pass: the transformer over one flattened ragged batch and the KV cache.

The cache of every layer is one array, `kv_cache [L, num_pages, page_size, 2 * Hkv, D]`
(kv head h: its K at index 2h, its V at 2h + 1). It is carried through the layers, scanned or
unrolled, and each layer writes and reads its own pages in place. The kernels take
`[num_pages, page_size, 2 * Hkv, D]` pages and page numbers, so a layer hands them the cache
viewed as the pages of every layer end to end, `[L * num_pages, ...]` (a reshape of leading
axes: no copy), with its page numbers and slots moved past the pages of the layers before it.
A layer never slices its pages out, which would copy them every step.

An 8-bit (int8, fp8) cache is the pair `(kv_pages, kv_scales f32[L, num_pages, page_size, 2 * Hkv])`
(pallas_kernels/kv_cache.py: one scale per token per K or V head), carried, reshaped, donated
and sharded (on the kv-head axis) the same way; a float cache (the model's dtype, bf16,
fp8) is the pages array alone.
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
from models.layer_slice import ProductHints
from models.sharding import HEADS, KV_PAGES, KV_SCALES, zeros
from models.transformer import LayerCache, Rotation, Transformer
from pallas_kernels.compat import shard_map
from pallas_kernels.kv_cache import SCALE_DTYPE


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


# The KV cache: the pages, or for an 8-bit cache (pages, scales); see the module docstring.
KVCache = jax.Array | tuple[jax.Array, jax.Array]


def init_kv_cache(model: Transformer, num_pages: int, page_size: int, dtype=None,
                  sharding: jax.sharding.Sharding | None = None) -> KVCache:
    """Zeros [L, num_pages, page_size, 2 * Hkv, D] in `dtype` (None: the model's), with
    zero scales [L, num_pages, page_size, 2 * Hkv] beside int8 pages; with a sharding
    (KV_PAGES on a mesh), each device allocates only its kv heads."""
    shape = kv_cache_shape(model.config, num_pages, page_size)
    dtype = jnp.dtype(dtype or model.config.dtype)
    pages = zeros(shape, dtype, sharding)
    if not pallas_kernels.is_quantized(dtype):
        return pages
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, KV_SCALES)
    return pages, zeros(shape[:4], SCALE_DTYPE, sharding)


def kv_cache_spec(kv_cache_dtype) -> P | tuple[P, P]:
    """The cache's PartitionSpec pytree on a mesh, for a cache of pages in `kv_cache_dtype`."""
    return (KV_PAGES, KV_SCALES) if pallas_kernels.is_quantized(kv_cache_dtype) else KV_PAGES


def forward_paged(model: Transformer, kv_cache: KVCache, batch: Batch, rotary_table: Rotation,
                  *, backend: str = "auto", interpret: bool = False, mesh: Mesh | None = None
                  ) -> tuple[KVCache, Float[Array, "T hidden"]]:
    """Runs the model over one step's batch.

    Each layer writes its K/V rows into its pages (at batch.slot_mapping), then attends over
    them. With a mesh, the write and the attention run per device under shard_map, on the
    device's own heads and kv pages, with no communication: q, k, v and the cache split on
    their head axis, the batch replicated.

    Args:
      kv_cache: [L, num_pages, page_size, 2 * Hkv, D], or for 8-bit pages the pair (pages,
        scales f32[L, num_pages, page_size, 2 * Hkv]) (donate it: updated in place).
      rotary_table: models.transformer.rotary_table(model.config, n) for n >= the page
        table's positions (the engine makes it once).
    Returns:
      (kv_cache after this step, final-norm hidden states [T, hidden]).
    """
    config = model.config
    scale = config.head_dim ** -0.5

    # kv_cache: [L, num_pages, page_size, 2 * Hkv, D] (or that and scales [L, num_pages,
    # page_size, 2 * Hkv]); layer: i32[]; q: [T, Hq, D]; k, v: [T, Hkv, D] (per device under
    # a mesh: Hq / N query heads, Hkv / N kv heads)
    def write_and_attend(kv_cache, layer, q, k, v, batch):
        kv_pages, kv_scales = kv_cache if isinstance(kv_cache, tuple) else (kv_cache, None)
        num_layers, num_pages, page_size = kv_pages.shape[:3]
        every_layer = lambda a: a.reshape(num_layers * num_pages, *a.shape[2:])
        pages = every_layer(kv_pages)
        scales = None if kv_scales is None else every_layer(kv_scales)
        first_page = layer * num_pages       # this layer's page 0 among every layer's pages
        slots = batch.slot_mapping + first_page * page_size
        if k.shape[0] == 1 and pallas_kernels.resolve_backend(backend) in ("reference", "cpu"):
            # XLA turns a one-row scatter into a dynamic-update-slice, and copies the whole
            # cache around it when the cache is read afterwards (on the CPU: a step of token
            # rung 1 grew with num_pages). A second row, into the padding page, keeps it a
            # scatter, updated in place.
            k, v = (jnp.concatenate([x, jnp.zeros_like(x)]) for x in (k, v))
            slots = jnp.concatenate([slots, first_page[None] * page_size])
        written = pallas_kernels.write_kv_pages(pages, k, v, slots, kv_scales=scales,
                                                backend=backend, interpret=interpret)
        pages, scales = (written, None) if scales is None else written
        out = pallas_kernels.ragged_paged_attention(
            q, pages, batch.kv_lens, batch.page_indices + first_page, batch.cu_q_lens,
            batch.num_seqs, sm_scale=scale, sliding_window=config.sliding_window,
            kv_scales=scales, backend=backend, interpret=interpret)
        if scales is None:
            return pages.reshape(kv_pages.shape), out
        return (pages.reshape(kv_pages.shape), scales.reshape(kv_scales.shape)), out

    if mesh is not None:
        cache_spec = kv_cache_spec(jax.tree.leaves(kv_cache)[0].dtype)
        write_and_attend = shard_map(write_and_attend, mesh=mesh,
                                     in_specs=(cache_spec, P(), HEADS, HEADS, HEADS, P()),
                                     out_specs=(cache_spec, HEADS))

    def attend(cache: LayerCache, q, k, v):
        layer = jnp.asarray(cache.layer, jnp.int32)
        kv_cache, out = write_and_attend(cache.kv, layer, q, k, v, batch)
        return LayerCache(kv_cache, cache.layer), out

    # On the CPU kernels, one device: the step's real rows, so that f32 products skip the
    # token rung's padding (models/transformer.py).
    # One GPU on its kernels: a scanned layer's small products read its weights in place.
    resolved = pallas_kernels.resolve_backend(backend)
    hints = ProductHints(
        num_rows=(batch.cu_q_lens[batch.num_seqs[0]][None]              # i32[1]
                  if mesh is None and resolved == "cpu" else None),
        gpu_layer_matmul=mesh is None and resolved == "gpu" and not interpret)
    return model.hidden_states(batch.input_ids, batch.positions, attend, kv_cache, hints,
                               rotary_table)
