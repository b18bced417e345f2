"""`ember serve`'s processes: gunicorn's arbiter and one gthread worker around the WSGI app.

The worker builds the Service (the engine thread, the ledger) after the fork, then the WSGI
app around it. On SIGTERM it drains the engine; on SIGQUIT or exit it aborts what still runs
and finalizes every ledger row.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from engine.serving.service import DEFAULT_MAX_BODY_BYTES, Service, start_service

logger = logging.getLogger("ember.server")

# gunicorn names the WSGI app by import path, so the engine never imports the web layer.
WSGI_APP = "server:create_app"   # called with the Service; returns the WSGI app
WORKER_BOOT_ERROR = 3    # gunicorn's arbiter halts (rather than respawning) on this exit code
SHUTDOWN_MARGIN_S = 5.0  # of the graceful timeout, kept for aborting and finalizing


class EmberWorker(ThreadWorker):
    """gthread worker that drains the engine on SIGTERM and finalizes the ledger on exit."""

    def _service(self) -> Service | None:
        # None until the app is loaded (a signal can arrive while the worker boots).
        return getattr(self.app, "service", None)

    def handle_exit(self, sig, frame):
        service = self._service()
        if service is not None:
            service.begin_shutdown(max(0.0, self.cfg.graceful_timeout - SHUTDOWN_MARGIN_S))
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


class EmberApplication(BaseApplication):
    """gunicorn configured from a dict of options, loading the app in the worker.

    Args:
      options: gunicorn settings by name; those this gunicorn lacks are skipped.
      build_service: builds the Service, in the worker, after the fork.
    """

    def __init__(self, options: dict[str, Any], build_service):
        self.options, self.build_service = options, build_service
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


def serve(*, model: str | None, engine_config: Any, db_url: str | None, instance: str,
          host: str, port: int, model_name: str, no_auth: bool, threads: int = 64,
          max_queue: int = 1024, max_n: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Runs the server under gunicorn (one gthread worker) until SIGTERM or SIGINT.

    The engine (JAX) is built in the worker process, after the fork, on the engine thread; if
    that fails the worker exits with gunicorn's boot-error code and the server stops.

    Args:
      model: the model directory (None: the engine's default model).
      engine_config: the engine.config.EngineConfig.
      db_url: the ledger's SQLAlchemy URL (None: the default SQLite file).
      instance: this replica's name in a shared ledger.
      host, port: where to listen (the CLI's default host is loopback).
      model_name, no_auth, max_queue, max_n, max_body_bytes: as for start_service.
      threads: HTTP threads of the one worker.
      shutdown_timeout: seconds SIGTERM waits for running requests before aborting them.
      log_level: gunicorn's log level.
    """

    def fail(error: BaseException) -> None:
        logger.error("the engine failed to start: %s", error)
        os._exit(WORKER_BOOT_ERROR)

    def build_service() -> Service:
        from engine.llm_engine import LLMEngine
        from engine.metering import Ledger

        return start_service(lambda: LLMEngine(model, engine_config),
                             Ledger(db_url, instance=instance), model_name=model_name,
                             no_auth=no_auth, max_body_bytes=max_body_bytes,
                             max_queue=max_queue, max_n=max_n, on_engine_failure=fail)

    # One worker: the engine owns the accelerator. The heartbeat timeout is long because
    # warm-up compiles on the engine thread; the access log stays off (no request lines).
    options = {"bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
               "workers": 1, "threads": threads, "worker_class": EmberWorker,
               "graceful_timeout": max(1, math.ceil(shutdown_timeout)), "timeout": 600,
               "keepalive": 5, "loglevel": log_level, "accesslog": None, "preload_app": False,
               "control_socket_disable": True}
    EmberApplication(options, build_service).run()
