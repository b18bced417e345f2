"""Plain-jnp references for Ember's kernels: readable, exact, and the CPU default.

Shapes follow the kernel contract in docs/design.md:
  q             [T, num_q_heads, head_dim]      query rows, sequence after sequence
  kv_pages      [num_pages, page_size, 2 * num_kv_heads, head_dim]   K of head h at 2h, V at 2h+1
  kv_scales     f32[num_pages, page_size, 2 * num_kv_heads]  8-bit caches only (kv_cache.py)
  kv_lens       i32[S]    context length of each sequence after this step
  page_indices  i32[S, P] page table of each sequence
  cu_q_lens     i32[S+1]  sequence s owns query rows cu_q_lens[s]:cu_q_lens[s+1]
  num_seqs      i32[1]    rows of sequences >= num_seqs are padding

Sampling (sample_reference) takes logits [S, V] and per-row parameters and keys; it draws
through pallas_kernels/sampling_primitives.py, as the GPU kernel does, so that every backend
draws the same token for the same key. Row and block metadata come from ragged_rows.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.kv_cache import dequantize, quantize, to_float_cache
from pallas_kernels.ragged_rows import query_blocks
from pallas_kernels.sampling_primitives import (first_argmax, gumbel_from_bits, ordered_key,
                                                sampling_noise_bits)

# Bytes of K/V gathered per loop iteration (all query blocks together). Decode gathers
# less: a few sequences' rows gathered 4 MiB at a time read far past their contexts (one
# sequence of 100 tokens read 1,024 per layer) and left the CPU's caches; a quarter MiB
# halved batch-1 decode attention on this project's CPU (2026-11-29).
_PREFILL_GATHER_BYTES = 4 << 20
_DECODE_GATHER_BYTES = 256 << 10
# Query rows of one prefill sequence sharing one gather of its pages.
_PREFILL_BLOCK = 16
# Query blocks attended together in one pass over their pages (decode: one row each).
_DECODE_GROUP = 64
_PREFILL_GROUP = 16
_MASK_VALUE = -1e30
# The reference is the yardstick: full f32 products even where XLA would default to TF32.
_EXACT = jax.lax.Precision.HIGHEST


def write_kv_pages_reference(kv_pages, k, v, slot_mapping, kv_scales=None):
    """Scatters this step's K/V rows into their cache slots, converted to the cache's dtype.

    Args:
      kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]
      k, v: [T, num_kv_heads, head_dim]
      slot_mapping: i32[T], page * page_size + offset; padding rows point into page 0.
      kv_scales: f32[num_pages, page_size, 2 * num_kv_heads] for an int8 or float8 kv_pages,
        else None.
    Returns:
      kv_pages with the rows written; (kv_pages, kv_scales) when kv_scales is given.
    """
    num_pages, page_size, two_kv_heads, head_dim = kv_pages.shape
    tokens = k.shape[0]
    kv = jnp.stack([k, v], axis=2).reshape(tokens, two_kv_heads, head_dim)  # K at 2h, V at 2h+1
    flat = kv_pages.reshape(num_pages * page_size, two_kv_heads, head_dim)
    if kv_scales is None:
        return flat.at[slot_mapping].set(to_float_cache(kv, kv_pages.dtype)).reshape(
            kv_pages.shape)
    quantized, scales = quantize(kv, kv_pages.dtype)     # 8-bit [T, 2Hkv, D], f32[T, 2Hkv]
    flat_scales = kv_scales.reshape(num_pages * page_size, two_kv_heads)
    return (flat.at[slot_mapping].set(quantized).reshape(kv_pages.shape),
            flat_scales.at[slot_mapping].set(scales).reshape(kv_scales.shape))


def ragged_paged_attention_reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                     *, sm_scale, sliding_window=None, soft_cap=None,
                                     kv_scales=None):
    """Causal attention of ragged query rows over paged K/V, with an online softmax.

    Row t of sequence s sits at position p = kv_lens[s] - q_len[s] + (t - cu_q_lens[s]) and
    attends keys j with j <= p (and p - j < sliding_window when set). Scores are
    soft_cap * tanh(score / soft_cap) when soft_cap is set. Padding rows return zeros and
    read only page 0. K/V are read as f32 (kv_cache.dequantize: times kv_scales for 8-bit caches).

    Rows are handled in blocks that share one gather of their sequence's pages: decode
    sequences (one row) one block each, longer ones in blocks of _PREFILL_BLOCK rows. A
    per-row gather would re-read a prompt's whole context for every one of its rows. Each
    loop iteration gathers a bounded slice of the pages (_DECODE_GATHER_BYTES,
    _PREFILL_GATHER_BYTES), and a step of one row (a lone decode) skips the prefill half.

    Returns:
      out [T, num_q_heads, head_dim] in q's dtype.
    """
    num_rows, num_q_heads, head_dim = q.shape
    max_seqs = kv_lens.shape[0]
    attend = functools.partial(_attend_blocks, q, kv_pages, kv_scales, kv_lens, page_indices,
                               cu_q_lens, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap)
    out = jnp.zeros((num_rows + 1, num_q_heads, head_dim), q.dtype)  # row T absorbs the dead
    # At most min(S, T) decode sequences; prefill sequences have >= 2 rows each.
    decode = query_blocks(cu_q_lens, num_seqs, block_q=1, num_blocks=min(max_seqs, num_rows),
                          min_rows=1, max_rows=1)
    out = _over_live_groups(functools.partial(attend, gather_bytes=_DECODE_GATHER_BYTES),
                            decode, out, block_q=1, group=_DECODE_GROUP)
    if num_rows == 1:   # a step of one row is a decode: no prefill block to look for
        return out[:num_rows]
    block = min(_PREFILL_BLOCK, num_rows)
    prefill = query_blocks(cu_q_lens, num_seqs, block_q=block, min_rows=2,
                           num_blocks=-(-num_rows // block) + min(max_seqs, num_rows // 2))
    out = _over_live_groups(functools.partial(attend, gather_bytes=_PREFILL_GATHER_BYTES),
                            prefill, out, block_q=block, group=_PREFILL_GROUP)
    return out[:num_rows]


def _over_live_groups(attend, blocks, out, *, block_q, group):
    """Runs `attend` over groups of `group` query blocks, only as many groups as hold live
    blocks (query_blocks puts the live ones first), writing each group's rows into out."""
    group = min(group, blocks[0].shape[0])
    pad = (-blocks[0].shape[0]) % group
    blocks = tuple(jnp.pad(field, (0, pad)) for field in blocks)  # padded blocks hold 0 rows
    num_live = jnp.sum(blocks[2] > 0)

    def body(index, out):
        chosen = tuple(jax.lax.dynamic_slice_in_dim(field, index * group, group)
                       for field in blocks)
        rows, values = attend(chosen, block_q=block_q)
        return out.at[rows].set(values)

    return jax.lax.fori_loop(0, (num_live + group - 1) // group, body, out)


def _attend_blocks(q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens, blocks, *, block_q,
                   gather_bytes, sm_scale, sliding_window, soft_cap):
    """Attention for query blocks of up to block_q rows (seq, first_row, num_rows: i32[W]),
    gathering about gather_bytes of K/V (at least a page per block) per loop iteration.

    Returns (rows i32[W * Bq], out [W * Bq, Hq, D]); dead rows map to row T.
    """
    seq, first_row, block_rows = blocks
    num_rows, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    num_kv_heads = two_kv_heads // 2
    group = num_q_heads // num_kv_heads
    num_blocks = seq.shape[0]
    offsets = jnp.arange(block_q)
    row_live = offsets[None, :] < block_rows[:, None]                     # bool[W, Bq]
    rows = jnp.where(row_live, first_row[:, None] + offsets[None, :], num_rows)
    q_lens = cu_q_lens[seq + 1] - cu_q_lens[seq]
    positions = (kv_lens[seq] - q_lens + first_row - cu_q_lens[seq])[:, None] + offsets
    queries = jnp.take(q, rows, axis=0, mode="clip").astype(jnp.float32) * sm_scale
    queries = queries.reshape(num_blocks, block_q, num_kv_heads, group, head_dim)
    max_pages = page_indices.shape[1]
    # Gather a few MiB per iteration: larger blocks leave the CPU's caches (and XLA's
    # temporaries past glibc's mmap threshold, paid in page faults on every step).
    page_bytes = page_size * two_kv_heads * head_dim * 4
    pages_per_block = max(1, min(max_pages, gather_bytes // max(1, num_blocks * page_bytes)))
    live_block = block_rows > 0
    pages_of_block = jnp.where(live_block[:, None], page_indices[seq], 0)  # i32[W, P]
    pages_of_block = jnp.pad(pages_of_block, ((0, 0), (0, (-max_pages) % pages_per_block)))
    block_tokens = pages_per_block * page_size

    def body(index, carry):
        running_max, running_sum, acc = carry
        first = index * pages_per_block
        pages = jax.lax.dynamic_slice_in_dim(pages_of_block, first, pages_per_block, axis=1)
        kv = dequantize(kv_pages[pages], None if kv_scales is None else kv_scales[pages])
        kv = kv.reshape(num_blocks, block_tokens, two_kv_heads, head_dim)  # f32
        keys, values = kv[:, :, 0::2], kv[:, :, 1::2]                     # [W, tokens, Hkv, D]
        scores = jnp.einsum("wqkgd,wskd->wkgqs", queries, keys, precision=_EXACT,
                            preferred_element_type=jnp.float32)
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        key_pos = first * page_size + jnp.arange(block_tokens)
        visible = (key_pos[None, None, :] <= positions[:, :, None]) & row_live[:, :, None]
        if sliding_window is not None:
            visible &= positions[:, :, None] - key_pos[None, None, :] < sliding_window
        scores = jnp.where(visible[:, None, None], scores, _MASK_VALUE)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        weights = jnp.where(visible[:, None, None], jnp.exp(scores - new_max[..., None]), 0.0)
        # Slots past a sequence's context may hold anything (even NaN): zero them, since
        # a zero weight times NaN is still NaN.
        seen = jnp.any(visible, axis=1)                                   # [W, tokens]
        values = jnp.where(seen[:, :, None, None], values, 0.0)
        rescale = jnp.exp(running_max - new_max)
        running_sum = running_sum * rescale + weights.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("wkgqs,wskd->wkgqd", weights, values,
                                                    precision=_EXACT)
        return new_max, running_sum, acc

    # Only the page blocks that hold some live context of these query blocks are visited.
    longest = jnp.max(jnp.where(live_block, kv_lens[seq], 0), initial=0)
    shape = (num_blocks, num_kv_heads, group, block_q)
    init = (jnp.full(shape, _MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, (longest + block_tokens - 1) // block_tokens, body, init)
    out = acc / jnp.maximum(total, 1e-30)[..., None]                      # [W, Hkv, G, Bq, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(num_blocks * block_q, num_q_heads, head_dim)
    return rows.reshape(-1), out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

# Bisection steps over the 32-bit ordered key space: after 32 halvings the interval holds one
# key, so the threshold found is exact (it is the value of an element of the row).
SEARCH_STEPS = 32


def ceil_midpoint(lo, hi):
    """ceil((lo + hi) / 2) for i32 without overflow."""
    return (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)


def _largest_key_reaching(row_keys, weights, target, lo, hi):
    """Per row, the largest t in [lo, hi] with sum(weights[row_keys >= t]) >= target.

    The sum only falls as t rises, so bisection finds t; the caller guarantees t = lo reaches.
    row_keys i32[S, V], weights f32[S, V], target f32[S], lo/hi i32[S] -> i32[S].
    """
    def step(_, bounds):
        lo, hi = bounds
        mid = ceil_midpoint(lo, hi)
        mass = jnp.sum(jnp.where(row_keys >= mid[:, None], weights, 0.0), axis=-1)
        reaches = mass >= target
        return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid - 1)
    lo, _ = jax.lax.fori_loop(0, SEARCH_STEPS, step, (lo, hi))
    return lo


def sampling_threshold(tempered, top_k, top_p, min_p):
    """The ordered key of the smallest tempered logit each row keeps: i32[S].

    tempered f32[S, V]; top_k i32[S]; top_p f32[S]; min_p f32[S]. A token is kept when
    ordered_key(tempered) >= threshold, which applies top-k, then top-p, then min-p.
    """
    vocab = tempered.shape[-1]
    row_keys = ordered_key(tempered)                                      # i32[S, V]
    row_max = jnp.max(tempered, axis=-1)                                  # f32[S]
    lo, hi = jnp.min(row_keys, axis=-1), jnp.max(row_keys, axis=-1)

    use_top_k = (top_k > 0) & (top_k < vocab)
    ones = jnp.ones_like(tempered)
    k_key = _largest_key_reaching(row_keys, ones, top_k.astype(jnp.float32), lo, hi)
    k_key = jnp.where(use_top_k, k_key, lo)

    # top-p on the top-k-renormalised distribution: the kept mass must reach top_p * Z_k.
    weights = jnp.where(row_keys >= k_key[:, None], jnp.exp(tempered - row_max[:, None]), 0.0)
    target = top_p * jnp.sum(weights, axis=-1)
    p_key = _largest_key_reaching(row_keys, weights, target, k_key, hi)
    p_key = jnp.where(top_p < 1.0, p_key, k_key)

    # min-p: p >= min_p * p_max  <=>  logit >= max + log(min_p); min_p <= 0 gives -inf.
    min_p_key = ordered_key(row_max + jnp.log(jnp.maximum(min_p, 0.0)))
    return jnp.maximum(p_key, jnp.minimum(min_p_key, hi))


def sample_reference(logits, temperature, top_k, top_p, min_p, keys):
    """Draws one token per row: temperature, then top-k, top-p, min-p, then Gumbel-max.

    In order, on each row:
      1. temperature: tempered = logits / T; T == 0 means greedy (argmax of the logits,
         masks and noise ignored).
      2. top-k: keep the k most likely tokens (k <= 0 or k >= V: off).
      3. top-p, on the distribution renormalised over the top-k tokens: keep the smallest
         set of most likely tokens whose mass reaches top_p (top_p >= 1: off). The most
         likely token is always kept.
      4. min-p: keep tokens with p >= min_p * p_max (min_p <= 0: off).
      5. draw: argmax over kept tokens of tempered + Gumbel noise, the noise made from
         sampling_noise_bits(keys) -- an exact sample of the renormalised kept distribution.
    Each mask is one threshold on the tempered logit, found by bisection over the row (no
    full-vocabulary sort). Tokens tied with a threshold are all kept, so top-k may keep more
    than k tokens and top-p may keep more mass than it needs when values tie.

    Args:
      logits: f32[S, V] (any float dtype; computed in f32).
      temperature: f32[S]; top_k: i32[S]; top_p: f32[S]; min_p: f32[S].
      keys: u32[S, 2] raw key data per row,
        jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(seed), output_position)).
    Returns:
      token_ids i32[S]; logprobs f32[S], log_softmax of the tempered logits (greedy: of the
      raw logits) at the chosen token, before any mask.
    """
    logits = logits.astype(jnp.float32)                                   # f32[S, V]
    greedy = temperature <= 0.0                                           # bool[S]
    tempered = logits / jnp.where(greedy, 1.0, temperature)[:, None]      # f32[S, V]
    argmax = first_argmax(logits)

    def draw(_):
        threshold = sampling_threshold(tempered, top_k, top_p, min_p)     # i32[S]
        kept = ordered_key(tempered) >= threshold[:, None]                # bool[S, V]
        noise = gumbel_from_bits(sampling_noise_bits(keys, logits.shape[-1]))
        drawn = first_argmax(jnp.where(kept, tempered + noise, -jnp.inf))
        return jnp.where(greedy, argmax, drawn)

    # An all-greedy batch (common in evaluations) skips the threshold searches and the noise.
    token_ids = jax.lax.cond(jnp.all(greedy), lambda _: argmax, draw, None).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(tempered, axis=-1)
    logprobs = jnp.take_along_axis(log_probs, token_ids[:, None], axis=-1)[:, 0]
    return token_ids, logprobs
