"""Which slot of the device's PenaltyState holds which request's token counts (host only).

A penalised request keeps its counts on the device (engine/worker/step.py: PenaltyState),
one slot per request, counted on by each sampler call that draws for it. This table is the
host's record of them: a slot is trusted only while it holds exactly the outputs the next
draw follows (`accounted`); any other case (a new request, a step rolled back or run again,
a slot taken by another) fills the slot again from the request's history. So correctness
never depends on keeping a slot, and forgetting them all (`forget`) is always safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.request import Request


@dataclass(slots=True)
class _Holder:
    request: Request
    slot: int
    accounted: int   # output tokens its counts include, draws dispatched but not back included
    last_used: int   # the clock when a row last drew with it


class PenaltySlots:
    """Slots 0 .. num_slots - 1, assigned to requests keyed by (request_id, arrival_index)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._holders: dict[tuple[str, int], _Holder] = {}
        self._clock = 0   # counts takes: orders the slots by last use

    def take(self, request: Request, position: int, in_step: set[int]) -> tuple[int, bool]:
        """The slot a row of `request` drawing output `position` counts in, and whether the
        caller must fill it first (init_penalty_slot): True unless the request's slot holds
        exactly its outputs before `position`. Counts the draw as made (accounted =
        position + 1). `in_step`: slots other rows of this dispatch use, never taken.

        Raises:
          RuntimeError when every slot is in this step (more rows than slots).
        """
        self._clock += 1
        key = (request.request_id, request.arrival_index)
        holder = self._holders.get(key)
        fresh = holder is None or holder.accounted != position
        if holder is None:
            holder = _Holder(request, self._free_slot(in_step), position, 0)
            self._holders[key] = holder
        holder.accounted = position + 1
        holder.last_used = self._clock
        return holder.slot, fresh

    def forget(self) -> None:
        """Trusts no slot any more (a step failed or was rolled back: the device's counts
        may include draws that never happened, or the state itself was re-created)."""
        self._holders.clear()

    def _free_slot(self, in_step: set[int]) -> int:
        """A slot held by no one; else one whose request has finished; else the least
        recently used one outside this step (its request fills a slot again when next
        drawn for)."""
        held = {holder.slot for holder in self._holders.values()}
        for slot in range(self.num_slots):
            if slot not in held:
                return slot
        candidates = [(key, holder) for key, holder in self._holders.items()
                      if holder.slot not in in_step]
        if not candidates:
            raise RuntimeError(f"every one of the {self.num_slots} penalty slots is in this "
                               "step: expected at most max_num_seqs penalised rows")
        finished = [item for item in candidates if item[1].request.is_finished]
        key, holder = finished[0] if finished else min(
            candidates, key=lambda item: item[1].last_used)
        del self._holders[key]
        return holder.slot
