"""The penalty token counts a runner keeps on its device(s) from step to step.

A penalised request's output-token counts and prompt tokens live in one slot of the
`PenaltyState` (engine/worker/step.py; counts i32[R, V], prompt_seen bool[R, V], R =
max_num_seqs), donated through the sampler, which counts each draw in the row's slot. The
host's table of which request holds which slot is engine/worker/penalty_slots.py; this
module joins the two: it picks each row's slot before a sampler call, fills a slot from the
request's history when the table does not trust it, and starts over when a failure may have
lost the state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from engine.core.request import Request, ScheduledRequest
from engine.worker.host_arrays import empty_slot_history, output_position, slot_history
from engine.worker.penalty_slots import PenaltySlots
from engine.worker.step import PenaltyState


class DevicePenalties:
    """The PenaltyState on the device and the table of its slots.

    init_slot: the jitted init_penalty_slot (step.py), which multi-host serving wraps to
    broadcast each call (engine/worker/multihost.py)."""

    def __init__(self, num_slots: int, vocab_size: int, max_model_len: int, sharding,
                 init_slot: Callable):
        self.max_model_len = max_model_len
        self._shape = (num_slots, vocab_size)   # [R, V]
        self._sharding = sharding
        self.init_slot = init_slot
        self.slots = PenaltySlots(num_slots)
        self.state = self._new_state()

    def warm_up(self, no_draws: jax.Array) -> None:
        """Compiles init_slot by filling slot 0 with nothing (no slot is held yet)."""
        self.state = self.init_slot(self.state, *empty_slot_history(self.max_model_len),
                                    no_draws)

    def slots_for(self, scheduled: Sequence[ScheduledRequest], chosen: Sequence[Request],
                  previous_rows: Mapping[str, int], previous_draws: jax.Array) -> list[int]:
        """Each row's slot: -1 for a row without penalties or whose draw is not kept (a
        prefill chunk, a request finished since it was scheduled). A slot that does not hold
        exactly the request's outputs before this draw is filled first, from the host's
        history and, for a token still in flight, row previous_rows[request_id] of
        `previous_draws` (the previous step's draws, i32[max_num_seqs])."""
        slots, in_step = [], set()
        for item, request in zip(scheduled, chosen):
            if not (item.sample and request.sampling_params.has_penalties
                    and not request.is_finished):
                slots.append(-1)
                continue
            position = output_position(request)
            slot, fresh = self.slots.take(request, position, in_step)
            if fresh:
                try:
                    tokens, pending_row = slot_history(request, position, self.max_model_len,
                                                       previous_rows)
                except RuntimeError:
                    self.slots.forget()   # `slot` was counted as filled
                    raise
                self.state = self.init_slot(
                    self.state, np.asarray(slot, np.int32), tokens,
                    np.asarray(request.num_prompt_tokens, np.int32),
                    np.asarray(pending_row, np.int32), previous_draws)
            slots.append(slot)
            in_step.add(slot)
        return slots

    def reset(self) -> None:
        """Trusts no slot any more: each penalised request's slot is filled again from its
        history when it next draws. Call when a step is rolled back or run again (its draws
        are counted already). Re-creates the PenaltyState when a failed sampler call lost it
        (it is donated, as the KV cache is)."""
        self.slots.forget()
        if is_lost(self.state):
            self.state = self._new_state()

    def _new_state(self) -> PenaltyState:
        return jax.device_put(PenaltyState(np.zeros(self._shape, np.int32),
                                           np.zeros(self._shape, np.bool_)), self._sharding)


def is_lost(tree) -> bool:
    """Whether a donated device tree was lost by a failed call: deleted, or holding the
    error its computation raised (dispatch being asynchronous, it surfaces later)."""
    try:
        if any(array.is_deleted() for array in jax.tree.leaves(tree)):
            return True
        jax.block_until_ready(tree)   # raises what its computation raised
    except Exception:  # noqa: BLE001 - an array that cannot be read is lost too
        return True
    return False
