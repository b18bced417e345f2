"""Random flattened ragged batches (docs/design.md's kernel contract) and a dense attention to
check them against.

Every page no live sequence owns is NaN, and so is the tail of each sequence's last page,
and page-table entries past a sequence's pages point at NaN pages: a kernel that reads one
byte it should not returns NaN.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(slots=True)
class RaggedBatch:
    q: jnp.ndarray             # [T, Hq, D]
    kv_pages: jnp.ndarray      # [num_pages, page_size, 2 * Hkv, D]
    kv_lens: jnp.ndarray       # i32[S]
    page_indices: jnp.ndarray  # i32[S, P]
    cu_q_lens: jnp.ndarray     # i32[S + 1]
    num_seqs: jnp.ndarray      # i32[1]

    def args(self):
        return (self.q, self.kv_pages, self.kv_lens, self.page_indices, self.cu_q_lens,
                self.num_seqs)


def random_batch(rng, q_lens, cached_lens, *, page_size, num_q_heads, num_kv_heads, head_dim,
                 dtype, pad_rows=3, pad_seqs=1, spare_pages=4):
    """q_lens[s] new rows after cached_lens[s] cached tokens, for each live sequence s."""
    q_lens, cached_lens = np.asarray(q_lens), np.asarray(cached_lens)
    kv_lens = q_lens + cached_lens
    live_seqs = len(q_lens)
    max_seqs = live_seqs + pad_seqs
    pages_needed = -(-kv_lens // page_size)
    max_pages = int(pages_needed.max()) + 1
    num_pages = 1 + int(pages_needed.sum()) + spare_pages       # page 0: padding only
    order = rng.permutation(np.arange(1, num_pages))
    nan_pages = order[int(pages_needed.sum()):]

    kv = np.full((num_pages, page_size, 2 * num_kv_heads, head_dim), np.nan, np.float32)
    page_indices = rng.choice(nan_pages, size=(max_seqs, max_pages)).astype(np.int32)
    next_page = 0
    for s in range(live_seqs):
        pages = order[next_page:next_page + pages_needed[s]]
        next_page += pages_needed[s]
        page_indices[s, :pages_needed[s]] = pages
        for i, page in enumerate(pages):
            used = min(page_size, kv_lens[s] - i * page_size)
            kv[page, :used] = rng.normal(size=(used, 2 * num_kv_heads, head_dim))

    num_rows = int(q_lens.sum()) + pad_rows
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens), np.full(pad_seqs, q_lens.sum())])
    padded_kv_lens = np.concatenate([kv_lens, rng.integers(1, page_size * 2, pad_seqs)])
    q = rng.normal(size=(num_rows, num_q_heads, head_dim))
    return RaggedBatch(q=jnp.asarray(q, dtype), kv_pages=jnp.asarray(kv, dtype),
                       kv_lens=jnp.asarray(padded_kv_lens, jnp.int32),
                       page_indices=jnp.asarray(page_indices, jnp.int32),
                       cu_q_lens=jnp.asarray(cu_q_lens, jnp.int32),
                       num_seqs=jnp.asarray([live_seqs], jnp.int32))


def dense_attention(batch: RaggedBatch, *, sm_scale, sliding_window=None, soft_cap=None):
    """Causal attention sequence by sequence in float64 numpy, from contiguous K/V: [T, Hq, D]."""
    q = np.asarray(batch.q, np.float64)
    kv = np.asarray(batch.kv_pages, np.float64)
    num_kv_heads = kv.shape[2] // 2
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    cu, kv_lens = np.asarray(batch.cu_q_lens), np.asarray(batch.kv_lens)
    for s in range(int(batch.num_seqs[0])):
        pages = np.asarray(batch.page_indices[s])
        kv_len = kv_lens[s]
        context = kv[pages].reshape(-1, 2 * num_kv_heads, q.shape[2])[:kv_len]
        keys = np.repeat(context[:, 0::2], group, axis=1)                  # [L, Hq, D]
        values = np.repeat(context[:, 1::2], group, axis=1)
        rows = q[cu[s]:cu[s + 1]]                                          # [n, Hq, D]
        positions = kv_len - len(rows) + np.arange(len(rows))
        scores = np.einsum("nhd,lhd->hnl", rows, keys) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        key_pos = np.arange(kv_len)
        visible = key_pos[None, :] <= positions[:, None]
        if sliding_window is not None:
            visible &= positions[:, None] - key_pos[None, :] < sliding_window
        scores = np.where(visible[None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[cu[s]:cu[s + 1]] = np.einsum("hnl,lhd->nhd", weights, values)
    return out
