"""When the device works and when it waits for the host: a measurement for benchmarks.

Each computation the runner dispatches (forward, sampler, prompt logprobs) is recorded with
its dispatch time; a waiter thread blocks until the computation's output is ready and records
that time. The computations of consecutive steps form one chain (each reads the one before:
the KV cache, the hidden states, the draws), so computation i starts at
max(dispatched_i, done_{i-1}), and the device waits for the host whenever dispatched_i comes
after done_{i-1}. Off unless a benchmark attaches one (`Runner.timeline`): it costs a thread
wake-up per computation.

A computation is stamped as dispatched when its call returns. The host's time inside the
jitted calls is summed apart (`dispatch_s`, Runner._dispatch): a call that returns only once
the device has caught up shows there, and the device's work during that wait is counted as
idle, not busy (scripts/bench_dispatch.py finds such calls).

The waiter can stamp a computation's end only once it holds the GIL again, and the engine
thread, running the host's Python work between dispatches, holds it: at the interpreter's
default switch interval (5 ms) each stamp came 5-10 ms late, so a host-bound run showed
little idle time (a tiny model at 256 sequences on this project's 2-core VM: 12% idle with
the default interval, 47% with 0.1 ms; tests/engine/test_timeline.py). While a timeline is
attached the switch interval is SWITCH_INTERVAL_S, restored by summary(); the waiter's
wake-ups still take the GIL from the engine thread, so a host-bound run is slower with a
timeline attached (that run: 5.7 ms a step without one, 7.4-8.1 ms with it).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass

import jax

SWITCH_INTERVAL_S = 1e-4   # the interpreter's GIL switch interval while a timeline is attached


@dataclass(frozen=True, slots=True)
class TimelineSummary:
    computations: int
    wall_s: float     # first computation's start to the last one's end
    busy_s: float     # the device computing
    idle_s: float     # the device waiting for the host to dispatch
    waited_s: float   # the host blocked on results (Runner.collect)
    dispatch_s: float  # the host inside the jitted calls, launching them (Runner._dispatch)
    busy_by_kind: dict[str, float]   # busy_s by the kind each computation was recorded with
    busy_each: tuple[float, ...] = ()   # each computation's busy seconds, in dispatch order

    @property
    def idle_share(self) -> float:
        return self.idle_s / self.wall_s if self.wall_s else 0.0


class DeviceTimeline:
    """Dispatch and completion times of every computation recorded. Sets the interpreter's
    switch interval until summary() (module docstring): one timeline at a time."""

    def __init__(self):
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self._dispatched: list[float] = []
        self._done: list[float | None] = []
        self._kinds: list[str] = []
        self._waited = 0.0
        self._dispatch = 0.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._wait_each, daemon=True,
                                        name="ember-timeline")
        self._thread.start()

    def record(self, output: jax.Array, kind: str = "") -> None:
        """A computation was just dispatched; `output` is one of its (never donated) outputs;
        `kind` labels it for busy_by_kind (the runner's: "prefill" or "decode" steps)."""
        self._dispatched.append(time.perf_counter())
        self._done.append(None)
        self._kinds.append(kind)
        self._queue.put((len(self._done) - 1, output))

    def add_wait(self, seconds: float) -> None:
        self._waited += seconds

    def add_dispatch(self, seconds: float) -> None:
        self._dispatch += seconds

    @property
    def waited_s(self) -> float:
        """The host's time blocked on results so far (a benchmark reads it between steps)."""
        return self._waited

    def summary(self) -> TimelineSummary:
        """Waits for every recorded computation, then sums the chain; restores the switch
        interval."""
        done = threading.Event()
        self._queue.put((None, done))
        done.wait()
        sys.setswitchinterval(self._switch_interval)
        idle = 0.0
        busy: dict[str, float] = {}
        each = []
        previous_done = None
        for dispatched, finished, kind in zip(self._dispatched, self._done, self._kinds):
            start = dispatched if previous_done is None else max(dispatched, previous_done)
            if previous_done is not None:
                idle += max(0.0, dispatched - previous_done)
            each.append(max(0.0, finished - start))
            busy[kind] = busy.get(kind, 0.0) + each[-1]
            previous_done = finished
        wall = (self._done[-1] - self._dispatched[0]) if self._done else 0.0
        return TimelineSummary(len(self._done), wall, sum(busy.values()), idle, self._waited,
                               self._dispatch, busy, tuple(each))

    def _wait_each(self) -> None:
        while True:
            index, output = self._queue.get()
            if index is None:
                output.set()
                continue
            try:
                jax.block_until_ready(output)
            except Exception:  # noqa: BLE001 - a failed step ends when it fails
                pass
            self._done[index] = time.perf_counter()
