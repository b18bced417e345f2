"""Generation: one HTTP request's engine requests, from admission to its one ledger row.

The engine thread calls its sink methods (on_output, on_error, on_scheduled); the HTTP thread
reads the events in order through `updates()`, which also notices a client that went away.
Whoever ends the request (the HTTP thread, a disconnect, or the shutdown sweep) calls
`finalize`, which writes the ledger row exactly once.

Billing follows what the client was sent, and survives kill -9:
- the prompt's tokens are written with the row at admission (try_admit's prompt_tokens,
  which the Service passes from `prompt_tokens`); submission records them again, and they are
  in the row before the first token is sent whoever admitted it;
- streaming (`updates`): a batch of outputs is the client's once the caller asks for the next
  (every chunk built from it has been written to the socket). Its counts are then recorded
  (`Ledger.record_progress`, batched by the ledger's writer thread), and before a batch goes
  out the row must already hold all but UNRECORDED_TOKENS_PER_CHOICE x choices of the
  completion tokens the client will then have: the stream waits for the writer if not. A
  backlog that would run past that bound (the client, or this thread, slower than the
  engine) is sent in pieces cut between engine steps, each of which adds at most one token
  per choice, and each piece is recorded once sent. So after a crash a row holds between
  R - 8 x choices and R completion tokens, R being what its client received: never a token
  it was not sent;
- non-streaming (`wait`): nothing is sent until the whole body, which carries every generated
  token, so "sent" means generated: counts are recorded as the engine produces them (a crash
  loses at most the tokens of the writer's last period, progress.FLUSH_INTERVAL_S + a commit);
- an aborted, failed or shut-down stream is finalised on the tokens sent, not generated
  (a shutdown's sweep finalizes what is still open as aborted, whatever its engine
  requests did, and its stream sends nothing more).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

from engine.openai.prompts import EnginePrompt
from engine.outputs import RequestOutput, Usage
from engine.sampling_params import SamplingParams
from engine.serving.engine_thread import EngineThread
from engine.serving.metrics import ServerMetrics

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1        # how often a waiting request checks its client's socket
UNRECORDED_TOKENS_PER_CHOICE = 8   # the most a stream sends beyond its ledger row, per choice
PROGRESS_WAIT_S = 5.0         # how long a stream waits for a slow ledger before sending anyway
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
            # Polled first: a socket with a timeout (the server's write timeout) waits up to
            # it for data before any recv, MSG_DONTWAIT or not.
            poll = select.poll()
            poll.register(self._sock, select.POLLIN)
            if not poll.poll(0):
                return False      # connected, nothing sent: the normal case
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):   # ValueError: the socket is closed
            return True


class Generation:
    """Engine requests `{response_id}-{i}`, one per prompt, and the ledger row `response_id`.

    Args:
      tenant: the fair-share group of its engine requests (the key's id); "" is none.
      cache_salt: salts their prefix-cache hashes (the key's id: tenants share no cache
        entries); None shares the cache with every unsalted request.
    """

    def __init__(self, *, response_id: str, prompts: list[EnginePrompt],
                 params: SamplingParams, key: Any, model: str, ledger: Any,
                 metrics: ServerMetrics, engine: EngineThread, arrival: float,
                 on_final: Callable[[Generation], None] = lambda generation: None,
                 tenant: str = "", cache_salt: str | None = None):
        self.response_id, self.prompts, self.params = response_id, prompts, params
        self.tenant, self.cache_salt = tenant, cache_salt
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
        # Billing (see the module docstring). prompt_tokens is what try_admit should write.
        self.prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
        self._sent: list[RequestOutput | None] = [None] * len(prompts)   # the client has these
        self._bills_generated = False   # wait(): the body carries every generated token
        self._recorded = (0, 0)         # the newest progress record: (ticket, completion tokens)
        self._written: int | None = None   # completion tokens known to be in the ledger row
        self._unrecorded_limit = UNRECORDED_TOKENS_PER_CHOICE * len(prompts) * params.n
        self._ledger_failed = False     # a record failed or timed out: stop holding the stream

    def submit(self) -> None:
        """Records the prompt tokens and hands every prompt to the engine thread (the ledger
        row is admitted already)."""
        self._record(self._sent)
        for request_id, prompt in zip(self.request_ids, self.prompts):
            engine_prompt = prompt.as_engine_prompt()
            if self.cache_salt is not None:
                engine_prompt["cache_salt"] = self.cache_salt
            self._engine.add(request_id, engine_prompt, self.params, self, tenant=self.tenant)

    # ------------------------------------------------------------------ engine thread
    def on_scheduled(self, request_id: str, when: float) -> None:
        self._events.put(("scheduled", self._index[request_id], when, None))

    def on_output(self, output: RequestOutput, when: float) -> None:
        index = self._index[output.request_id]
        self.latest[index] = output
        # Each step's output is its own snapshot: a stream that falls behind sends its
        # backlog in pieces cut between them (updates).
        num_tokens = sum(len(o.token_ids) for o in output.outputs)
        self._events.put(("output", index, when, (num_tokens, output.finished, output)))

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
        queued meanwhile are merged, as far as the ledger bound allows: _pieces) to a
        streaming response; returns once every engine request has finished. A yielded batch
        counts as sent once the caller asks for the next; it is yielded only when the ledger
        row is close enough behind (module docstring).

        Returns early once the row is final (a shutdown's sweep finalized it on what was
        sent): nothing more goes out unbilled.

        Raises:
          ClientGone: the client closed the connection (the caller aborts).
        """
        for steps in self._changes(watch):
            for piece in self._pieces(steps):
                if self.usage is not None:
                    return
                self._hold_until_recorded(piece)
                yield piece
                self._sent = self._after(piece)
                self._record(self._sent)

    def _pieces(self, steps: list[tuple[int, RequestOutput | Exception]]
                ) -> Iterator[dict[int, RequestOutput | Exception]]:
        """Merges each step's output (in order) into as few batches as keep the client at
        most the ledger bound ahead of what it has been sent when each batch goes out (the
        caller updates _sent between batches); a step adds at most one token per choice."""
        piece: dict[int, RequestOutput | Exception] = {}
        sent = self._completion(self._sent)
        for index, value in steps:
            if (piece and isinstance(value, RequestOutput) and self._completion(
                    self._after({**piece, index: value})) - sent > self._unrecorded_limit):
                yield piece
                piece, sent = {}, self._completion(self._sent)
            piece[index] = value
        if piece:
            yield piece

    def _after(self, piece: dict[int, RequestOutput | Exception]) -> list[RequestOutput | None]:
        """What the client has once `piece` is sent."""
        after = list(self._sent)
        for index, output in piece.items():
            if isinstance(output, RequestOutput):
                after[index] = output
        return after

    @staticmethod
    def _completion(outputs: list[RequestOutput | None]) -> int:
        return sum(len(sample.token_ids) for output in outputs if output is not None
                   for sample in output.outputs)

    def _changes(self, watch: ClientWatch) -> Iterator[list[tuple[int, RequestOutput | Exception]]]:
        """Yields what the engine sent since the last yield: (prompt index, that step's output
        or an error), in order."""
        next_watch = time.monotonic() + WATCH_INTERVAL_S
        while not self.finished:
            steps: list[tuple[int, RequestOutput | Exception]] = []
            try:
                event = self._events.get(timeout=WATCH_INTERVAL_S)
                while True:
                    noted = self._note(event)
                    if noted is not None:
                        steps.append(noted)
                    event = self._events.get_nowait()
            except queue.Empty:
                pass
            now = time.monotonic()
            if now >= next_watch:
                if watch.gone():
                    raise ClientGone(self.response_id)
                next_watch = now + WATCH_INTERVAL_S
            if steps:
                yield steps

    def _note(self, event: tuple) -> tuple[int, RequestOutput | Exception] | None:
        """Takes one engine event into the metrics; returns (prompt index, its output or
        error), or None for a scheduling event."""
        kind, index, when, payload = event
        metrics = self._metrics
        if kind == "scheduled":
            metrics.queue_time.observe(when - self.arrival)
            return None
        if kind == "error":
            self._done.add(index)
            return index, payload
        num_tokens, finished, output = payload
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
        return index, output

    def wait(self, watch: ClientWatch) -> None:
        """Blocks until every engine request has finished (non-streaming responses), recording
        the generated counts as they grow."""
        self._bills_generated = True
        for _ in self._changes(watch):
            self._record(self.latest)

    def abort(self, status: str = "aborted") -> Usage:
        """Aborts what still runs, waits for the engine's final outputs, finalizes."""
        for index, request_id in enumerate(self.request_ids):
            if index not in self._done:
                self._engine.abort(request_id)
        deadline = time.monotonic() + ABORT_WAIT_S
        while not self.finished and time.monotonic() < deadline:
            try:
                self._note(self._events.get(timeout=0.1))
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
        """What has been generated: every prompt's tokens and the completion tokens so far."""
        return self._usage(self.latest)

    def billable_usage(self, status: str) -> Usage:
        """What a row finalised as `status` is billed: what was sent (module docstring)."""
        completed = status == "completed"
        return self._usage(self.latest if completed or self._bills_generated else self._sent)

    def _usage(self, outputs: list[RequestOutput | None]) -> Usage:
        # The cached count is fixed when a prompt is first scheduled: the newest output has it.
        cached = sum(output.num_cached_tokens for output in self.latest if output is not None)
        completion = sum(len(sample.token_ids) for output in outputs if output is not None
                         for sample in output.outputs)
        return Usage(self.prompt_tokens, completion, min(cached, self.prompt_tokens))

    def finalize(self, status: str | None = None) -> Usage:
        """Writes the ledger row once (later calls return the first result)."""
        with self._lock:
            if self.usage is not None:
                return self.usage
            status = status or self.final_status()
            usage = self.billable_usage(status)
            try:
                self._ledger.finalize(self.response_id, status, usage.prompt_tokens,
                                      usage.cached_tokens, usage.completion_tokens)
            except Exception:  # noqa: BLE001 - the response still goes out; the row stays open
                logger.exception("request %s: the ledger could not finalize it", self.response_id)
            self._metrics.count_request(getattr(self.key, "name", "?"), status, usage)
            self.usage, self.status = usage, status
        self._on_final(self)
        return usage

    # ------------------------------------------------------------------ progress in the ledger
    def _record(self, outputs: list[RequestOutput | None]) -> None:
        """Queues these counts for the ledger's writer (it batches; this does not block)."""
        if self._ledger_failed:
            return
        usage = self._usage(outputs)
        try:
            ticket = self._ledger.record_progress(self.response_id, usage.prompt_tokens,
                                                  usage.cached_tokens, usage.completion_tokens)
        except Exception:  # noqa: BLE001 - the response goes on; the row keeps older counts
            logger.exception("request %s: the ledger could not record progress",
                             self.response_id)
            self._ledger_failed = True
            return
        self._recorded = (ticket, usage.completion_tokens)

    def _hold_until_recorded(self, changed: dict[int, RequestOutput | Exception]) -> None:
        """Waits, before `changed` is sent, until the ledger row holds the prompt tokens and
        all but the bound of the completion tokens the client will then have."""
        if self._ledger_failed:
            return
        after = self._after(changed)
        completion = self._completion(after)
        ticket, recorded = self._recorded
        if self._written != recorded and self._ledger.progress_written(ticket):
            self._written = recorded
        if self._written is not None and completion - self._written <= self._unrecorded_limit:
            return
        if completion - recorded > self._unrecorded_limit:
            # One step past the bound alone (_pieces cuts between steps, and a step adds a
            # token per choice): never expected, but then it is recorded before it is sent.
            self._record(after)
            ticket, recorded = self._recorded
        if self._ledger.progress_written(ticket, PROGRESS_WAIT_S):
            self._written = recorded
        else:
            logger.error("request %s: the ledger did not record progress within %.0f s; "
                         "streaming on without waiting for it", self.response_id,
                         PROGRESS_WAIT_S)
            self._ledger_failed = True
