"""Ember's OpenAI-compatible HTTP server: the Flask layer around one engine Service.

    create_app(service)   the WSGI app: routes, error handlers, Replies turned into Responses

The Service (engine/serving/service.py: start_service) holds the engine thread and the ledger
and knows no web framework; `ember serve` runs this app under gunicorn through
engine/serving/gunicorn_app.py, which names it by import path ("server:create_app").

Every request first passes the edge checks (`_check_edge`): without keys (--no-auth), a Host
that is not a loopback address is a 403 (DNS rebinding cannot aim a web page at a local
server); a POST body must be application/json (415: a cross-site form cannot post one) of a
known length (411). Every generation request then goes: authenticate -> validate (400) ->
precheck on lower bounds, before tokenizing (400 / 429) -> tokenize -> reserve the key's
sequences and engine room (429 / 503) -> exact quota (429, or 400 for a request larger than
the whole quota) -> ledger row admitted -> engine thread -> ledger row finalized exactly once
with the engine's usage (completed, aborted when the client leaves, error). See
docs/design.md.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from engine.openai import api
from engine.openai.api import ApiError
from engine.openai.formatting import json_text
from engine.openai.prompts import prepare_chat, prepare_completion, render_chat
from engine.openai.responses import ChatAssembler, CompletionAssembler
from engine.serving.openapi import openapi_document
from engine.serving.generation import ClientWatch
from engine.serving.respond import CLIENT_GONE_STATUS, EventStream, Reply, respond, stream
from engine.serving.service import Service

logger = logging.getLogger("ember.server")


def create_app(service: Service) -> Flask:
    """The WSGI app around a started Service (see engine.serving.service.start_service).

    Args:
      service: the Service whose engine thread answers the routes.

    Returns:
      The Flask app; `app.extensions["ember"]` is the Service.
    """
    app = Flask("ember")
    app.extensions["ember"] = service
    app.before_request(lambda: _check_edge(service))
    _add_error_handlers(app, service)
    _add_generation_routes(app, service)
    _add_info_routes(app, service)
    return app


def json_response(body: Any, status: int, headers: dict | None = None) -> Response:
    """A JSON body (UTF-8 unescaped, dates as ISO 8601) with its status and headers."""
    return Response(json_text(body), status, headers=headers or {}, mimetype="application/json")


def _response(answer: Reply | EventStream) -> Response:
    if isinstance(answer, EventStream):
        return Response(answer.chunks, 200, headers=answer.headers,
                        mimetype="text/event-stream")
    if answer.body is None:
        return Response(status=answer.status, headers=answer.headers)
    return json_response(answer.body, answer.status, answer.headers)


# The Service takes plain values; these read them off the current request.
def _authenticate(service: Service) -> Any:
    return service.authenticate(request.headers.get("Authorization", ""))


def _begin(service: Service) -> tuple[Any, dict, float]:
    return service.begin(request.headers.get("Authorization", ""), request.stream,
                         request.content_length)


def _check_edge(service: Service) -> None:
    """Refuses, before any route runs: a non-loopback Host without keys (403), a POST body
    that is not JSON (415) or is chunked (411: a whole body of known length is read before a
    thread runs the request, see engine/serving/request_buffer.py)."""
    if service.no_auth and not _local_host(request.environ.get("HTTP_HOST"),
                                           service.allowed_hosts):
        host = request.environ.get("HTTP_HOST", "")[:100]
        raise ApiError(403, f"Host {host!r} is not a loopback address: without API keys "
                       "(--no-auth) the server answers only requests addressed to "
                       "localhost, 127.0.0.1 or [::1]", type="permission_error",
                       code="host_not_allowed")
    if request.method != "POST":
        return
    if request.mimetype != "application/json":
        raise ApiError(415, f"Content-Type {request.content_type!r}: expected "
                       "application/json", code="unsupported_media_type")
    if request.content_length is None and request.headers.get("Transfer-Encoding"):
        raise ApiError(411, "a chunked body: send the body with a Content-Length",
                       code="length_required")


def _local_host(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header ("name", "name:port", "[v6]:port") names this machine's
    loopback (or one of `allowed`); a request without Host (HTTP/1.0) passes."""
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    if name == "localhost" or name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _new_request_id(prefix: str) -> str:
    request_id = Service.new_request_id(prefix)
    request.environ["ember.request_id"] = request_id   # for the 500 handler's log line
    return request_id


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
        key, body, arrival = _begin(service)
        parsed = api.parse_completion(body, service.limits)
        service.admission.precheck(key, parsed.prompts, parsed.sampling)
        prepared = prepare_completion(parsed, service.model_info())
        response_id = _new_request_id("cmpl")
        assembler = CompletionAssembler(parsed, prepared, service.tokenizer, response_id,
                                        int(time.time()), service.limits.model_name)
        if _client_left():
            return Response(status=CLIENT_GONE_STATUS)
        generation, headers = service.start(prepared, key, response_id, arrival)
        return _answer(generation, assembler, [], headers, parsed.sampling.stream)

    @app.post("/v1/chat/completions")
    def chat_completions():
        key, body, arrival = _begin(service)
        parsed = api.parse_chat(body, service.limits)
        # Rendered first (cheap next to tokenizing): the bound counts what the template adds
        # around each message, not only the contents.
        text = render_chat(parsed, service.model_info())
        service.admission.precheck(key, [text], parsed.sampling, param="messages")
        prepared = prepare_chat(parsed, service.model_info(), text)
        response_id = _new_request_id("chatcmpl")
        assembler = ChatAssembler(parsed, prepared, response_id, int(time.time()),
                                  service.limits.model_name, service.tokenizer)
        first_chunks = assembler.role_chunks() if parsed.sampling.stream else []
        if _client_left():
            return Response(status=CLIENT_GONE_STATUS)
        generation, headers = service.start(prepared, key, response_id, arrival)
        return _answer(generation, assembler, first_chunks, headers, parsed.sampling.stream)


