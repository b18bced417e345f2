"""Batch: the flattened ragged batch of one engine step (docs/design.md's kernel contract)."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(slots=True, frozen=True)
class Batch:
    """All tokens of one step, packed sequence after sequence and padded to a ladder rung.

    T is the token rung; S the sequence capacity of the attention metadata (max_num_seqs);
    P = max_model_len // page_size. Rows >= cu_q_lens[num_seqs] are padding: they write
    page 0 and read nothing live.
    """

    input_ids: jax.Array      # i32[T]      tokens fed this step
    positions: jax.Array      # i32[T]      their positions in their sequences
    slot_mapping: jax.Array   # i32[T]      cache slot (page * page_size + offset) of each row
    cu_q_lens: jax.Array      # i32[S + 1]  sequence s owns rows cu_q_lens[s]:cu_q_lens[s+1]
    kv_lens: jax.Array        # i32[S]      context length of s after this step
    page_indices: jax.Array   # i32[S, P]   page table of s
    num_seqs: jax.Array       # i32[1]      real sequences


jax.tree_util.register_dataclass(
    Batch, data_fields=[f.name for f in dataclasses.fields(Batch)], meta_fields=[])
