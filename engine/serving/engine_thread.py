"""EngineThread: the one thread that owns an LLMEngine while HTTP threads talk to it.

The engine is not thread-safe. HTTP threads never touch it: they put commands (add, abort,
stop) on one queue, and each request's sink gets its outputs through callbacks that the engine
thread makes after every step. A request the engine fails alone (its step_failures) gets its
error; a step that raises fails every live request, then the engine recovers (state
"recovering", "failed" while recovery keeps failing, then "ready" again) and the thread keeps
running. With a step timeout, a watchdog thread fails every live request of a step that runs
longer (a multi-host follower that hangs) and the state reads "failed" until the step returns;
nothing waits on the stuck step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Protocol

from engine.info import EngineStats
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Receives one engine request's events, on the engine thread (must be quick)."""

    def on_scheduled(self, request_id: str, when: float) -> None: ...
    def on_output(self, output: RequestOutput, when: float) -> None: ...
    def on_error(self, request_id: str, error: Exception, when: float) -> None: ...


class Unavailable(Exception):
    """The engine cannot take the request now (warming up, overloaded, shutting down)."""


class StepStalled(Unavailable):
    """A step ran past the step timeout; its requests were failed without waiting for it."""


class EngineThread:
    """Builds (and warms) the engine in the background, then runs it step by step.

    Args:
      engine: an LLMEngine, or a callable that builds one (called on this thread).
      max_queue: most engine requests queued or running at once; more is Unavailable.
      on_failure: called (on this thread) when building the engine fails.
      retry_seconds: pause between attempts to recover an engine whose step raised.
      step_timeout: seconds one step may run before its requests are failed and the state
        reads "failed" (None: no limit).
    """

    def __init__(self, engine: Any | Callable[[], Any], *, max_queue: int = 1024,
                 on_failure: Callable[[BaseException], None] | None = None,
                 retry_seconds: float = 2.0, step_timeout: float | None = None):
        self._factory = engine if callable(engine) else (lambda: engine)
        self.max_queue = max_queue
        self._on_failure = on_failure
        self.retry_seconds = retry_seconds
        self.engine = None
        self._state = "warming"   # warming | ready | recovering | failed | stopping | stopped
        self._retry_at = 0.0
        self.stats: EngineStats | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0             # reserved engine requests not finished yet
        self._live: dict[str, Sink] = {}
        self._unscheduled: set[str] = set()
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.step_timeout = step_timeout
        self._step_started: float | None = None   # guarded by _lock, as is _stalled
        # Requests the watchdog failed, still in the engine (None: it has not fired).
        self._stalled: list[str] | None = None

    def start(self) -> EngineThread:
        self._thread.start()
        if self.step_timeout is not None:
            threading.Thread(target=self._watch_steps, name="engine-watchdog",
                             daemon=True).start()
        return self

    # ------------------------------------------------------------------ HTTP threads
    @property
    def state(self) -> str:
        """warming | ready | recovering | failed | stopping | stopped: "ready" only while
        the engine serves (a step being isolated inside the engine reads "recovering")."""
        if self._state == "ready" and self.engine.is_recovering:
            return "recovering"
        return self._state

    def reserve(self, count: int) -> None:
        """Holds room for `count` engine requests; raises Unavailable (a 503) otherwise."""
        with self._lock:
            state = self.state
            if state != "ready":
                raise Unavailable(_REFUSALS.get(state, "the server is shutting down"))
            if self._pending + count > self.max_queue:
                raise Unavailable(f"the server is overloaded ({self._pending} requests in "
                                  f"flight, at most {self.max_queue})")
            self._pending += count

    def release(self, count: int) -> None:
        """Gives back reserved room that was never used by add()."""
        with self._lock:
            self._pending -= count

    def add(self, request_id: str, prompt: dict, params: SamplingParams, sink: Sink, *,
            tenant: str = "") -> None:
        """Queues a request reserved with reserve(); `tenant` is its fair-share group."""
        self._commands.put(("add", request_id, prompt, params, sink, tenant))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def request_stop(self, drain_seconds: float) -> None:
        """Stops admitting (reserve raises Unavailable); running requests may finish for
        `drain_seconds`, then are aborted (their sinks get final outputs) and the thread ends.
        Does not block: safe in a signal handler."""
        if self._state in ("warming", "ready", "recovering"):
            self._state = "stopping"
        self._commands.put(("stop", time.monotonic() + drain_seconds))

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the thread to end; True if it has."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def num_pending(self) -> int:
        return self._pending

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as error:  # noqa: BLE001 - reported, then the thread ends
            logger.exception("the engine failed to start")
            self._state = "failed"
            if self._on_failure is not None:
                self._on_failure(error)
            return
        with self._lock:
            if self._state == "warming":
                self._state = "ready"
        self._publish_stats()
        logger.info("engine ready")
        while self.engine.has_unfinished_requests() or time.monotonic() < self._deadline:
            try:
                self._iterate()
            except Exception:  # noqa: BLE001 - a bug here must not end serving
                logger.exception("engine thread: unexpected error; continuing")
                time.sleep(0.01)
        self._refuse_queued()
        self._state = "stopped"

    def _iterate(self) -> None:
        """Applies queued commands (blocking while idle), then runs one step."""
        if self._state in ("recovering", "failed") and time.monotonic() >= self._retry_at:
            self._recover()
        self._apply_commands(block=not self.engine.has_unfinished_requests())
        if time.monotonic() >= self._deadline and self._live:
            logger.info("shutdown: aborting %d unfinished requests", len(self._live))
            for request_id in list(self._live):
                self._abort(request_id)
        if self.engine.has_unfinished_requests():
            self._step()
        self._publish_stats()

    def _refuse_queued(self) -> None:
        # Requests reserved before the stop but queued after the last step get a clean refusal.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                with self._lock:
                    self._pending -= 1
                _call(command[4].on_error, command[1], Unavailable("the server is shutting down"),
                      time.monotonic())

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind = command[0]
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._abort(command[1])
            else:
                self._deadline = min(self._deadline, command[1])
                self._state = "stopping"
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, request_id: str, prompt: dict, params: SamplingParams, sink: Sink,
             tenant: str) -> None:
        try:
            if self._state in ("recovering", "failed"):   # reserved before the failure
                raise Unavailable(_REFUSALS[self._state])
            self.engine.add_request(request_id, prompt, params, tenant=tenant)
        except Exception as error:  # noqa: BLE001 - the request fails, the engine goes on
            if not isinstance(error, (ValueError, Unavailable)):
                logger.exception("request %s: add_request failed", request_id)
            self._finish(request_id)
            _call(sink.on_error, request_id, error, time.monotonic())
            return
        self._live[request_id] = sink
        self._unscheduled.add(request_id)

    def _abort(self, request_id: str) -> None:
        sink = self._live.get(request_id)
        if sink is None:
            return   # finished already: its final output has been delivered
        try:
            output = self.engine.abort(request_id)
        except Exception as error:  # noqa: BLE001
            logger.exception("request %s: abort failed", request_id)
            self._finish(request_id)
            _call(sink.on_error, request_id, error, time.monotonic())
            return
        self._finish(request_id)
        if output is not None:
            _call(sink.on_output, output, time.monotonic())

    def _step(self) -> None:
        started = time.monotonic()
        with self._lock:
            self._step_started = started
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - the engine could not recover on its own
            self._end_step()
            self._fail_all(error)
            return
        if self._end_step():
            return
        finished_at = time.monotonic()
        self._note_scheduled(started)
        failures = self.engine.step_failures
        for output in outputs:
            sink = self._live.get(output.request_id)
            if sink is None:
                continue
            if output.finished:
                self._finish(output.request_id)
            error = failures.get(output.request_id)
            if error is not None:
                _call(sink.on_error, output.request_id, error, finished_at)
            else:
                _call(sink.on_output, output, finished_at)

    def _fail_all(self, error: Exception) -> None:
        """step() raised: fails every live request, then recovers the engine."""
        logger.exception("engine step failed; failing its %d requests: %s",
                         len(self._live), sorted(self._live))
        with self._lock:
            if self._state == "ready":
                self._state = "recovering"
        for request_id, sink in list(self._live.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                logger.exception("request %s: abort after a failed step failed", request_id)
            self._finish(request_id)
            _call(sink.on_error, request_id, error, time.monotonic())
        self._recover()

    def _end_step(self) -> bool:
        """After a step: True if the watchdog failed its requests meanwhile; those are then
        aborted in the engine and the engine recovers."""
        with self._lock:
            self._step_started = None
            stalled, self._stalled = self._stalled, None
        if stalled is None:
            return False
        logger.warning("the stalled step finished after all; aborting its %d requests",
                       len(stalled))
        for request_id in stalled:
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                logger.exception("request %s: abort after a stalled step failed", request_id)
        self._recover()
        return True

    def _watch_steps(self) -> None:
        """The watchdog: fails the live requests of a step running past step_timeout."""
        timeout = self.step_timeout
        while self._state != "stopped":
            time.sleep(min(1.0, timeout / 4))
            with self._lock:
                started = self._step_started
                if (started is None or self._stalled is not None
                        or time.monotonic() - started <= timeout):
                    continue
                # The engine thread is inside step() and touches _live only after taking
                # _lock in _end_step: these are safe to take over here.
                live, self._live = self._live, {}
                self._unscheduled.clear()
                self._pending -= len(live)
                self._stalled = list(live)
                if self._state in ("ready", "recovering"):
                    self._state = "failed"
            logger.error("an engine step has run for more than %g s (a multi-host follower "
                         "may hang); failing its %d requests", timeout, len(live))
            error = StepStalled(f"an engine step ran for more than {timeout:g} s (the step "
                                "timeout; on several hosts a follower may hang): the server is "
                                "not serving until it finishes")
            for request_id, sink in live.items():
                _call(sink.on_error, request_id, error, time.monotonic())

    def _recover(self) -> None:
        # While recovery fails the state is "failed" (/health answers 503) and it is tried
        # again every retry_seconds; "stopping" is left alone.
        try:
            self.engine.recover()
        except Exception:  # noqa: BLE001 - retried
            logger.exception("engine recovery failed; trying again in %.1f s",
                             self.retry_seconds)
            with self._lock:
                if self._state in ("recovering", "failed"):
                    self._state = "failed"
            self._retry_at = time.monotonic() + self.retry_seconds
            return
        with self._lock:
            if self._state in ("recovering", "failed"):
                self._state = "ready"
                logger.info("engine recovered; serving again")

    def _note_scheduled(self, when: float) -> None:
        # A request counts as scheduled once its first sample has left the waiting queue
        # (its queue time ends at that step's start).
        for request_id in list(self._unscheduled):
            if not self.engine.is_waiting(request_id):
                self._unscheduled.discard(request_id)
                sink = self._live.get(request_id)
                if sink is not None:
                    _call(sink.on_scheduled, request_id, when)

    def _finish(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        self._unscheduled.discard(request_id)
        with self._lock:
            self._pending -= 1

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()


_REFUSALS = {"warming": "the model is warming up",
             "recovering": "the engine is recovering from a failure",
             "failed": "the engine has failed and is not serving"}


def _call(callback: Callable, *args) -> None:
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - a sink's bug must not stop the engine thread
        logger.exception("a request sink failed")
