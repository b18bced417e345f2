"""Token bitmask: structured output's allowed tokens applied to the logits before the draw.

The host fills one row per constrained sequence (engine/structured: token t allowed when bit
t % 32 of word t // 32 is set); rows with `enabled` False pass through untouched, so one
compiled step serves a batch that mixes constrained and free sequences. The step compiles
this in only for batches with some constrained row (a bucket flag, like penalties), so a
free batch pays nothing, and no schema ever changes a shape.

Plain jnp: the bits are unpacked by a broadcast shift (no gather), [S, W, 32] -> [S, V], and
XLA fuses the select into the sampler's first read of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS_PER_WORD = 32


@jax.jit
def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array, enabled: jax.Array) -> jax.Array:
    """Sets the logits of forbidden tokens to -inf in the enabled rows.

    Args:
      logits: f32[S, V] (any float dtype).
      bitmask: u32[S, ceil(V / 32)]; bits past V are ignored.
      enabled: bool[S]; False rows are returned unchanged.

    Returns:
      logits' shape and dtype: [S, V].

    Raises:
      ValueError: shapes or dtypes that do not fit together.
    """
    num_rows, vocab_size = logits.shape
    width = -(-vocab_size // BITS_PER_WORD)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"{logits.dtype=}: expected a float dtype")
    if bitmask.shape != (num_rows, width) or bitmask.dtype != jnp.uint32:
        raise ValueError(f"{bitmask.shape=}, {bitmask.dtype=}: expected uint32"
                         f"[{num_rows}, {width}] for {logits.shape=}")
    if enabled.shape != (num_rows,) or enabled.dtype != jnp.bool_:
        raise ValueError(f"{enabled.shape=}, {enabled.dtype=}: expected bool[{num_rows}]")
    shifts = jnp.arange(BITS_PER_WORD, dtype=jnp.uint32)                  # u32[32]
    bits = (bitmask[:, :, None] >> shifts) & jnp.uint32(1)               # u32[S, W, 32]
    allowed = bits.reshape(num_rows, width * BITS_PER_WORD)[:, :vocab_size] == 1  # bool[S, V]
    allowed = allowed | ~enabled[:, None]
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))


def apply_token_bitmask_reference(logits: jax.Array, bitmask: jax.Array,
                                  enabled: jax.Array) -> jax.Array:
    """The same by a per-token gather: word t // 32, bit t % 32 (slow, obviously right)."""
    token = jnp.arange(logits.shape[1])                                   # i32[V]
    words = bitmask[:, token // BITS_PER_WORD]                            # u32[S, V]
    allowed = (words >> (token % BITS_PER_WORD).astype(jnp.uint32)) & 1   # u32[S, V]
    return jnp.where((allowed == 1) | ~enabled[:, None], logits, -jnp.inf).astype(logits.dtype)
