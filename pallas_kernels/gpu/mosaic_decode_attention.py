"""Split-K paged decode attention on Mosaic GPU (Hopper and newer: TMA and wgmma).

The same work split and partials as the Triton decode kernel (decode_attention.py): each
program (CUDA block, one warpgroup) takes one sequence, one kv head and one split of the
context, and writes an unnormalised (acc, max, sum) that `combine_splits` merges.

Inside a program, K and V arrive by TMA in tiles of BLOCK_KV tokens, one copy per page (or
per BLOCK_KV rows of a larger page), `num_slots` tiles in flight; the query heads that share
the kv head are the M side of two wgmmas (scores = q @ k^T, acc += p @ v), padded to 64.
Copies read whole page rows, so the rows of a tile's last page past the context are read
too: their scores are masked, and their V rows are zeroed in shared memory before p @ v
(0 * NaN would be NaN).

Declines (`mosaic_decode_supported` is False, and the Triton kernel runs) for what it does
not cover: f32, fp8 and int8 caches, q and cache dtypes that differ, head_dim other than 64
or 128, page sizes not a power of 2 >= 8, more than 64 query heads per kv head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import (mosaic_gpu_interpret_params, mosaic_gpu_interprets_wgmma,
                                   mosaic_gpu_layout_cast)
from pallas_kernels.gpu.attention_tiles import LOG2E, MASK_VALUE
from pallas_kernels.gpu.block_sizes import AttentionBlockSizes
from pallas_kernels.gpu.decode_attention import decode_num_splits

BLOCK_M = 64    # a wgmma's M: the query heads of one kv head, zero-padded
BLOCK_KV = 64   # tokens per tile: the N of q @ k^T, the K of p @ v
HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, slots=True)
class MosaicDecodeBlockSizes:
    """num_slots: K/V tiles in flight per program (shared memory: 2 * num_slots * 64 * D *
    2 bytes, plus q and the f32 output staging)."""
    num_slots: int = 4

    def __post_init__(self):
        if self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots}: expected >= 1")


def mosaic_decode_supported(q_dtype, kv_dtype, num_q_heads, num_kv_heads, head_dim, page_size,
                            quantized) -> bool:
    """Whether this kernel covers the batch's shapes and dtypes (else the Triton one runs)."""
    return (not quantized and jnp.dtype(q_dtype) in DTYPES
            and jnp.dtype(kv_dtype) == jnp.dtype(q_dtype) and head_dim in HEAD_DIMS
            and page_size >= 8 and page_size & (page_size - 1) == 0
            and num_q_heads // num_kv_heads <= BLOCK_M)


def _product(lhs_smem, rhs_smem, *, transpose_rhs, emulate):
    """lhs @ rhs (or rhs^T) of shared-memory operands by wgmma into a fresh f32 accumulator:
    f32[M, N] in the wgmma layout. emulate=True: a plain dot of the loaded operands, for GPU
    interpret modes that cannot run the wgmma (compat.mosaic_gpu_interprets_wgmma).

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


def _split_bounds(kv_len, split, num_splits, sliding_window):
    """The split's share of the context: whole tiles, in order, from the window's first tile.

    Returns (window_start, lo, hi, num_tiles): keys from window_start on are visible; this
    split reads tokens lo .. hi in num_tiles tiles.
    """
    window_start = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
    start = window_start // BLOCK_KV * BLOCK_KV
    tiles_per_split = pl.cdiv(pl.cdiv(kv_len - start, BLOCK_KV), num_splits)
    lo = start + split * tiles_per_split * BLOCK_KV
    hi = jnp.minimum(kv_len, lo + tiles_per_split * BLOCK_KV)
    return window_start, lo, hi, jnp.maximum(pl.cdiv(hi - lo, BLOCK_KV), 0)


def _fetch_tile(kv_pages_ref, page_indices_ref, k_tile, v_tile, barrier, seq, kv_head,
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


def _decode_kernel(kv_lens_ref,       # i32[S] context of decode sequences, 0 for the others
                   page_indices_ref,  # i32[S, P]
                   q_ref,             # [S, Hkv, BLOCK_M, D] query heads per kv head, 0-padded
                   kv_pages_ref,      # [num_pages, page_size, 2 * Hkv, D]
                   acc_ref,           # f32[splits, S, Hkv, BLOCK_M, D] unnormalised output
                   max_ref,           # f32[splits, S, Hkv, BLOCK_M] row max (log2 units)
                   sum_ref,           # f32[splits, S, Hkv, BLOCK_M] row sum
                   q_smem,            # [BLOCK_M, D]
                   k_smem, v_smem,    # [num_slots, BLOCK_KV, D] each
                   p_smem,            # [BLOCK_M, BLOCK_KV] softmax weights of a tile
                   out_smem,          # f32[BLOCK_M, D]
                   stat_smem,         # f32[2, BLOCK_M]
                   q_barrier, kv_barriers,
                   *, num_splits, num_slots, sm_scale, soft_cap, sliding_window, interpret):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    in_layout = functools.partial(mosaic_gpu_layout_cast, interpret=interpret)
    emulate = interpret and not mosaic_gpu_interprets_wgmma()
    seq, kv_head = jax.lax.axis_index("seq"), jax.lax.axis_index("kv_head")
    split = jax.lax.axis_index("split")
    window_start, lo, hi, num_tiles = _split_bounds(kv_lens_ref[seq], split, num_splits,
                                                    sliding_window)

    def fetch(tile, slot):
        _fetch_tile(kv_pages_ref, page_indices_ref, k_smem.at[slot], v_smem.at[slot],
                    kv_barriers.at[slot], seq, kv_head, lo + tile * BLOCK_KV)

    plgpu.copy_gmem_to_smem(q_ref.at[seq, kv_head], q_smem, q_barrier)
    for slot in range(num_slots):
        pl.when(slot < num_tiles)(functools.partial(fetch, slot, slot))
    plgpu.barrier_wait(q_barrier)

    def body(tile, carry):
        slot, first = jax.lax.rem(tile, num_slots), lo + tile * BLOCK_KV
        plgpu.barrier_wait(kv_barriers.at[slot])
        # The tile's rows past hi may hold anything (NaN), and 0 * NaN is NaN in p @ v.
        pl.when(first + BLOCK_KV > hi)(
            lambda: _zero_rows_from(v_smem.at[slot], hi - first, in_layout))
        scores = _scores(q_smem, k_smem.at[slot], sm_scale=sm_scale, soft_cap=soft_cap,
                         emulate=emulate)
        tokens = first + in_layout(jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1),
                                   "WGMMA")
        m_next, l_next, rescale, weights = _softmax_step(
            *carry[:2], scores, (tokens >= window_start) & (tokens < hi))
        # p goes through shared memory, not registers: GPU interpret mode runs wgmma only on
        # shared-memory operands, and 8 KiB a tile costs little here.
        p_smem[...] = weights.astype(p_smem.dtype)
        plgpu.commit_smem()
        values = _product(p_smem, v_smem.at[slot], transpose_rhs=False, emulate=emulate)
        acc = carry[2] * jax.lax.broadcast_in_dim(rescale, carry[2].shape, [0]) + values
        pl.when(tile + num_slots < num_tiles)(functools.partial(fetch, tile + num_slots, slot))
        return m_next, l_next, acc

    carry = (in_layout(jnp.full((BLOCK_M,), MASK_VALUE, jnp.float32), "WGMMA_ROW"),
             in_layout(jnp.zeros((BLOCK_M,), jnp.float32), "WGMMA_ROW"),
             in_layout(jnp.zeros(out_smem.shape, jnp.float32), "WGMMA"))
    row_max, row_sum, acc = jax.lax.fori_loop(0, num_tiles, body, carry)
    out_smem[...] = acc
    stat_smem[0] = row_max
    stat_smem[1] = row_sum
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, acc_ref.at[split, seq, kv_head])
    plgpu.copy_smem_to_gmem(stat_smem.at[0], max_ref.at[split, seq, kv_head])
    plgpu.copy_smem_to_gmem(stat_smem.at[1], sum_ref.at[split, seq, kv_head])
    plgpu.wait_smem_to_gmem(0)


def _scratch_types(head_dim, page_size, dtype, num_slots):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    swizzle = 128
    transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    kv_tiles = plgpu.SMEM((num_slots, BLOCK_KV, head_dim), dtype, transforms=transforms)
    return (plgpu.SMEM((BLOCK_M, head_dim), dtype, transforms=transforms), kv_tiles, kv_tiles,
            plgpu.SMEM((BLOCK_M, BLOCK_KV), dtype, transforms=transforms),
            plgpu.SMEM((BLOCK_M, head_dim), jnp.float32),
            plgpu.SMEM((2, BLOCK_M), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            # Each copy arrives once: K and V of every page of a tile.
            plgpu.Barrier(num_arrivals=2 * (BLOCK_KV // min(page_size, BLOCK_KV)),
                          num_barriers=num_slots))


def decode_queries(q, cu_q_lens, num_kv_heads):
    """Each sequence's last query row, its heads grouped by kv head and zero-padded to
    BLOCK_M: [S, Hkv, BLOCK_M, D] (non-decode sequences get some row; their context is 0)."""
    _, num_q_heads, head_dim = q.shape
    rows = q[jnp.minimum(cu_q_lens[:-1], q.shape[0] - 1)]                  # [S, Hq, D]
    grouped = rows.reshape(rows.shape[0], num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    padding = BLOCK_M - grouped.shape[2]
    return jnp.pad(grouped, ((0, 0), (0, 0), (0, padding), (0, 0)))


def mosaic_decode_attention_partials(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                     *, sm_scale, sliding_window, soft_cap,
                                     block_sizes: AttentionBlockSizes,
                                     mosaic_sizes: MosaicDecodeBlockSizes | None = None,
                                     interpret: bool):
    """The Mosaic GPU twin of decode_attention.decode_attention_partials (same partials).

    Returns acc f32[splits, S, Hq, D] (unnormalised), max and sum f32[splits, S, Hq].
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    mosaic_sizes = mosaic_sizes or MosaicDecodeBlockSizes()
    _, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    num_kv_heads = two_kv_heads // 2
    max_seqs, max_pages = page_indices.shape
    group = num_q_heads // num_kv_heads
    splits = decode_num_splits(max_seqs, num_kv_heads, max_pages, page_size,
                               dataclasses.replace(block_sizes, decode_block_kv=BLOCK_KV))
    is_decode = (jnp.arange(max_seqs) < num_seqs[0]) & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)
    decode_kv_lens = jnp.where(is_decode, kv_lens, 0)
    kernel = functools.partial(_decode_kernel, num_splits=splits,
                               num_slots=mosaic_sizes.num_slots, sm_scale=sm_scale,
                               soft_cap=soft_cap, sliding_window=sliding_window,
                               interpret=interpret)
    stats = jax.ShapeDtypeStruct((splits, max_seqs, num_kv_heads, BLOCK_M), jnp.float32)
    acc, row_max, row_sum = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((*stats.shape, head_dim), jnp.float32), stats, stats),
        scratch_types=_scratch_types(head_dim, page_size, q.dtype, mosaic_sizes.num_slots),
        grid=(max_seqs, num_kv_heads, splits),
        grid_names=("seq", "kv_head", "split"),
        interpret=mosaic_gpu_interpret_params() if interpret else None,
    )(decode_kv_lens, page_indices, decode_queries(q, cu_q_lens, num_kv_heads), kv_pages)
    partial_shape = (splits, max_seqs, num_q_heads)
    return (acc[:, :, :, :group].reshape(*partial_shape, head_dim),
            row_max[:, :, :, :group].reshape(partial_shape),
            row_sum[:, :, :, :group].reshape(partial_shape))
