"""In-kernel pieces shared by the Mosaic GPU decode and prefill attention kernels (Hopper and
newer: TMA and wgmma).

Both kernels walk one sequence's pages for one kv head in tiles of BLOCK_KV tokens, K and V
brought in by TMA, one copy per page (or per BLOCK_KV rows of a larger page), `num_slots`
tiles in flight; BLOCK_M query rows are the M side of two wgmmas (scores = q @ k^T,
acc += p @ v). Copies read whole page rows, so the rows of a tile's last page past the
context are read too: their scores are masked, and their V rows are zeroed in shared memory
before p @ v (0 * NaN would be NaN). The kernels differ only in which keys a row may see
(`attend_tiles`'s `visible`) and in what they write.

Both decline (`mosaic_supported` is False, and the Triton kernel runs) what they do not
cover: f32, fp8 and int8 caches, q and cache dtypes that differ, head_dim other than 64 or
128, page sizes not a power of 2 >= 8, more than 64 query heads per kv head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import mosaic_gpu_interprets_wgmma, mosaic_gpu_layout_cast
from pallas_kernels.gpu.attention_tiles import LOG2E, MASK_VALUE

BLOCK_M = 64    # a wgmma's M: query rows (heads of one kv head, times rows for prefill)
BLOCK_KV = 64   # tokens per tile: the N of q @ k^T, the K of p @ v
HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, slots=True)
class MosaicBlockSizes:
    """num_slots: K/V tiles in flight per program (shared memory: 2 * num_slots * 64 * D *
    2 bytes, plus q, the softmax weights, and the decode kernel's f32 output staging)."""
    num_slots: int = 4

    def __post_init__(self):
        if self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots}: expected >= 1")