def _client_left() -> bool:
    """Whether the client closed its connection while its request waited for a thread or
    was prepared: it is then not admitted (no engine work, no ledger row)."""
    return ClientWatch(request.environ.get("gunicorn.socket")).gone()


def _answer(generation, assembler, first_chunks: list[dict], headers: dict,
            streaming: bool) -> Response:
    client_socket = request.environ.get("gunicorn.socket")   # None under a test client
    if streaming:
        return _response(stream(generation, assembler, first_chunks, headers, client_socket))
    return _response(respond(generation, assembler, headers, client_socket))


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
        # No key needed: nothing in it is per key (engine/serving/metrics.py).
        payload, content_type = service.metrics.render()
        return Response(payload, 200, content_type=content_type)

    @app.get("/openapi.json")
    def openapi():
        return json_response(openapi_document(service.limits), 200)

    _add_authenticated_routes(app, service)


def _add_authenticated_routes(app: Flask, service: Service) -> None:
    @app.get("/v1/models")
    def models():
        _authenticate(service)
        return json_response({"object": "list", "data": [service.model_card()]}, 200)

    @app.get("/v1/models/<path:name>")
    def model(name: str):
        _authenticate(service)
        if name != service.limits.model_name:
            raise ApiError(404, f"model {name[:80]!r} does not exist", code="model_not_found")
        return json_response(service.model_card(), 200)

    @app.post("/tokenize")
    def tokenize():
        key, body, _ = _begin(service)
        return json_response(service.tokenize(key, body), 200)

    @app.post("/detokenize")
    def detokenize():
        key, body, _ = _begin(service)
        return json_response(service.detokenize(key, body), 200)

    @app.get("/tokenizer_info")
    def tokenizer_info():
        _authenticate(service)
        return json_response(service.tokenizer_info(), 200)

    @app.get("/v1/usage")
    def usage():
        key = _authenticate(service)
        return json_response({"object": "list", "data": service.usage(key, request.args)}, 200)

    @app.get("/admin/stats")
    def admin_stats():
        key = _authenticate(service)
        if not getattr(key, "admin", False):
            raise ApiError(403, "this route needs an admin key", type="permission_error",
                           code="admin_only")
        return json_response(service.admin_stats(), 200)
