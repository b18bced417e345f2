"""`ember serve`'s processes: gunicorn's arbiter and one gthread worker around the WSGI app.

The worker builds the Service (the engine thread, the ledger) after the fork, then the WSGI
app around it. On SIGTERM it drains the engine; on SIGQUIT or exit it aborts what still runs
and finalizes every ledger row.

An HTTP thread gets a connection only once a whole request has arrived on it (see
engine/serving/request_buffer.py): until then the worker's main loop reads it without
blocking, so slow or half-open clients (slowloris) cannot hold the threads that /health and
real requests need. A request not whole within the read timeout is answered 408 and closed.
The other way round, each write of a response has the write timeout: a client that leaves its
response unread that long (the socket's buffers full) is dropped, its generation aborted and
its ledger row finalized, so it cannot hold a thread either; and one key holds at most
--max-requests-per-key threads (half of them by default) with requests in flight.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import selectors
import socket
import threading
import time
from functools import partial
from typing import Any, Callable

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from engine.openai.formatting import json_text
from engine.serving.admission import DEFAULT_MAX_SEQUENCES_PER_KEY
from engine.serving.request_buffer import (BODY_TOO_LARGE, CONTINUE, HEAD_TOO_LARGE, READY, WAIT,
                                           RequestBuffer)
from engine.serving.service import (DEFAULT_MAX_BODY_BYTES, DRAIN_LIMIT_BYTES, Service,
                                    body_too_large, start_service)

logger = logging.getLogger("ember.server")

# gunicorn names the WSGI app by import path, so the engine never imports the web layer.
WSGI_APP = "server:create_app"   # called with the Service; returns the WSGI app
WORKER_BOOT_ERROR = 3    # gunicorn's arbiter halts (rather than respawning) on this exit code
SHUTDOWN_MARGIN_S = 5.0  # of the graceful timeout, kept for aborting and finalizing
SWEEP_DELAY_S = 1.0      # after the drain: the engine's aborts reach their streams first
SWEEP_JOIN_S = 2.0       # the sweep's wait for the engine thread to end
DEFAULT_READ_TIMEOUT_S = 30.0   # for a whole request (head and body), from its first awaited byte
DEFAULT_WRITE_TIMEOUT_S = 30.0  # for each write of a response (an SSE event, a body)
_RECV_BYTES = 1 << 18
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                   b"Content-Length: 0\r\n\r\n")
_HEAD_TOO_LARGE_ANSWER = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                          b"Connection: close\r\nContent-Length: 0\r\n\r\n")


class EmberWorker(ThreadWorker):
    """gthread worker that hands a connection to a thread only with a whole request on it,
    drains the engine on SIGTERM and finalizes the ledger on exit.

    Reading (EmberWorker.enqueue_req and what it calls) runs on gunicorn's main loop, as
    accepting and keep-alive polling do; the read timeout and body limit are the
    EmberApplication's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gathering: dict = {}   # connection -> read deadline, while a request arrives

    def _service(self) -> Service | None:
        # None until the app is loaded (a signal can arrive while the worker boots).
        return getattr(self.app, "service", None)

    def handle_exit(self, sig, frame):
        service = self._service()
        if service is not None:
            drain = max(0.0, self.cfg.graceful_timeout - SHUTDOWN_MARGIN_S)
            service.begin_shutdown(drain)
            # gunicorn waits the whole graceful timeout for connections still being written
            # (a client reading slowly) and the arbiter kills the worker at that same moment,
            # so run()'s final close() may never come: the rows are finalized once the drain
            # is over, well before the kill.
            sweep = threading.Timer(drain + SWEEP_DELAY_S if drain else 0.0, service.close,
                                    kwargs={"join_seconds": SWEEP_JOIN_S})
            sweep.daemon = True
            sweep.start()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig, frame):
        service = self._service()
        if service is not None:
            service.close(join_seconds=2.0)
        super().handle_quit(sig, frame)

    def run(self):
        try:
            super().run()
        finally:
            service = self._service()
            if service is not None:
                service.close()
                # The ledger is this process's: write pending progress, end its lease.
                service.ledger.close()

    # ------------------------------------------------------------------ whole requests
    def enqueue_req(self, conn):
        """gunicorn calls this (main loop) when a connection may carry a request: a new one,
        a kept-alive one that became readable, or one with bytes read past its last request."""
        if self.cfg.is_ssl:   # `ember serve` has no TLS; a TLS socket cannot be read ahead
            super().enqueue_req(conn)
            return
        buffer = getattr(conn, "ember_buffer", None)
        if buffer is None:
            left = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
            buffer = conn.ember_buffer = RequestBuffer(time.monotonic(), self.app.body_limit,
                                                       DRAIN_LIMIT_BYTES, left)
        self._read_on(conn, buffer)

    def _read_on(self, conn, buffer: RequestBuffer) -> None:
        received = _recv_available(conn.sock, buffer)
        state = buffer.state()
        if state == READY:
            conn.ember_buffer = None
            conn.init()   # the parser, which reads the buffered request before the socket
            conn.parser.unreader.unread(bytes(buffer.data))
            super().enqueue_req(conn)
        elif state == HEAD_TOO_LARGE:
            self._drop(conn, _HEAD_TOO_LARGE_ANSWER)
        elif state == BODY_TOO_LARGE:
            self._drop(conn, _json_answer(400, "Bad Request",
                                          body_too_large(self.app.body_limit).body()))
        elif not received:   # the client left before sending a whole request
            self._drop(conn, b"")
        else:
            if buffer.wants_continue():
                _send_quietly(conn.sock, CONTINUE)
                buffer.drop_expect()
            self._gathering[conn] = buffer.started + self.app.read_timeout
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self._on_readable, conn))

    def _on_readable(self, conn, _sock) -> None:
        self.poller.unregister(conn.sock)
        self._gathering.pop(conn, None)
        self._read_on(conn, conn.ember_buffer)

    def _drop(self, conn, answer: bytes) -> None:
        if self._gathering.pop(conn, None) is not None:
            self.poller.unregister(conn.sock)
        _send_quietly(conn.sock, answer)
        self.nr_conns -= 1
        conn.close()

    def handle_request(self, req, conn):
        """gunicorn's, each write under the write timeout (gunicorn left the socket
        blocking, without one): a client that reads nothing for that long is dropped, and
        closing the response (its stream) aborts and finalizes what it was sent."""
        conn.sock.settimeout(self.app.write_timeout)
        if self.app.send_buffer is not None:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.app.send_buffer)
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            logger.info("a client left its response unread for %g s: connection closed",
                        self.app.write_timeout)
            return False

    def murder_pending(self):
        """gunicorn's check of idle connections (main loop, about once a second), plus the
        read timeout of requests still arriving (all of them when the worker stops)."""
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self._gathering.items()):
            if now >= deadline or not self.alive:
                self._drop(conn, _TIMEOUT_ANSWER)


