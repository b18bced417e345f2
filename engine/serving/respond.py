"""Answering a Generation: one JSON body when it ends, or Server-Sent Events as it runs.

Both notice a client that leaves (a failed write, or a closed socket while waiting) and abort
its engine requests, so the ledger bills only the tokens emitted.
"""

from __future__ import annotations

import logging

from flask import Response, request

from engine.serving.engine_thread import Unavailable
from engine.serving.generation import ClientGone, ClientWatch, Generation
from engine.serving.service import json_response
from engine.openai.api import ApiError
from engine.openai.formatting import SSE_DONE, sse

logger = logging.getLogger("ember.server")


def engine_error(generation: Generation, error: Exception) -> ApiError:
    """What a failure inside the engine thread tells the client (never its internals)."""
    if isinstance(error, ValueError):
        return ApiError(400, str(error)[:300], code="invalid_value")
    if isinstance(error, Unavailable):
        return ApiError(503, str(error), type="server_error", code="unavailable")
    return ApiError(500, f"internal server error (request {generation.response_id})",
                    type="server_error", code="internal_error")


def respond(generation: Generation, assembler, headers: dict) -> Response:
    """Waits for every engine request, finalizes the ledger row, answers one JSON body."""
    try:
        generation.wait(ClientWatch(request.environ.get("gunicorn.socket")))
    except ClientGone:
        generation.abort()
        return Response(status=499)     # nobody reads it: the client has gone
    finally:
        if generation.usage is None and not generation.finished:
            generation.abort("error")
    error = next((e for e in generation.errors if e is not None), None)
    usage = generation.finalize()
    if error is not None:
        failure = engine_error(generation, error)
        return json_response(failure.body(), failure.status, headers)
    return json_response(assembler.response(generation.latest, usage), 200, headers)


def stream(generation: Generation, assembler, first_chunks: list[dict],
           headers: dict) -> Response:
    """Streams chunks as the engine produces them; finalizes the ledger row before the usage
    chunk and [DONE], or (client gone, error) on the way out."""
    watch = ClientWatch(request.environ.get("gunicorn.socket"))

    def events():
        try:
            for chunk in first_chunks:
                yield sse(chunk)
            for changed in generation.updates(watch):
                error = next((e for e in changed.values() if isinstance(e, Exception)), None)
                if error is not None:
                    generation.abort("error")
                    yield sse(engine_error(generation, error).body())
                    return
                for chunk in assembler.chunks(changed):
                    yield sse(chunk)
            usage = generation.finalize()
            if assembler.include_usage:
                yield sse(assembler.usage_chunk(usage))
            yield SSE_DONE
        except ClientGone:
            logger.info("request %s: client disconnected", generation.response_id)
        except Exception:
            logger.exception("request %s: stream failed", generation.response_id)
            generation.abort("error")
            raise
        finally:
            # GeneratorExit (the write failed), ClientGone, or an error: bill what was emitted.
            if generation.usage is None:
                generation.abort()

    return Response(events(), 200, headers={**headers, "Cache-Control": "no-cache",
                                            "X-Accel-Buffering": "no"},
                    mimetype="text/event-stream")
