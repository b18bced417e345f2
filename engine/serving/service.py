"""Service: what the HTTP routes share: auth, body reading, admission, tokenize, usage, shutdown.

One per app. It holds the engine thread, the ledger and the metrics, and the live Generations
so that a shutdown can finalize every ledger row even if a client thread is stuck. It takes
plain values (a header, a stream, a length), never the web framework's request: server.py
reads the request and turns answers into responses.

Admission runs twice: `admission.precheck` before tokenizing, on lower bounds from the
parsed body (engine/serving/admission.py), then `start` after it, exactly (Ledger.try_admit).
Each key's requests go to the engine as its own tenant (fair queueing between keys) with its
own prefix cache salt, unless the server shares the cache between keys (--shared-prefix-cache).
"""

from __future__ import annotations

import dataclasses
import logging
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
from engine.serving import admission, tokenization
from engine.serving.engine_thread import EngineThread, Unavailable
from engine.serving.generation import Generation
from engine.serving.metrics import ServerMetrics

logger = logging.getLogger("ember.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024   # past this an oversized body is not even read to its end


def body_too_large(max_body_bytes: int) -> ApiError:
    """The answer to a body over --max-body-bytes (given by the Service, or by the gunicorn
    worker, which throws such a body away as it arrives)."""
    return ApiError(400, f"body is larger than {max_body_bytes} bytes", param=None,
                    code="request_too_large")


def start_service(engine: Any | Callable[[], Any], ledger: Any, *, model_name: str,
                  no_auth: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  max_queue: int = 1024, max_n: int = 16,
                  max_sequences_per_key: int = admission.DEFAULT_MAX_SEQUENCES_PER_KEY,
                  max_requests_per_key: int | None = None,
                  shared_prefix_cache: bool = False, default_max_tokens: int | None = None,
                  allowed_hosts: tuple[str, ...] = (),
                  on_engine_failure: Callable[[BaseException], None] | None = None,
                  step_timeout: float | None = None,
                  tool_call_parser: str | None = None) -> Service:
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
      max_sequences_per_key: most engine sequences (prompts x n) one key may have queued or
        running; more is a 429 (a request larger than that alone, a 400).
      max_requests_per_key: most requests one key may have in flight (a 429 past it), so
        that one key cannot hold every HTTP thread; None: no limit.
      shared_prefix_cache: share the prefix cache between keys (default: each key's cache is
        its own, so cached_tokens never tells one key what another sent).
      default_max_tokens: max_tokens of a request that sets none (cut to the context left);
        None: OpenAI's 16 for completions, the whole remaining context for chat.
      allowed_hosts: Host names answered without keys besides the loopback ones (the address
        the server is bound to, when it is not a wildcard).
      on_engine_failure: called on the engine thread if building the engine fails.
      step_timeout: seconds one engine step may run before its requests fail (503) and
        /health answers 503 until it ends (None: no limit).
      tool_call_parser: the format tool calls are parsed in for tool_choice "auto"
        (engine/openai/tools.py PARSERS; None: the one the chat template writes).

    Returns:
      The Service, its engine thread started; server.create_app puts routes around it.
    """
    interrupted = ledger.mark_interrupted()
    if interrupted:
        logger.warning("marked %d ledger rows left running by a previous process as "
                       "interrupted", interrupted)
    limits = api.Limits(model_name, max_n=max_n, default_max_tokens=default_max_tokens,
                        tool_call_parser=tool_call_parser)   # a bad name fails here
    sequences = admission.sequence_limit(max_sequences_per_key)   # a bad limit fails first
    requests = None if max_requests_per_key is None else admission.request_limit(
        max_requests_per_key)
    thread = EngineThread(engine, max_queue=max_queue, on_failure=on_engine_failure,
                          step_timeout=step_timeout).start()
    return Service(thread, ledger, limits, no_auth=no_auth, max_body_bytes=max_body_bytes,
                   sequences=sequences, requests=requests,
                   shared_prefix_cache=shared_prefix_cache, allowed_hosts=allowed_hosts)


class Service:
    def __init__(self, engine: EngineThread, ledger: Any, limits: api.Limits, *,
                 no_auth: bool, max_body_bytes: int,
                 sequences: admission.PerKeyLimit | None = None,
                 requests: admission.PerKeyLimit | None = None,
                 shared_prefix_cache: bool = False, allowed_hosts: tuple[str, ...] = ()):
        self.engine, self.ledger, self.limits = engine, ledger, limits
        self.no_auth, self.max_body_bytes = no_auth, max_body_bytes
        self.sequences = sequences or admission.sequence_limit(
            admission.DEFAULT_MAX_SEQUENCES_PER_KEY)
        self.requests = requests   # None: no limit
        self.admission = admission.EdgeAdmission(ledger, limits.model_name, self.sequences,
                                                 self.model_info, requests)
        self.shared_prefix_cache, self.allowed_hosts = shared_prefix_cache, allowed_hosts
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
        too_large = body_too_large(self.max_body_bytes)
        if content_length is not None and content_length > DRAIN_LIMIT_BYTES:
            raise too_large
        chunks, size = [], 0
        while chunk := stream.read(1 << 20):   # from memory (see request_buffer.py)
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
        """Takes the key's sequences, reserves engine room, checks the quota exactly and
        admits the ledger row, submits.

        Returns the Generation and the quota's x-ratelimit-* headers.
        """
        count = len(prepared.prompts)
        sequences = count * prepared.params.n
        self._take(key, sequences)   # 429 (400: more sequences than the whole limit)
        try:
            self.engine.reserve(count)
        except Unavailable as error:
            self._give_back(key, sequences)
            raise ApiError(503, str(error), type="server_error", code="unavailable",
                           headers={"Retry-After": "1"}) from None
        generation = Generation(
            response_id=response_id, prompts=prepared.prompts, params=prepared.params, key=key,
            model=self.limits.model_name, ledger=self.ledger, metrics=self.metrics,
            engine=self.engine, arrival=arrival, on_final=self._forget,
            tenant=str(key.id), cache_salt=None if self.shared_prefix_cache else str(key.id))
        try:
            # Checks the quota and inserts the running row in one transaction.
            decision = self.ledger.try_admit(
                response_id, key, self.limits.model_name, prepared.estimated_tokens,
                prompt_tokens=sum(len(prompt.token_ids) for prompt in prepared.prompts))
            headers = admission.header_strings(decision.headers)
            if not decision.allowed:
                raise admission.quota_error(decision, headers)
        except BaseException:
            self.engine.release(count)
            self._give_back(key, sequences)
            raise
        with self._lock:
            self._generations[response_id] = generation
        generation.submit()
        headers["X-Request-Id"] = response_id
        return generation, headers

    def _forget(self, generation: Generation) -> None:
        with self._lock:
            known = self._generations.pop(generation.response_id, None) is not None
        if known:   # its request and sequences were taken in start(), once
            self._give_back(generation.key, len(generation.prompts) * generation.params.n)

    def _take(self, key: Any, sequences: int) -> None:
        if self.requests is not None:
            self.requests.take(key, 1)
        try:
            self.sequences.take(key, sequences)
        except BaseException:
            if self.requests is not None:
                self.requests.give_back(key, 1)
            raise

    def _give_back(self, key: Any, sequences: int) -> None:
        self.sequences.give_back(key, sequences)
        if self.requests is not None:
            self.requests.give_back(key, 1)

    # ------------------------------------------------------------------ other routes
    def tokenize(self, key: Any, body: dict) -> dict:
        """POST /tokenize (vLLM's shape): a prompt's or messages' token ids, counted against
        the key's requests per minute before tokenizing."""
        api.check_model(body, self.limits)
        info = self.model_info()
        with self.admission.counted_call(key, "tokenize"):
            return tokenization.tokenize(info, self.limits, body)

    def detokenize(self, key: Any, body: dict) -> dict:
        """POST /detokenize: the text of token ids, counted as /tokenize is."""
        api.check_model(body, self.limits)
        info = self.model_info()
        with self.admission.counted_call(key, "detokenize"):
            return tokenization.detokenize(info, body)

    def tokenizer_info(self) -> dict:
        """GET /tokenizer_info, as vLLM answers it (see engine/serving/tokenization.py)."""
        info = self.model_info()
        return tokenization.tokenizer_info(info, getattr(self.engine.engine, "model_path", None))

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
        """Aborts whatever still runs and finalizes every open ledger row as aborted, billed
        on what was sent (a stream still being written has not been sent whole, even when
        its engine requests finished); the streams send nothing more."""
        self.shutting_down = True
        self.engine.request_stop(0.0)
        self.engine.join(join_seconds)
        with self._lock:
            open_generations = list(self._generations.values())
        for generation in open_generations:
            generation.finalize("aborted")
        if open_generations:
            logger.info("shutdown: finalized %d open requests", len(open_generations))


def _parse_time(name: str, value: str | None) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        if value.replace(".", "", 1).isdigit():
            moment = datetime.fromtimestamp(float(value), timezone.utc)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # The ledger compares in UTC: a time whose UTC falls outside years 1-9999 (9999-12-31
        # at -23:59) has none.
        if moment.tzinfo is not None:
            moment.astimezone(timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise invalid(name, value, "an ISO 8601 date or time, or unix seconds, within years "
                      "1-9999 in UTC") from None
    return moment
