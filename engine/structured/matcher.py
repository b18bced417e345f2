"""Matcher: one sequence's position in its grammar (no JAX).

The engine keeps one per constrained sequence, beside its Request. Each step, before the
sampler runs, `fill_bitmask` writes the tokens the grammar allows next into the sequence's
bitmask row; after the step, `accept` advances it by the sampled token. The matcher has
consumed exactly the sequence's output tokens, so a preempted request (which keeps its
output tokens and recomputes their KV) keeps its matcher as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np


class Matcher:
    """The grammar state of one sequence. Not thread-safe: one owner (the engine thread).

    Once the grammar is complete (`is_finished`), only an EOS token is allowed; while it
    may end but also go on (`can_finish`), EOS is allowed beside the grammar's tokens.
    """

    __slots__ = ("_state", "_width", "_eos_token_ids", "_num_accepted")

    def __init__(self, state: Any, bitmask_width: int, eos_token_ids: frozenset[int]):
        self._state = state            # an llguidance.LLMatcher of its own
        self._width = bitmask_width
        self._eos_token_ids = eos_token_ids
        self._num_accepted = 0

    @property
    def state(self) -> Any:
        """The llguidance.LLMatcher behind it (GrammarCompiler.fill_bitmasks batches them)."""
        return self._state

    @property
    def num_accepted(self) -> int:
        """Tokens accepted since the start (or the last reset), less those rolled back."""
        return self._num_accepted

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Writes the allowed next tokens into `out`, a u32[ceil(V/32)] row (a view into the
        step's bitmask is fine). A matcher in an error state (a parser limit hit) allows
        only EOS, so its sequence ends.

        Raises:
          ValueError: `out` is not a C-contiguous u32 row of the compiler's width.
        """
        if out.dtype != np.uint32 or out.shape != (self._width,) or not out.flags.c_contiguous:
            raise ValueError(f"out: {out.dtype}{list(out.shape)} (contiguous: "
                             f"{out.flags.c_contiguous}): expected a contiguous "
                             f"uint32[{self._width}] row")
        self._state.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def accept(self, token_id: int) -> bool:
        """Advances by one sampled token. Returns False, and stays where it was, when the
        grammar does not allow the token (it was not drawn under this matcher's mask)."""
        token_id = int(token_id)
        if token_id in self._eos_token_ids:
            # llguidance's try_consume_tokens refuses EOS once the grammar is complete;
            # consume_token takes it whenever the grammar may end here.
            accepted = self._state.is_accepting() and self._state.consume_token(token_id)
        else:
            accepted = self._state.try_consume_tokens([token_id]) == 1
        self._num_accepted += accepted
        return accepted

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end the sequence (the grammar takes them only where it may end)."""
        return self._eos_token_ids

    def is_finished(self) -> bool:
        """The grammar is complete (or an EOS was accepted): nothing but EOS may follow."""
        return self._state.is_stopped()

    def can_finish(self) -> bool:
        """The output so far is a whole match: EOS is among the allowed tokens."""
        return self._state.is_accepting()

    @property
    def error(self) -> str:
        """The library's message when a parser limit put the matcher in an error state."""
        return self._state.get_error() if self._state.is_error() else ""

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens (speculative decoding, a sequence
        cut back). Raises ValueError for more than were accepted."""
        if not 0 <= num_tokens <= self._num_accepted:
            raise ValueError(f"num_tokens={num_tokens}: expected 0..{self._num_accepted} "
                             "(the tokens accepted)")
        if num_tokens and not self._state.rollback(num_tokens):
            raise ValueError(f"num_tokens={num_tokens}: the matcher could not roll back: "
                             f"{self._state.get_error()}")
        self._num_accepted -= num_tokens

    def reset(self) -> None:
        """Back to the start of the grammar, as if no token had been accepted."""
        self._state.reset()
        self._num_accepted = 0

    def copy(self) -> Matcher:
        """An independent matcher at the same position (a sibling sample forked here)."""
        clone = Matcher(self._state.deep_copy(), self._width, self._eos_token_ids)
        clone._num_accepted = self._num_accepted
        return clone


_executor: Any = None   # an llguidance.LLExecutor, made on the first batch fill
_executor_lock = threading.Lock()


def fill_bitmasks(rows: Sequence[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
    """Fills `bitmask[row]` from each (matcher, row) at once, on the host's cores: one call
    per step for every constrained sequence (llguidance's LLExecutor, without the GIL).
    Rows not named are left as they are.

    Args:
      rows: (matcher, row index) pairs, each row at most once, every matcher of the width
        bitmask.shape[1].
      bitmask: u32[S, ceil(V/32)], C-contiguous; S above every row index.

    Raises:
      ValueError: a bitmask or row that does not fit.
    """
    global _executor
    widths = {matcher._width for matcher, _ in rows}
    if (bitmask.dtype != np.uint32 or bitmask.ndim != 2 or not bitmask.flags.c_contiguous
            or not widths <= {bitmask.shape[1]}):
        raise ValueError(f"bitmask: {bitmask.dtype}{list(bitmask.shape)}: expected a "
                         f"contiguous uint32[S, W], W the matchers' width {sorted(widths)}")
    if any(not 0 <= row < bitmask.shape[0] for _, row in rows):
        raise ValueError(f"rows {[row for _, row in rows]}: expected indices below "
                         f"{bitmask.shape[0]}")
    if not rows:
        return
    with _executor_lock:   # one batch at a time; each already spreads over every core
        if _executor is None:
            import llguidance   # here, not at import: see engine/structured/spec.py
            _executor = llguidance.LLExecutor()
        _executor.unsafe_compute_mask_ptr([(matcher.state, row) for matcher, row in rows],
                                          bitmask.ctypes.data, bitmask.shape[1] * 4,
                                          bitmask.shape[0])
