"""Ember's OpenAI-compatible HTTP server: a Flask app around one background engine thread.

    create_app(engine or factory, ledger, model_name=...)   the WSGI app (tests, embedding)
    serve(options)                                          gunicorn, one gthread worker

Every generation request goes: authenticate -> validate (400) -> reserve engine room (503) ->
quota (429) -> ledger row admitted -> engine thread -> ledger row finalized exactly once with
the engine's usage (completed, aborted when the client leaves, error). See DESIGN.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from engine.openai import api
from engine.serving.engine_thread import EngineThread
from engine.serving.respond import respond, stream
from engine.serving.service import Service, json_response
from engine.openai.api import ApiError
from engine.openai.prompts import prepare_chat, prepare_completion
from engine.openai.responses import ChatAssembler, CompletionAssembler

logger = logging.getLogger("ember.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def create_app(engine: Any | Callable[[], Any], ledger: Any, *, model_name: str,
               no_auth: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_queue: int = 1024, max_n: int = 16,
               on_engine_failure: Callable[[BaseException], None] | None = None) -> Flask:
    """The WSGI app. Starts the engine thread at once (building and warming the engine there,
    while /health answers 503) and marks the ledger rows a crash left open as interrupted.

    Args:
      engine: an LLMEngine, or a callable that builds one on the engine thread.
      ledger: an engine.metering.Ledger.
      model_name: the id clients send as `model`.
      no_auth: serve without API keys (all usage goes to the ledger's anonymous key).
      max_body_bytes: larger bodies are a 400 (code request_too_large).
      max_queue: most engine requests in flight; more is a 503.
      max_n: most samples per prompt.
    """
    interrupted = ledger.mark_interrupted()
    if interrupted:
        logger.warning("marked %d ledger rows left running by a previous process as "
                       "interrupted", interrupted)
    thread = EngineThread(engine, max_queue=max_queue, on_failure=on_engine_failure).start()
    service = Service(thread, ledger, api.Limits(model_name, max_n=max_n), no_auth=no_auth,
                      max_body_bytes=max_body_bytes)
    app = Flask("ember")
    app.extensions["ember"] = service
    _add_error_handlers(app, service)
    _add_generation_routes(app, service)
    _add_info_routes(app, service)
    return app


def _add_error_handlers(app: Flask, service: Service) -> None:
    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return json_response(error.body(), error.status, error.headers)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no route {request.method} {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}"}
        failure = ApiError(error.code or 400, message.get(error.code, error.description or ""),
                           code=codes.get(error.code))
        allowed = getattr(error, "valid_methods", None)
        headers = {"Allow": ", ".join(allowed)} if allowed else {}
        return json_response(failure.body(), failure.status, headers)

    @app.errorhandler(Exception)
    def internal_error(error: Exception):
        request_id = request.environ.get("ember.request_id", "-")
        logger.exception("request %s: internal error", request_id)
        failure = ApiError(500, f"internal server error (request {request_id})",
                           type="server_error", code="internal_error")
        return json_response(failure.body(), 500)

    @app.after_request
    def count(response: Response):
        service.metrics.count_response(response.status_code)
        return response


def _add_generation_routes(app: Flask, service: Service) -> None:
    # The assembler is built before admission: once the ledger row exists, nothing but the
    # response (which finalizes it on every path) runs.
    @app.post("/v1/completions")
    def completions():
        key, body, arrival = service.begin()
        parsed = api.parse_completion(body, service.limits)
        prepared = prepare_completion(parsed, service.model_info())
        response_id = service.new_request_id("cmpl")
        assembler = CompletionAssembler(parsed, prepared, service.tokenizer, response_id,
                                        int(time.time()), service.limits.model_name)
        generation, headers = service.start(prepared, key, response_id, arrival)
        if parsed.sampling.stream:
            return stream(generation, assembler, [], headers)
        return respond(generation, assembler, headers)

    @app.post("/v1/chat/completions")
    def chat_completions():
        key, body, arrival = service.begin()
        parsed = api.parse_chat(body, service.limits)
        prepared = prepare_chat(parsed, service.model_info())
        response_id = service.new_request_id("chatcmpl")
        assembler = ChatAssembler(parsed, prepared, response_id, int(time.time()),
                                  service.limits.model_name)
        first_chunks = assembler.role_chunks() if parsed.sampling.stream else []
        generation, headers = service.start(prepared, key, response_id, arrival)
        if parsed.sampling.stream:
            return stream(generation, assembler, first_chunks, headers)
        return respond(generation, assembler, headers)


def _add_info_routes(app: Flask, service: Service) -> None:
    @app.get("/health")
    def health():
        state = service.engine.state
        if state == "ready" and not service.shutting_down:
            return json_response({"status": "ok"}, 200)
        failure = ApiError(503, f"engine is {state}", type="server_error", code="unavailable")
        return json_response(failure.body(), 503)

    @app.get("/metrics")
    def metrics():
        payload, content_type = service.metrics.render()
        return Response(payload, 200, content_type=content_type)

    _add_authenticated_routes(app, service)


def _add_authenticated_routes(app: Flask, service: Service) -> None:
    @app.get("/v1/models")
    def models():
        service.authenticate()
        return json_response({"object": "list", "data": [service.model_card()]}, 200)

    @app.get("/v1/models/<path:name>")
    def model(name: str):
        service.authenticate()
        if name != service.limits.model_name:
            raise ApiError(404, f"model {name[:80]!r} does not exist", code="model_not_found")
        return json_response(service.model_card(), 200)

    @app.post("/tokenize")
    def tokenize():
        key, body, _ = service.begin()
        return json_response(service.tokenize(body), 200)

    @app.post("/detokenize")
    def detokenize():
        key, body, _ = service.begin()
        return json_response(service.detokenize(body), 200)

    @app.get("/v1/usage")
    def usage():
        key = service.authenticate()
        return json_response({"object": "list", "data": service.usage(key, request.args)}, 200)

    @app.get("/admin/stats")
    def admin_stats():
        key = service.authenticate()
        if not getattr(key, "admin", False):
            raise ApiError(403, "this route needs an admin key", type="permission_error",
                           code="admin_only")
        return json_response(service.admin_stats(), 200)


# ---------------------------------------------------------------------- gunicorn entry
WORKER_BOOT_ERROR = 3    # gunicorn's arbiter halts (rather than respawning) on this exit code
SHUTDOWN_MARGIN_S = 5.0  # of the graceful timeout, kept for aborting and finalizing


def _service_of(wsgi: Any) -> Service | None:
    return getattr(wsgi, "extensions", {}).get("ember")


def _worker_class():
    from gunicorn.workers.gthread import ThreadWorker

    class EmberWorker(ThreadWorker):
        """gthread worker that drains the engine on SIGTERM and finalizes the ledger on exit."""

        def handle_exit(self, sig, frame):
            service = _service_of(self.wsgi)
            if service is not None:
                service.begin_shutdown(max(0.0, self.cfg.graceful_timeout - SHUTDOWN_MARGIN_S))
            super().handle_exit(sig, frame)

        def handle_quit(self, sig, frame):
            service = _service_of(self.wsgi)
            if service is not None:
                service.close(join_seconds=2.0)
            super().handle_quit(sig, frame)

        def run(self):
            try:
                super().run()
            finally:
                service = _service_of(self.wsgi)
                if service is not None:
                    service.close()

    return EmberWorker


def serve(*, model: str | None, engine_config: Any, db_url: str | None, instance: str,
          host: str, port: int, model_name: str, no_auth: bool, threads: int = 64,
          max_queue: int = 1024, max_n: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Runs the server under gunicorn (one gthread worker) until SIGTERM or SIGINT.

    The engine (JAX) is built in the worker process, after the fork, on the engine thread; if
    that fails the worker exits with gunicorn's boot-error code and the server stops.
    """
    from gunicorn.app.base import BaseApplication

    def fail(error: BaseException) -> None:
        logger.error("the engine failed to start: %s", error)
        os._exit(WORKER_BOOT_ERROR)

    def load() -> Flask:
        from engine.llm_engine import LLMEngine
        from engine.metering import Ledger

        return create_app(lambda: LLMEngine(model, engine_config),
                          Ledger(db_url, instance=instance), model_name=model_name,
                          no_auth=no_auth, max_body_bytes=max_body_bytes, max_queue=max_queue,
                          max_n=max_n, on_engine_failure=fail)

    # One worker: the engine owns the accelerator. The heartbeat timeout is long because
    # warm-up compiles on the engine thread; the access log stays off (no request lines).
    options = {"bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
               "workers": 1, "threads": threads, "worker_class": _worker_class(),
               "graceful_timeout": max(1, math.ceil(shutdown_timeout)), "timeout": 600,
               "keepalive": 5, "loglevel": log_level, "accesslog": None, "preload_app": False,
               "control_socket_disable": True}

    class Application(BaseApplication):
        def load_config(self):
            for name, value in options.items():
                if name in self.cfg.settings:   # control_socket_disable is gunicorn >= 24
                    self.cfg.set(name, value)

        def load(self):
            return load()

    Application().run()