def mosaic_supported(q_dtype, kv_dtype, num_q_heads, num_kv_heads, head_dim, page_size,
                     quantized) -> bool:
    """Whether the Mosaic GPU kernels cover the batch's shapes and dtypes (else Triton)."""
    return (not quantized and jnp.dtype(q_dtype) in DTYPES
            and jnp.dtype(kv_dtype) == jnp.dtype(q_dtype) and head_dim in HEAD_DIMS
            and page_size >= 8 and page_size & (page_size - 1) == 0
            and num_q_heads // num_kv_heads <= BLOCK_M)


def _product(lhs_smem, rhs_smem, *, transpose_rhs, emulate):
    """lhs @ rhs (or rhs^T) of shared-memory operands by wgmma into a fresh f32 accumulator:
    f32[M, N] in the wgmma layout. emulate=True: a plain dot of the loaded operands.

    A fresh accumulator, not `pl.run_state(plgpu.ACC.init(acc))` into the running one: GPU
    interpret mode does not run run_state; the extra add costs registers, not memory traffic.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if emulate:
        contract = 1 if transpose_rhs else 0
        return jax.lax.dot_general(lhs_smem[...], rhs_smem[...], (((1,), (contract,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    rhs = rhs_smem.transpose((1, 0)) if transpose_rhs else rhs_smem
    shape = (lhs_smem.shape[0], rhs.shape[1])

    def product(acc_ref):
        plgpu.wgmma(acc_ref, lhs_smem, rhs)
        return acc_ref[...]
    return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def _scores(q_smem, k_smem, *, sm_scale, soft_cap, emulate):
    """q @ k^T of one tile in log2 units: f32[BLOCK_M, BLOCK_KV] in the wgmma layout."""
    scores = _product(q_smem, k_smem, transpose_rhs=True, emulate=emulate)
    if soft_cap is None:
        return scores * (sm_scale * LOG2E)
    return jnp.tanh(scores * (sm_scale / soft_cap)) * (soft_cap * LOG2E)


def fetch_kv_tile(kv_pages_ref, page_indices_ref, k_tile, v_tile, barrier, seq, kv_head,
                  first_token):
    """Starts the TMA copies of K and V of tokens first_token .. + BLOCK_KV into k_tile and
    v_tile [BLOCK_KV, D]: one copy per page (per BLOCK_KV rows of a larger page), each
    arriving once on `barrier`. Pages past the context are copied too (a page-table entry
    past the table's end reads its last one); their rows are masked or zeroed."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    page_size, max_pages = kv_pages_ref.shape[1], page_indices_ref.shape[1]
    rows_per_copy = min(page_size, BLOCK_KV)
    for part in range(BLOCK_KV // rows_per_copy):
        token = first_token + part * rows_per_copy
        page = page_indices_ref[seq, jnp.minimum(token // page_size, max_pages - 1)]
        rows = pl.ds(token % page_size, rows_per_copy)
        tile_rows = pl.ds(part * rows_per_copy, rows_per_copy)
        plgpu.copy_gmem_to_smem(kv_pages_ref.at[page, rows, 2 * kv_head], k_tile.at[tile_rows],
                                barrier)
        plgpu.copy_gmem_to_smem(kv_pages_ref.at[page, rows, 2 * kv_head + 1],
                                v_tile.at[tile_rows], barrier)


def _zero_rows_from(v_tile, first_row, in_layout):
    """Zeroes rows first_row.. of v_tile [BLOCK_KV, D] in shared memory."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    rows = in_layout(jax.lax.broadcasted_iota(jnp.int32, v_tile.shape, 0), "WGMMA")
    v_tile[...] = jnp.where(rows < first_row, v_tile[...], 0).astype(v_tile.dtype)
    plgpu.commit_smem()  # generic-proxy stores, then wgmma reads them


def _softmax_step(m_prev, l_prev, scores, visible):
    """Online softmax over one tile: scores f32[BLOCK_M, BLOCK_KV] (log2 units), visible bool
    of that shape; m_prev, l_prev f32[BLOCK_M]. Returns m, l, the factor that rescales the
    accumulator, and the tile's weights (zero where not visible)."""
    scores = jnp.where(visible, scores, MASK_VALUE)
    m_next = jnp.maximum(m_prev, scores.max(axis=1))
    rescale = jnp.exp2(m_prev - m_next)
    weights = jnp.exp2(scores - jax.lax.broadcast_in_dim(m_next, scores.shape, [0]))
    weights = jnp.where(visible, weights, 0.0)
    return m_next, l_prev * rescale + weights.sum(axis=1), rescale, weights


@dataclasses.dataclass(frozen=True)
class TileBuffers:
    """A program's shared memory and barriers (from `scratch_types`)."""
    q: object            # [BLOCK_M, D]
    k: object            # [num_slots, BLOCK_KV, D]
    v: object            # [num_slots, BLOCK_KV, D]
    p: object            # [BLOCK_M, BLOCK_KV] softmax weights of a tile
    q_barrier: object
    kv_barriers: object  # num_slots barriers


def scratch_types(head_dim, page_size, dtype, num_slots, *extra):
    """The shared memory and barriers of TileBuffers, in the order q, k, v, p, *extra (more
    plgpu.SMEM entries: a kernel's own), q_barrier, kv_barriers. q, k, v and p are tiled and
    swizzled for wgmma (and for TMA copies out of q, as jax's own Hopper attention does)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    swizzle = 128
    transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    kv_tiles = plgpu.SMEM((num_slots, BLOCK_KV, head_dim), dtype, transforms=transforms)
    return (plgpu.SMEM((BLOCK_M, head_dim), dtype, transforms=transforms), kv_tiles, kv_tiles,
            plgpu.SMEM((BLOCK_M, BLOCK_KV), dtype, transforms=transforms), *extra,
            plgpu.Barrier(num_barriers=1),
            # Each copy arrives once: K and V of every page of a tile.
            plgpu.Barrier(num_arrivals=2 * (BLOCK_KV // min(page_size, BLOCK_KV)),
                          num_barriers=num_slots))


def attend_tiles(buffers: TileBuffers, fetch, q_source, *, lo, hi, num_tiles, visible,
                 num_slots, sm_scale, soft_cap, interpret):
    """The online softmax of the program's BLOCK_M query rows over num_tiles K/V tiles from
    token lo on (tokens at or past hi are read but never seen).

    fetch(tile, slot) starts tile's copies into slot; q_source [BLOCK_M, D] in global memory
    is copied to buffers.q; visible(tokens) -> bool[BLOCK_M, BLOCK_KV] for the tile's token
    numbers i32[BLOCK_M, BLOCK_KV] (wgmma layout), before the `< hi` mask is added.
    Returns row max, row sum (f32[BLOCK_M], log2 units) and the unnormalised accumulator
    f32[BLOCK_M, D], all in the wgmma layout.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    in_layout = functools.partial(mosaic_gpu_layout_cast, interpret=interpret)
    # Plain dots where a GPU interpret mode cannot run the wgmma.
    emulate = interpret and not mosaic_gpu_interprets_wgmma()
    plgpu.copy_gmem_to_smem(q_source, buffers.q, buffers.q_barrier)
    for slot in range(num_slots):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
    plgpu.barrier_wait(buffers.q_barrier)

    def body(tile, carry):
        slot, first = jax.lax.rem(tile, num_slots), lo + tile * BLOCK_KV
        plgpu.barrier_wait(buffers.kv_barriers.at[slot])
        # The tile's rows past hi may hold anything (NaN), and 0 * NaN is NaN in p @ v.
        pl.when(first + BLOCK_KV > hi)(
            lambda: _zero_rows_from(buffers.v.at[slot], hi - first, in_layout))
        scores = _scores(buffers.q, buffers.k.at[slot], sm_scale=sm_scale, soft_cap=soft_cap,
                         emulate=emulate)
        tokens = first + in_layout(jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1),
                                   "WGMMA")
        m_next, l_next, rescale, weights = _softmax_step(
            *carry[:2], scores, visible(tokens) & (tokens < hi))
        # p goes through shared memory, not registers: GPU interpret mode runs wgmma only on
        # shared-memory operands, and 8 KiB a tile costs little here.
        buffers.p[...] = weights.astype(buffers.p.dtype)
        plgpu.commit_smem()
        values = _product(buffers.p, buffers.v.at[slot], transpose_rhs=False, emulate=emulate)
        acc = carry[2] * jax.lax.broadcast_in_dim(rescale, carry[2].shape, [0]) + values
        pl.when(tile + num_slots < num_tiles)(functools.partial(fetch, tile + num_slots, slot))
        return m_next, l_next, acc

    carry = (in_layout(jnp.full((BLOCK_M,), MASK_VALUE, jnp.float32), "WGMMA_ROW"),
             in_layout(jnp.zeros((BLOCK_M,), jnp.float32), "WGMMA_ROW"),
             in_layout(jnp.zeros(buffers.q.shape, jnp.float32), "WGMMA"))
    return jax.lax.fori_loop(0, num_tiles, body, carry)


def row_iota(interpret):
    """i32[BLOCK_M, BLOCK_KV] of row numbers in the wgmma layout."""
    return mosaic_gpu_layout_cast(jax.lax.broadcasted_iota(jnp.int32, (BLOCK_M, BLOCK_KV), 0),
                                  "WGMMA", interpret=interpret)
