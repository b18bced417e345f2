"""DeviceTimeline: the device's idle time while the host is busy in Python is seen as idle."""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from engine.worker.timeline import DeviceTimeline

HOST_WORK_S = 0.030   # Python work between two dispatches, holding the GIL throughout


def _hold_the_gil(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_idle_while_the_host_runs_python_is_counted():
    # The waiter thread stamps a computation's end once it holds the GIL again. The engine
    # thread runs Python between dispatches, so with the interpreter's default 5 ms switch
    # interval each stamp came up to 5 ms late, and that much idle time went missing.
    step = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((8,), jnp.float32)
    step(x).block_until_ready()              # compiled before anything is timed
    before = sys.getswitchinterval()
    timeline = DeviceTimeline()
    repeats = 5
    for _ in range(repeats):
        y = step(x)
        timeline.record(y)
        _hold_the_gil(HOST_WORK_S)
    summary = timeline.summary()
    assert sys.getswitchinterval() == before   # restored once the timeline is summed
    # Each gap is HOST_WORK_S less the (microseconds of) computation; stamps 5-10 ms late
    # (the default interval) took that off each of the repeats - 1 gaps counted.
    assert summary.idle_s > (repeats - 1) * (HOST_WORK_S - 0.003), summary
    assert summary.computations == repeats