def _recv_available(sock: socket.socket, buffer: RequestBuffer) -> bool:
    """Feeds what has arrived (without waiting) to buffer until it is no longer waiting;
    False when the client closed its side or the socket failed."""
    sock.setblocking(False)
    try:
        while buffer.state() == WAIT:
            chunk = sock.recv(_RECV_BYTES)
            if not chunk:
                return False
            buffer.feed(chunk)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        return False
    return True


def _json_answer(status: int, reason: str, body: dict) -> bytes:
    payload = json_text(body).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    if data:
        try:
            sock.send(data)
        except OSError:
            pass   # the connection is being dropped; the client may be gone already


class EmberApplication(BaseApplication):
    """gunicorn configured from a dict of options, loading the app in the worker.

    Args:
      options: gunicorn settings by name; those this gunicorn lacks are skipped.
      build_service: builds the Service, in the worker, after the fork.
      read_timeout: seconds a client has to send a whole request, from its first awaited
        byte (EmberWorker answers 408 and closes after that).
      body_limit: bodies up to this many bytes are read before a thread gets the request;
        a larger Content-Length goes to the app at once, which refuses it unread.
      write_timeout: seconds each write of a response may wait for the client to read
        (EmberWorker closes the connection after that).
      send_buffer: each connection's kernel send buffer in bytes (SO_SNDBUF; None: the
        kernel's own, which grows to megabytes): how much unread output a client pins in
        the kernel before a write waits.
    """

    def __init__(self, options: dict[str, Any], build_service, *,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                 body_limit: int = DEFAULT_MAX_BODY_BYTES,
                 write_timeout: float = DEFAULT_WRITE_TIMEOUT_S,
                 send_buffer: int | None = None):
        self.options, self.build_service = options, build_service
        self.read_timeout, self.body_limit = read_timeout, body_limit
        self.write_timeout, self.send_buffer = write_timeout, send_buffer
        self.service: Service | None = None   # set in the worker, read by EmberWorker
        super().__init__()

    def load_config(self):
        for name, value in self.options.items():
            if name in self.cfg.settings:   # control_socket_disable is gunicorn >= 24
                self.cfg.set(name, value)

    def load(self):
        module_name, _, factory_name = WSGI_APP.partition(":")
        # Imported before the engine starts, so a broken web layer starts no engine thread.
        create_app = getattr(importlib.import_module(module_name), factory_name)
        self.service = self.build_service()
        return create_app(self.service)


