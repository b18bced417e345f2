"""Token bitmasks in numpy: the layout the host fills and the sampler reads (no JAX).

A bitmask row is `u32[ceil(V / 32)]`: token t is allowed when bit `t % 32` of word `t // 32`
is set (little-endian bit order, as llguidance and xgrammar write it). Bits past V are
ignored. `pallas_kernels/token_bitmask.py` applies the same layout inside the jitted step.
"""

from __future__ import annotations

import numpy as np


def bitmask_width(vocab_size: int) -> int:
    """Words of one row: ceil(vocab_size / 32)."""
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> np.ndarray:
    """u32[num_rows, ceil(V/32)], every token allowed (an unconstrained row)."""
    return np.full((num_rows, bitmask_width(vocab_size)), 0xFFFFFFFF, np.uint32)


def allowed_token_ids(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a bitmask row allows, ascending.

    Args:
      row: u32[ceil(V/32)].
      vocab_size: V.

    Returns:
      i64[k].
    """
    bits = np.unpackbits(np.ascontiguousarray(row).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray,
                  enabled: np.ndarray | None = None) -> np.ndarray:
    """The reference of `pallas_kernels.token_bitmask.apply_token_bitmask`: a copy of the
    logits with every token the mask forbids at -inf.

    Args:
      logits: f32[S, V].
      bitmask: u32[S, ceil(V/32)].
      enabled: bool[S]; rows where it is False are left as they are (None: all rows).

    Returns:
      f32[S, V].
    """
    num_rows, vocab_size = logits.shape
    if bitmask.shape != (num_rows, bitmask_width(vocab_size)):
        raise ValueError(f"{bitmask.shape=}: expected ({num_rows}, "
                         f"{bitmask_width(vocab_size)}) for {logits.shape=}")
    bits = np.unpackbits(np.ascontiguousarray(bitmask, np.uint32).view(np.uint8), axis=1,
                         bitorder="little")[:, :vocab_size].astype(bool)  # bool[S, V]
    if enabled is not None:
        bits |= ~np.asarray(enabled, bool)[:, None]
    return np.where(bits, logits, -np.inf).astype(logits.dtype)
