"""Ragged paged attention for TPU (Pallas, Mosaic lowering).

One program per (kv head, query block). A query block is up to `block_q` rows of one
sequence (decode sequences get a block of one row: the TPU kernel has no separate decode
path). The block's query rows for the query heads of its kv head arrive through a BlockSpec
(gathered into blocks by the wrapper); its pages are DMA'd from HBM by hand, `pages_per_block`
at a time into a double buffer, K and V of this kv head only, and only pages inside the
block's causal (and sliding-window) range, so pages a sequence does not own are never read.

Everything that varies per step (the query blocks, kv_lens, the page table, cu_q_lens) is
scalar-prefetched into SMEM. No ref is reshaped (only loaded values are), which keeps the
kernel runnable in TPU interpret mode on a CPU. Only interpret mode has run it so far: it
has not been compiled by Mosaic on a real TPU.

Caches in other dtypes than q (kv_cache.py) are DMA'd as they are and converted in VMEM; an
8-bit cache's scales of this kv head are DMA'd beside each page's K and V.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.compat import tpu_compiler_params, tpu_interpret_params
from pallas_kernels.kv_cache import compute_dtype
from pallas_kernels.ragged_rows import query_blocks, row_metadata
from pallas_kernels.tpu.attention_block import attend_block


@dataclasses.dataclass(frozen=True, slots=True)
class TpuBlockSizes:
    """block_q: query rows per block (a multiple of 16 keeps bf16 sublanes whole);
    kv_tokens: tokens per DMA'd K/V block, rounded to whole pages. Untuned."""
    block_q: int = 16
    kv_tokens: int = 128


