"""Plain-jnp references for Ember's kernels: readable, exact, and the CPU default.

Shapes follow the kernel contract in DESIGN.md:
  q             [T, num_q_heads, head_dim]      query rows, sequence after sequence
  kv_pages      [num_pages, page_size, 2 * num_kv_heads, head_dim]   K of head h at 2h, V at 2h+1
  kv_lens       i32[S]    context length of each sequence after this step
  page_indices  i32[S, P] page table of each sequence
  cu_q_lens     i32[S+1]  sequence s owns query rows cu_q_lens[s]:cu_q_lens[s+1]
  num_seqs      i32[1]    rows of sequences >= num_seqs are padding
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Pages gathered per loop iteration: enough to amortise the loop, few enough that the
# gathered block [T, block, 2 * num_kv_heads, head_dim] stays small.
_PAGES_PER_BLOCK = 8
_MASK_VALUE = -1e30


def write_kv_pages_reference(kv_pages, k, v, slot_mapping):
    """Scatters this step's K/V rows into their cache slots.

    Args:
      kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]
      k, v: [T, num_kv_heads, head_dim]
      slot_mapping: i32[T], page * page_size + offset; padding rows point into page 0.
    Returns:
      kv_pages with the rows written.
    """
    num_pages, page_size, two_kv_heads, head_dim = kv_pages.shape
    tokens = k.shape[0]
    kv = jnp.stack([k, v], axis=2).reshape(tokens, two_kv_heads, head_dim)  # K at 2h, V at 2h+1
    flat = kv_pages.reshape(num_pages * page_size, two_kv_heads, head_dim)
    flat = flat.at[slot_mapping].set(kv.astype(kv_pages.dtype))
    return flat.reshape(kv_pages.shape)


def row_metadata(kv_lens, cu_q_lens, num_seqs, num_rows):
    """For each query row: its sequence, its position in that sequence, and if it is live.

    Returns:
      seq_of_row i32[T], position_of_row i32[T], live_row bool[T]
    """
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    # Sequence s owns rows [cu_q_lens[s], cu_q_lens[s+1]); searchsorted finds s for each row.
    seq_of_row = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    num_live_seqs = num_seqs[0]
    live_row = (seq_of_row < num_live_seqs) & (rows < cu_q_lens[num_live_seqs])
    seq_of_row = jnp.minimum(seq_of_row, kv_lens.shape[0] - 1)
    q_len = cu_q_lens[seq_of_row + 1] - cu_q_lens[seq_of_row]
    offset_in_chunk = rows - cu_q_lens[seq_of_row]
    position_of_row = kv_lens[seq_of_row] - q_len + offset_in_chunk
    return seq_of_row, position_of_row, live_row


def ragged_paged_attention_reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                     *, sm_scale, sliding_window=None, soft_cap=None):
    """Causal attention of ragged query rows over paged K/V, with an online softmax.

    Row t of sequence s sits at position p = kv_lens[s] - q_len[s] + (t - cu_q_lens[s]) and
    attends keys j with j <= p (and p - j < sliding_window when set). Scores are
    soft_cap * tanh(score / soft_cap) when soft_cap is set. Padding rows return zeros and
    read only page 0.

    Returns:
      out [T, num_q_heads, head_dim] in q's dtype.
    """
    num_rows, num_q_heads, head_dim = q.shape
    _, page_size, two_kv_heads, _ = kv_pages.shape
    num_kv_heads = two_kv_heads // 2
    group = num_q_heads // num_kv_heads
    max_pages = page_indices.shape[1]
    block = min(_PAGES_PER_BLOCK, max_pages)
    block_tokens = block * page_size

    seq_of_row, position_of_row, live_row = row_metadata(kv_lens, cu_q_lens, num_seqs, num_rows)
    # Padding rows see an empty context and gather page 0 only.
    pages_of_row = jnp.where(live_row[:, None], page_indices[seq_of_row], 0)  # i32[T, P]
    pad = (-max_pages) % block
    pages_of_row = jnp.pad(pages_of_row, ((0, 0), (0, pad)))
    queries = (q.astype(jnp.float32) * sm_scale).reshape(num_rows, num_kv_heads, group, head_dim)

    def body(block_index, carry):
        running_max, running_sum, acc = carry
        first = block_index * block
        pages = jax.lax.dynamic_slice_in_dim(pages_of_row, first, block, axis=1)  # i32[T, block]
        kv = kv_pages[pages].reshape(num_rows, block_tokens, two_kv_heads, head_dim)
        kv = kv.astype(jnp.float32)
        keys, values = kv[:, :, 0::2], kv[:, :, 1::2]  # [T, block_tokens, Hkv, D]
        scores = jnp.einsum("tkgd,tskd->tkgs", queries, keys)
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        key_pos = first * page_size + jnp.arange(block_tokens, dtype=jnp.int32)
        visible = (key_pos[None, :] <= position_of_row[:, None]) & live_row[:, None]
        if sliding_window is not None:
            visible &= position_of_row[:, None] - key_pos[None, :] < sliding_window
        scores = jnp.where(visible[:, None, None, :], scores, _MASK_VALUE)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        weights = jnp.exp(scores - new_max[..., None]) * visible[:, None, None, :]
        rescale = jnp.exp(running_max - new_max)
        running_sum = running_sum * rescale + weights.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("tkgs,tskd->tkgd", weights, values)
        return new_max, running_sum, acc

    # Only the blocks that hold some live context are visited.
    longest = jnp.max(jnp.where(jnp.arange(kv_lens.shape[0]) < num_seqs[0], kv_lens, 0))
    num_blocks = (longest + block_tokens - 1) // block_tokens
    init = (jnp.full((num_rows, num_kv_heads, group), _MASK_VALUE, jnp.float32),
            jnp.zeros((num_rows, num_kv_heads, group), jnp.float32),
            jnp.zeros((num_rows, num_kv_heads, group, head_dim), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.maximum(total, 1e-30)[..., None]
    return out.reshape(num_rows, num_q_heads, head_dim).astype(q.dtype)
