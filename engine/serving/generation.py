"""Generation: one HTTP request's engine requests, from admission to its one ledger row.

The engine thread calls its sink methods (on_output, on_error, on_scheduled); the HTTP thread
reads the events in order through `updates()`, which also notices a client that went away.
Whoever ends the request (the HTTP thread, a disconnect, or the shutdown sweep) calls
`finalize`, which writes the ledger row exactly once with the engine's usage.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

from engine.openai.formatting import add_usage
from engine.openai.prompts import EnginePrompt
from engine.outputs import RequestOutput, Usage
from engine.sampling_params import SamplingParams
from engine.serving.engine_thread import EngineThread
from engine.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1        # how often a waiting request checks its client's socket
PROGRESS_INTERVAL_S = 5.0     # how often a long request records its progress in the ledger
ABORT_WAIT_S = 10.0           # how long an abort waits for the engine's final outputs


class ClientGone(Exception):
    """The client closed its connection before the response was complete."""


class ClientWatch:
    """Notices a closed client connection by peeking at the socket gunicorn hands the app."""

    def __init__(self, sock: socket.socket | None):
        # A TLS socket cannot peek without reading the record layer: rely on failed writes.
        plain = isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)
        self._sock = sock if plain else None

    def gone(self) -> bool:
        if self._sock is None:
            return False
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False      # connected, nothing sent: the normal case
        except OSError:
            return True


class Generation:
    """Engine requests `{response_id}-{i}`, one per prompt, and the ledger row `response_id`."""

    def __init__(self, *, response_id: str, prompts: list[EnginePrompt],
                 params: SamplingParams, key: Any, model: str, ledger: Any,
                 metrics: ServerMetrics, engine: EngineThread, arrival: float,
                 on_final: Callable[[Generation], None] = lambda generation: None):
        self.response_id, self.prompts, self.params = response_id, prompts, params
        self.key, self.model, self._ledger, self._metrics = key, model, ledger, metrics
        self._engine, self.arrival, self._on_final = engine, arrival, on_final
        self.request_ids = [f"{response_id}-{i}" for i in range(len(prompts))]
        self._index = {request_id: i for i, request_id in enumerate(self.request_ids)}
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self.errors: list[Exception | None] = [None] * len(prompts)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done: set[int] = set()
        self._last_token_at: list[float | None] = [None] * len(prompts)
        self._tokens_seen = [0] * len(prompts)
        self._lock = threading.Lock()
        self.usage: Usage | None = None
        self.status: str | None = None

    def submit(self) -> None:
        """Hands every prompt to the engine thread (the ledger row is admitted already)."""
        for request_id, prompt in zip(self.request_ids, self.prompts):
            self._engine.add(request_id, prompt.as_engine_prompt(), self.params, self)

    # ------------------------------------------------------------------ engine thread
    def on_scheduled(self, request_id: str, when: float) -> None:
        self._events.put(("scheduled", self._index[request_id], when, None))

    def on_output(self, output: RequestOutput, when: float) -> None:
        index = self._index[output.request_id]
        self.latest[index] = output
        # The event is small; a client slower than the engine holds only the newest output.
        num_tokens = sum(len(o.token_ids) for o in output.outputs)
        self._events.put(("output", index, when, (num_tokens, output.finished)))

    def on_error(self, request_id: str, error: Exception, when: float) -> None:
        index = self._index[request_id]
        self.errors[index] = error
        self._events.put(("error", index, when, error))

    # ------------------------------------------------------------------ HTTP thread
    @property
    def finished(self) -> bool:
        return len(self._done) == len(self.prompts)

    def updates(self, watch: ClientWatch) -> Iterator[dict[int, RequestOutput | Exception]]:
        """Yields {prompt index: its newest output or error} for what changed (events that
        queued meanwhile are merged); returns once every engine request has finished.

        Raises:
          ClientGone: the client closed the connection (the caller aborts).
        """
        next_watch = time.monotonic() + WATCH_INTERVAL_S
        next_progress = time.monotonic() + PROGRESS_INTERVAL_S
        while not self.finished:
            changed: dict[int, RequestOutput | Exception] = {}
            try:
                event = self._events.get(timeout=WATCH_INTERVAL_S)
                while True:
                    self._note(event, changed)
                    event = self._events.get_nowait()
            except queue.Empty:
                pass
            now = time.monotonic()
            if now >= next_watch:
                if watch.gone():
                    raise ClientGone(self.response_id)
                next_watch = now + WATCH_INTERVAL_S
            if now >= next_progress:
                self._record_progress()
                next_progress = now + PROGRESS_INTERVAL_S
            if changed:
                yield changed

    def _note(self, event: tuple, changed: dict) -> None:
        kind, index, when, payload = event
        metrics = self._metrics
        if kind == "scheduled":
            metrics.queue_time.observe(when - self.arrival)
            return
        if kind == "error":
            changed[index] = payload
            self._done.add(index)
            return
        changed[index] = self.latest[index]
        num_tokens, finished = payload
        if num_tokens > self._tokens_seen[index]:
            self._tokens_seen[index] = num_tokens
            last = self._last_token_at[index]
            if last is None:
                metrics.time_to_first_token.observe(when - self.arrival)
            else:
                metrics.inter_token_latency.observe(when - last)
            self._last_token_at[index] = when
        if finished:
            metrics.e2e_latency.observe(when - self.arrival)
            self._done.add(index)

    def wait(self, watch: ClientWatch) -> None:
        """Blocks until every engine request has finished (non-streaming responses)."""
        for _ in self.updates(watch):
            pass

    def abort(self, status: str = "aborted") -> Usage:
        """Aborts what still runs, waits for the engine's final outputs, finalizes."""
        for index, request_id in enumerate(self.request_ids):
            if index not in self._done:
                self._engine.abort(request_id)
        deadline = time.monotonic() + ABORT_WAIT_S
        while not self.finished and time.monotonic() < deadline:
            try:
                self._note(self._events.get(timeout=0.1), {})
            except queue.Empty:
                pass
        return self.finalize(status)

    def final_status(self) -> str:
        if any(error is not None for error in self.errors):
            return "error"
        if any(output is None or any(o.finish_reason == "abort" for o in output.outputs)
               for output in self.latest):
            return "aborted"
        return "completed"

    def current_usage(self) -> Usage:
        total = Usage(0, 0, 0)
        for output in self.latest:
            if output is not None:
                total = add_usage(total, output.usage)
        return total

    def finalize(self, status: str | None = None) -> Usage:
        """Writes the ledger row once (later calls return the first result)."""
        with self._lock:
            if self.usage is not None:
                return self.usage
            usage, status = self.current_usage(), status or self.final_status()
            try:
                self._ledger.finalize(self.response_id, status, usage.prompt_tokens,
                                      usage.cached_tokens, usage.completion_tokens)
            except Exception:  # noqa: BLE001 - the response still goes out; the row stays open
                logger.exception("request %s: the ledger could not finalize it", self.response_id)
            self._metrics.count_request(getattr(self.key, "name", "?"), status, usage)
            self.usage, self.status = usage, status
        self._on_final(self)
        return usage

    def _record_progress(self) -> None:
        usage = self.current_usage()
        try:
            self._ledger.update_progress(self.response_id, usage.prompt_tokens,
                                         usage.cached_tokens, usage.completion_tokens)
        except Exception:  # noqa: BLE001
            logger.exception("request %s: the ledger could not record progress",
                             self.response_id)