def _kernel(block_seq_ref,      # i32[NB]  (SMEM)
            block_row_ref,      # i32[NB]
            block_len_ref,      # i32[NB]
            kv_lens_ref,        # i32[S]
            page_indices_ref,   # i32[S * P]  page table, flattened for SMEM
            cu_q_lens_ref,      # i32[S + 1]
            q_ref,              # [G, BQ, D]  this block's rows, this kv head's query heads
            kv_hbm_ref,         # [num_pages, page_size, 2 * Hkv, D]  in HBM
            *refs,              # if quantized: kv_scales f32[num_pages, page_size, 2 * Hkv]
                                #   in HBM; then out [G, BQ, D];
                                # k_buf, v_buf [2, pages_per_block, page_size, D]  VMEM double
                                #   buffers; if quantized: k_scale_buf, v_scale_buf
                                #   f32[2, pages_per_block, page_size]; DMA semaphores [2]
            max_pages, sm_scale, soft_cap, sliding_window, quantized, dtype):
    if quantized:
        scales_hbm_ref, out_ref, k_buf, v_buf, k_scale_buf, v_scale_buf, sems = refs
        hbm, bufs = (kv_hbm_ref, scales_hbm_ref), (k_buf, v_buf, k_scale_buf, v_scale_buf)
    else:
        out_ref, k_buf, v_buf, sems = refs
        hbm, bufs = (kv_hbm_ref,), (k_buf, v_buf)
    kv_head, block = pl.program_id(0), pl.program_id(1)
    num_rows = block_len_ref[block]
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    @pl.when(num_rows > 0)
    def _():
        seq = block_seq_ref[block]
        kv_len, seq_start = kv_lens_ref[seq], cu_q_lens_ref[seq]
        q_len = cu_q_lens_ref[seq + 1] - seq_start
        first_pos = kv_len - q_len + (block_row_ref[block] - seq_start)
        hi = jnp.minimum(kv_len, first_pos + num_rows)   # one past the last row's position
        lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
        pages_per_block, page_size = k_buf.shape[1], k_buf.shape[2]
        # lax.div: both are >= 0, and jnp's floor division lowers through sign(), which
        # Mosaic cannot lower for integers without a TPU at hand.
        start_page, end_page = jax.lax.div(lo, page_size), pl.cdiv(hi, page_size)
        num_kv_blocks = pl.cdiv(end_page - start_page, pages_per_block)

        def run(kv_block, slot, action):  # start or wait on the DMAs of one K/V block
            first_page = start_page + kv_block * pages_per_block
            for owned, copy in _block_copies(hbm, bufs, sems, page_indices_ref, seq * max_pages,
                                             max_pages, first_page, end_page, kv_head, slot):
                pl.when(owned)(getattr(copy, action))

        run(0, 0, "start")

        def body(kv_block, carry):
            slot = jax.lax.rem(kv_block, 2)

            @pl.when(kv_block + 1 < num_kv_blocks)
            def _():
                run(kv_block + 1, 1 - slot, "start")

            run(kv_block, slot, "wait")
            first_token = (start_page + kv_block * pages_per_block) * page_size
            scale_refs = ((k_scale_buf.at[slot], v_scale_buf.at[slot]) if quantized
                          else None)
            return attend_block(carry, q_ref, k_buf.at[slot], v_buf.at[slot], scale_refs,
                                first_token, first_pos, hi, sm_scale=sm_scale,
                                soft_cap=soft_cap, sliding_window=sliding_window, dtype=dtype)

        group, block_q, head_dim = q_ref.shape
        rows = group * block_q
        init = (jnp.full((rows, 1), -1e30, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                jnp.zeros((rows, head_dim), jnp.float32))
        _, row_sum, acc = jax.lax.fori_loop(0, num_kv_blocks, body, init)
        out = acc / jnp.maximum(row_sum, 1e-30)
        out_ref[...] = out.reshape(out_ref.shape).astype(out_ref.dtype)


def _block_copies(hbm, bufs, sems, page_indices_ref, table_start, max_pages, first_page,
                  end_page, kv_head, slot):
    """(owned, DMA) for K and V (and their scales) of each page of one K/V block; owned: the
    page is before end_page, i.e. the sequence owns it and the block needs it.

    hbm: (kv_pages,) or (kv_pages, kv_scales); bufs: (k, v) or (k, v, k_scale, v_scale)."""
    for p in range(bufs[0].shape[1]):
        page_slot = first_page + p
        page = page_indices_ref[table_start + jnp.minimum(page_slot, max_pages - 1)]
        for index, buf in enumerate(bufs):
            source, part = hbm[index // 2], index % 2        # K at 2h, V at 2h + 1
            source = (source.at[page, :, 2 * kv_head + part, :] if index < 2
                      else source.at[page, :, 2 * kv_head + part])
            yield page_slot < end_page, pltpu.make_async_copy(source, buf.at[slot, p],
                                                              sems.at[slot])


def _row_blocks(q, cu_q_lens, num_seqs, block_q, num_blocks):
    """Query blocks, q gathered into them [Hkv-major later], and each row's (block, offset)."""
    blocks = query_blocks(cu_q_lens, num_seqs, block_q=block_q, num_blocks=num_blocks,
                          min_rows=1)
    _, first_row, num_rows = blocks
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    rows = jnp.clip(first_row[:, None] + offsets[None, :], 0, q.shape[0] - 1)   # i32[NB, BQ]
    in_block = offsets[None, :] < num_rows[:, None]
    q_blocks = jnp.where(in_block[..., None, None], q[rows], 0)                 # [NB, BQ, Hq, D]
    return blocks, q_blocks


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "block_sizes", "interpret"))
def ragged_paged_attention_tpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale, sliding_window=None, soft_cap=None, kv_scales=None,
                               block_sizes: TpuBlockSizes = TpuBlockSizes(), interpret=False):
    """Same contract as pallas_kernels.ragged_paged_attention (arguments checked there).

    interpret=True runs the kernel in TPU interpret mode (on any backend, e.g. a CPU).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    num_kv_heads, (max_seqs, max_pages) = two_kv_heads // 2, page_indices.shape
    group, block_q = num_q_heads // num_kv_heads, block_sizes.block_q
    pages_per_block = max(1, block_sizes.kv_tokens // page_size)
    num_blocks = pl.cdiv(num_tokens, block_q) + min(max_seqs, num_tokens)
    blocks, q_blocks = _row_blocks(q, cu_q_lens, num_seqs, block_q, num_blocks)
    q_blocks = q_blocks.reshape(num_blocks, block_q, num_kv_heads, group, head_dim)
    q_blocks = q_blocks.transpose(2, 0, 3, 1, 4)                    # [Hkv, NB, G, BQ, D]

    block_spec = pl.BlockSpec((None, None, group, block_q, head_dim),
                              lambda h, b, *_: (h, b, 0, 0, 0))
    quantized = kv_scales is not None
    kernel = functools.partial(_kernel, max_pages=max_pages, sm_scale=sm_scale,
                               soft_cap=soft_cap, sliding_window=sliding_window,
                               quantized=quantized,
                               dtype=compute_dtype(q.dtype, kv_pages.dtype))
    hbm_inputs = (kv_pages, kv_scales) if quantized else (kv_pages,)
    buffers = [pltpu.VMEM((2, pages_per_block, page_size, head_dim), kv_pages.dtype)] * 2
    if quantized:
        buffers += [pltpu.VMEM((2, pages_per_block, page_size), jnp.float32)] * 2
    out_blocks = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(num_kv_heads, num_blocks),
            in_specs=[block_spec] + [pl.BlockSpec(memory_space=pl.ANY)] * len(hbm_inputs),
            out_specs=block_spec,
            scratch_shapes=buffers + [pltpu.SemaphoreType.DMA((2,))]),
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q.dtype),
        compiler_params=tpu_compiler_params(dimension_semantics=("parallel", "parallel")),
        interpret=tpu_interpret_params() if interpret else False,
        name="ember_ragged_paged_attention_tpu",
    )(*blocks, kv_lens, page_indices.reshape(-1), cu_q_lens, q_blocks, *hbm_inputs)
    return _unblock(out_blocks, kv_lens, cu_q_lens, num_seqs, block_q, num_tokens)


def _unblock(out_blocks, kv_lens, cu_q_lens, num_seqs, block_q, num_tokens):
    """[Hkv, NB, G, BQ, D] blocks back to [T, Hq, D] rows; padding rows are zeros."""
    num_kv_heads, num_blocks, group, _, head_dim = out_blocks.shape
    max_seqs = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks_per_seq = jnp.where(jnp.arange(max_seqs) < num_seqs[0], pl.cdiv(q_lens, block_q), 0)
    first_block = jnp.cumsum(blocks_per_seq) - blocks_per_seq                  # i32[S]
    seq, _, live = row_metadata(kv_lens, cu_q_lens, num_seqs, num_tokens)
    offset = jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[seq]
    block = jnp.clip(first_block[seq] + offset // block_q, 0, num_blocks - 1)
    rows = out_blocks[:, block, :, offset % block_q]                         # [T, Hkv, G, D]
    rows = rows.reshape(num_tokens, num_kv_heads * group, head_dim)
    return jnp.where(live[:, None, None], rows, 0)
