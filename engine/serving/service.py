"""Service: what the HTTP routes share: auth, body reading, admission, tokenize, usage, shutdown.

One per app. It holds the engine thread, the ledger and the metrics, and the live Generations
so that a shutdown can finalize every ledger row even if a client thread is stuck. It takes
plain values (a header, a stream, a length), never the web framework's request: server.py
reads the request and turns answers into responses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import IO, Any

from engine.info import ModelInfo
from engine.openai import api
from engine.openai.api import ApiError, invalid
from engine.openai.prompts import PreparedRequest
from engine.serving.engine_thread import EngineThread, Unavailable
from engine.serving.generation import Generation
from engine.serving.metrics import ServerMetrics

logger = logging.getLogger("ember.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024   # past this an oversized body is not even read to its end


def start_service(engine: Any | Callable[[], Any], ledger: Any, *, model_name: str,
                  no_auth: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  max_queue: int = 1024, max_n: int = 16,
                  on_engine_failure: Callable[[BaseException], None] | None = None
                  ) -> Service:
    """Marks the ledger rows a crash left open as interrupted and starts the engine thread,
    which builds and warms the engine (while /health answers 503).

    Args:
      engine: an LLMEngine, or a callable that builds one on the engine thread.
      ledger: an engine.metering.Ledger.
      model_name: the id clients send as `model`.
      no_auth: serve without API keys (all usage goes to the ledger's anonymous key).
      max_body_bytes: larger bodies are a 400 (code request_too_large).
      max_queue: most engine requests in flight; more is a 503.
      max_n: most samples per prompt.
      on_engine_failure: called on the engine thread if building the engine fails.

    Returns:
      The Service, its engine thread started; server.create_app puts routes around it.
    """
    interrupted = ledger.mark_interrupted()
    if interrupted:
        logger.warning("marked %d ledger rows left running by a previous process as "
                       "interrupted", interrupted)
    thread = EngineThread(engine, max_queue=max_queue, on_failure=on_engine_failure).start()
    return Service(thread, ledger, api.Limits(model_name, max_n=max_n), no_auth=no_auth,
                   max_body_bytes=max_body_bytes)


class Service:
    def __init__(self, engine: EngineThread, ledger: Any, limits: api.Limits, *,
                 no_auth: bool, max_body_bytes: int):
        self.engine, self.ledger, self.limits = engine, ledger, limits
        self.no_auth, self.max_body_bytes = no_auth, max_body_bytes
        self.metrics = ServerMetrics(limits.model_name, lambda: engine.stats,
                                     lambda: engine.state == "ready")
        self.shutting_down = False
        self.started = int(time.time())
        self._generations: dict[str, Generation] = {}
        self._lock = threading.Lock()
        self._model_info: ModelInfo | None = None

    # ------------------------------------------------------------------ every request
    def authenticate(self, authorization: str) -> Any:
        """The caller's key: 401 when missing or unknown, 403 when revoked.

        Args:
          authorization: the Authorization header ("" when absent), "Bearer <key>".
        """
        if self.no_auth:
            return self.ledger.anonymous_key()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        key = self.ledger.authenticate(token)
        if key is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        if key.revoked:
            raise ApiError(403, f"API key {key.name!r} has been revoked",
                           type="permission_error", code="key_revoked")
        return key

    def read_body(self, stream: IO[bytes], content_length: int | None) -> bytes:
        """The body, at most max_body_bytes (more is a 400; it is read on, up to a limit, so
        the client gets the answer rather than a reset connection).

        Args:
          stream: the request body, read in chunks until it returns b"".
          content_length: the Content-Length header, None when absent.
        """
        too_large = ApiError(400, f"body is larger than {self.max_body_bytes} bytes",
                             param=None, code="request_too_large")
        if content_length is not None and content_length > DRAIN_LIMIT_BYTES:
            raise too_large
        chunks, size = [], 0
        while chunk := stream.read(1 << 16):
            size += len(chunk)
            if size <= self.max_body_bytes:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT_BYTES:
                break
        if size > self.max_body_bytes:
            raise too_large
        return b"".join(chunks)

    def begin(self, authorization: str, stream: IO[bytes], content_length: int | None
              ) -> tuple[Any, dict, float]:
        """The caller's key, the JSON body and the arrival time of a POST (arguments as for
        authenticate and read_body)."""
        arrival = time.monotonic()
        key = self.authenticate(authorization)
        return key, api.parse_json_body(self.read_body(stream, content_length)), arrival

    def model_info(self) -> ModelInfo:
        if self.engine.state != "ready":
            raise ApiError(503, f"the engine is {self.engine.state}", type="server_error",
                           code="unavailable")
        if self._model_info is None:
            self._model_info = self.engine.engine.model_info()
        return self._model_info

    @property
    def tokenizer(self):
        return self.model_info().tokenizer

    # ------------------------------------------------------------------ admission
    @staticmethod
    def new_request_id(prefix: str) -> str:
        """The response id, which is also the ledger row's id (the caller records it for its
        500 handler's log line)."""
        return f"{prefix}-{uuid.uuid4().hex}"

    def start(self, prepared: PreparedRequest, key: Any, response_id: str, arrival: float
              ) -> tuple[Generation, dict]:
        """Reserves engine room, checks the quota, admits the ledger row, submits.

        Returns the Generation and the quota's x-ratelimit-* headers.
        """
        count = len(prepared.prompts)
        try:
            self.engine.reserve(count)
        except Unavailable as error:
            raise ApiError(503, str(error), type="server_error", code="unavailable",
                           headers={"Retry-After": "1"}) from None
        generation = Generation(
            response_id=response_id, prompts=prepared.prompts, params=prepared.params, key=key,
            model=self.limits.model_name, ledger=self.ledger, metrics=self.metrics,
            engine=self.engine, arrival=arrival, on_final=self._forget)
        try:
            # Checks the quota and inserts the running row in one transaction.
            decision = self.ledger.try_admit(response_id, key, self.limits.model_name,
                                             prepared.estimated_tokens)
            headers = {k: str(v) for k, v in (decision.headers or {}).items()}
            if not decision.allowed:
                if decision.retry_after:   # 0: the request alone exceeds a limit
                    headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
                raise ApiError(429, decision.reason or "rate limit exceeded",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               headers=headers)
        except BaseException:
            self.engine.release(count)
            raise
        with self._lock:
            self._generations[response_id] = generation
        generation.submit()
        headers["X-Request-Id"] = response_id
        return generation, headers

    def _forget(self, generation: Generation) -> None:
        with self._lock:
            self._generations.pop(generation.response_id, None)

    # ------------------------------------------------------------------ other routes
    def tokenize(self, body: dict) -> dict:
        api.check_model(body, self.limits)
        info = self.model_info()
        if body.get("messages") is not None:
            chat = api.parse_chat({"messages": body["messages"]}, self.limits)
            ids = self._render_chat(info, chat.messages, api.get_bool(
                body, "add_generation_prompt", True))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise invalid("prompt", prompt, "a string (or give messages)", "invalid_type")
            ids = info.tokenizer.encode(prompt, add_special_tokens=api.get_bool(
                body, "add_special_tokens", True))
        result = {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}
        if api.get_bool(body, "return_token_strs"):
            result["token_strs"] = [info.tokenizer.decode([i], skip_special_tokens=False)
                                    for i in ids]
        return result

    @staticmethod
    def _render_chat(info: ModelInfo, messages: list, add_generation_prompt: bool) -> list:
        try:
            return info.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        except Exception as error:  # noqa: BLE001 - a template failing on user input is a 400
            raise ApiError(400, f"messages: the chat template could not render them: "
                           f"{str(error)[:200]}", param="messages") from None

    def detokenize(self, body: dict) -> dict:
        api.check_model(body, self.limits)
        info = self.model_info()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.vocab_size
                for t in tokens):
            raise invalid("tokens", tokens, f"a list of token ids in [0, {info.vocab_size})")
        return {"prompt": info.tokenizer.decode(tokens)}

    def usage(self, key: Any, args: Mapping[str, str]) -> list[dict]:
        """The key's usage rows for GET /v1/usage's query (group_by, key, start, end)."""
        group_by = args.get("group_by") or None
        if group_by not in (None, "model", "day", "key"):
            raise invalid("group_by", group_by, "'model', 'day' or 'key' (admin keys)")
        try:
            rows = self.ledger.usage_for(key, key_name=args.get("key") or None,
                                         start=_parse_time("start", args.get("start")),
                                         end=_parse_time("end", args.get("end")),
                                         group_by=group_by)
        except PermissionError as error:
            raise ApiError(403, str(error) or "only an admin key can read other keys' usage",
                           type="permission_error", code="forbidden") from None
        except ValueError as error:
            raise ApiError(400, str(error), param="key", code="invalid_value") from None
        return [dataclasses.asdict(row) for row in rows]

    def model_card(self) -> dict:
        card = {"id": self.limits.model_name, "object": "model", "created": self.started,
                "owned_by": "ember"}
        if self.engine.state == "ready":
            card["max_model_len"] = self.model_info().max_model_len
        return card

    def admin_stats(self) -> dict:
        stats = self.engine.stats
        return {"state": self.engine.state, "engine_requests_in_flight": self.engine.num_pending,
                "http_requests_in_flight": len(self._generations),
                "engine": None if stats is None else dataclasses.asdict(stats)}

    # ------------------------------------------------------------------ shutdown
    def begin_shutdown(self, drain_seconds: float) -> None:
        """New requests get 503; running ones may finish for drain_seconds, then are aborted.
        Does not block (called from a signal handler)."""
        self.shutting_down = True
        self.engine.request_stop(drain_seconds)

    def close(self, join_seconds: float = 10.0) -> None:
        """Aborts whatever still runs and finalizes every open ledger row."""
        self.shutting_down = True
        self.engine.request_stop(0.0)
        self.engine.join(join_seconds)
        with self._lock:
            open_generations = list(self._generations.values())
        for generation in open_generations:
            generation.finalize()
        if open_generations:
            logger.info("shutdown: finalized %d open requests", len(open_generations))


def _parse_time(name: str, value: str | None) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        if value.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(value), timezone.utc)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise invalid(name, value, "an ISO 8601 date or time, or unix seconds") from None
    return moment