def frozen_after(build: Callable[[], Any]) -> Callable[[], Any]:
    """`build`, after which the heap is frozen (gc.freeze), as vLLM's engine process does.

    A server process holds one engine until it exits, and everything built by then (jax,
    the model, the compiled steps: 444k objects for the default model) lives as long. A full
    collection walks every tracked object with the GIL held: 230-255 ms for the default model
    and 372 ms for bench_offline's 25m preset on the 2-core VM, a stall of every stream
    whenever enough survivors pile up; frozen, it walks only what came later (0.0 ms right
    after). Garbage is collected first, so nothing already dead stays pinned. Only for
    processes that serve one engine to the end: a frozen object that later falls into an
    unreachable cycle is never freed (an LLM in a notebook is not frozen).
    """

    def build_and_freeze():
        built = build()
        gc.collect()
        gc.freeze()
        logger.info("the engine's heap is frozen: %d objects left out of collections",
                    gc.get_freeze_count())
        return built

    return build_and_freeze


def serve(*, model: str | None, engine_config: Any, db_url: str | None,
          instance: str | None, host: str, port: int, model_name: str, no_auth: bool,
          threads: int = 128, max_queue: int = 1024, max_n: int = 16,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_sequences_per_key: int = DEFAULT_MAX_SEQUENCES_PER_KEY,
          max_requests_per_key: int | None = None,
          shared_prefix_cache: bool = False, default_max_tokens: int | None = None,
          read_timeout: float = DEFAULT_READ_TIMEOUT_S,
          write_timeout: float = DEFAULT_WRITE_TIMEOUT_S, send_buffer_bytes: int | None = None,
          shutdown_timeout: float = 30.0,
          log_level: str = "info", engine_factory: Any = None,
          step_timeout: float | None = None, tool_call_parser: str | None = None) -> None:
    """Runs the server under gunicorn (one gthread worker) until SIGTERM or SIGINT.

    The engine (JAX) is built in the worker process, after the fork, on the engine thread; if
    that fails the worker exits with gunicorn's boot-error code and the server stops.

    Args:
      model: the model directory (None: the engine's default model).
      engine_config: the engine.config.EngineConfig.
      db_url: the ledger's SQLAlchemy URL (None: the default SQLite file).
      instance: this replica's name in a shared ledger (None: the Ledger's own id, unique to
        this process).
      host, port: where to listen (the CLI's default host is loopback). Without keys, only
        requests whose Host names a loopback address, or `host` itself when it is not a
        wildcard, are answered.
      model_name, no_auth, max_queue, max_n, max_body_bytes, max_sequences_per_key,
      shared_prefix_cache, default_max_tokens, tool_call_parser: as for start_service.
      threads: HTTP threads of the one worker.
      max_requests_per_key: most requests one key may have in flight (a 429 past it; None:
        half the threads, or no limit without keys, where every client is one tenant).
      read_timeout: seconds a client has to send a whole request (then 408).
      write_timeout: seconds each write of a response may wait for the client to read it.
      send_buffer_bytes: each connection's kernel send buffer (None: the kernel's).
      shutdown_timeout: seconds SIGTERM waits for running requests before aborting them.
      log_level: gunicorn's log level.
      engine_factory: builds the engine in the worker instead of LLMEngine(model,
        engine_config) (multi-host: jax.distributed is initialized first).
      step_timeout: seconds one engine step may run before its requests fail (None: none).
    """

    def fail(error: BaseException) -> None:
        logger.error("the engine failed to start: %s", error)
        os._exit(WORKER_BOOT_ERROR)

    requests_per_key = max_requests_per_key
    if requests_per_key is None and not no_auth:
        requests_per_key = max(1, threads // 2)

    def build_service() -> Service:
        from engine.llm_engine import LLMEngine
        from engine.metering import Ledger

        ledger = Ledger(db_url, **({} if instance is None else {"instance": instance}))
        factory = frozen_after(engine_factory or (lambda: LLMEngine(model, engine_config)))
        return start_service(factory, ledger,
                             model_name=model_name, no_auth=no_auth,
                             max_body_bytes=max_body_bytes, max_queue=max_queue, max_n=max_n,
                             max_sequences_per_key=max_sequences_per_key,
                             max_requests_per_key=requests_per_key,
                             step_timeout=step_timeout,
                             shared_prefix_cache=shared_prefix_cache,
                             default_max_tokens=default_max_tokens,
                             tool_call_parser=tool_call_parser,
                             allowed_hosts=() if host in _WILDCARD_HOSTS else (host,),
                             on_engine_failure=fail)

    # One worker: the engine owns the accelerator. The heartbeat timeout is long because
    # warm-up compiles on the engine thread; the access log stays off (no request lines).
    options = {"bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
               "workers": 1, "threads": threads, "worker_class": EmberWorker,
               "graceful_timeout": max(1, math.ceil(shutdown_timeout)), "timeout": 600,
               "keepalive": 5, "loglevel": log_level, "accesslog": None, "preload_app": False,
               "control_socket_disable": True}
    EmberApplication(options, build_service, read_timeout=read_timeout,
                     body_limit=max_body_bytes, write_timeout=write_timeout,
                     send_buffer=send_buffer_bytes).run()
