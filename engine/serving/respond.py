"""Answering a Generation: one JSON body when it ends, or Server-Sent Events as it runs.

Both notice a client that leaves (a failed write, or a closed socket while waiting) and abort
its engine requests, so the ledger bills only the tokens emitted. Neither knows the web
framework: they return a Reply or an EventStream, which server.py turns into a response.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Iterator

from engine.openai.api import ApiError
from engine.openai.formatting import SSE_DONE, sse
from engine.serving.engine_thread import Unavailable
from engine.serving.generation import ClientGone, ClientWatch, Generation

logger = logging.getLogger("ember.server")

CLIENT_GONE_STATUS = 499   # nginx's "client closed request": nobody reads it, the log does


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One whole HTTP answer.

    status: the HTTP status.
    body: the JSON body (a dict), or None for no body at all (the 499 for a gone client).
    headers: extra headers (X-Request-Id, x-ratelimit-*), without Content-Type.
    """
    status: int
    body: dict | None
    headers: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class EventStream:
    """A 200 answered as Server-Sent Events (media type text/event-stream).

    chunks: the encoded events, produced as the engine runs; iterating it to the end, or
      closing it, finalizes the ledger row.
    headers: extra headers, the no-cache and no-proxy-buffering ones among them.
    """
    chunks: Iterator[bytes]
    headers: dict[str, str]


def engine_error(generation: Generation, error: Exception) -> ApiError:
    """What a failure inside the engine thread tells the client (never its internals)."""
    if isinstance(error, ValueError):
        return ApiError(400, str(error)[:300], code="invalid_value")
    if isinstance(error, Unavailable):
        return ApiError(503, str(error), type="server_error", code="unavailable")
    return ApiError(500, f"internal server error (request {generation.response_id})",
                    type="server_error", code="internal_error")


def respond(generation: Generation, assembler, headers: dict[str, str],
            client_socket: socket.socket | None) -> Reply:
    """Waits for every engine request, finalizes the ledger row, answers one JSON body.

    Args:
      generation: the admitted, submitted Generation.
      assembler: its Completion- or ChatAssembler.
      headers: the headers every answer carries (X-Request-Id, x-ratelimit-*).
      client_socket: the client's connection (gunicorn's), watched for a client that leaves;
        None where the server does not expose it.

    Returns:
      The Reply: 200 with the response body, an engine error's status and body, or a 499
      without a body when the client left.
    """
    try:
        generation.wait(ClientWatch(client_socket))
    except ClientGone:
        generation.abort()
        return Reply(CLIENT_GONE_STATUS, None, {})
    finally:
        if generation.usage is None and not generation.finished:
            generation.abort("error")
    error = next((e for e in generation.errors if e is not None), None)
    usage = generation.finalize()
    if error is not None:
        failure = engine_error(generation, error)
        return Reply(failure.status, failure.body(), headers)
    return Reply(200, assembler.response(generation.latest, usage), headers)


def stream(generation: Generation, assembler, first_chunks: list[dict],
           headers: dict[str, str], client_socket: socket.socket | None) -> EventStream:
    """Streams chunks as the engine produces them; finalizes the ledger row before the usage
    chunk and [DONE], or (client gone, error) on the way out.

    Args:
      generation, assembler, headers, client_socket: as for respond.
      first_chunks: chunks sent before the engine's first output (chat's role chunks).

    Returns:
      The EventStream; nothing runs until its chunks are iterated.
    """
    # Read now: the socket is the request's, and the chunks are produced after it returns.
    watch = ClientWatch(client_socket)

    def events() -> Iterator[bytes]:
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
            if generation.usage is not None:
                return   # finalized by a shutdown's sweep, as aborted: the stream just ends
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

    return EventStream(events(), {**headers, "Cache-Control": "no-cache",
                                  "X-Accel-Buffering": "no"})
