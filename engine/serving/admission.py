"""Admission at the HTTP edge: what can be refused before a prompt is tokenized (no JAX).

Tokenizing costs CPU in proportion to the prompt (a 4 MB prompt takes seconds), so the
Service first checks what the parsed body alone tells, with lower bounds:

- each prompt has at least ceil(UTF-8 bytes / the most bytes one token covers) tokens, so a
  prompt that cannot fit max_model_len is a 400 without tokenizing it (a chat's prompt is the
  text its template renders, what it writes around each message included);
- the request's quota estimate (prompts plus n * max_tokens) is at least those bounds plus
  n * the max_tokens the body sets: a key past its requests/min, tokens/min or tokens/day gets
  its 429 at once (Ledger.check_quota), and a request larger than the key's whole quota a 400;
- the key's requests and engine sequences in flight (request_limit, sequence_limit).

A lower bound never refuses what the exact admission after tokenization (Ledger.try_admit with
the exact estimate) would admit, so the exact admission stays the one that counts.
"""

from __future__ import annotations

import contextlib
import math
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from engine.info import ModelInfo
from engine.openai.api import ApiError, SamplingFields
from engine.sampling_params import is_int

DEFAULT_MAX_SEQUENCES_PER_KEY = 256
# Decoding one token alone can drop a byte its text covers twice over: a leading
# metaspace and a space cleaned up before punctuation.
_DECODE_SLACK_BYTES = 2


def max_token_bytes(tokenizer: Any, vocab_size: int) -> int:
    """An upper bound on the UTF-8 bytes of text that one token stands for.

    A byte-level token that is part of a character decodes to U+FFFD (3 bytes), which only
    overstates it; an overstated bound is still a valid one, just a weaker one.
    """
    longest = max((len(tokenizer.decode([token], skip_special_tokens=False)
                       .encode("utf-8", "surrogatepass")) for token in range(vocab_size)),
                  default=1)
    return longest + _DECODE_SLACK_BYTES


def prompt_tokens_at_least(prompt: str | list[int], bytes_per_token: int) -> int:
    """A lower bound on the tokens of a prompt (exact for token ids)."""
    if isinstance(prompt, str):
        return math.ceil(len(prompt.encode("utf-8", "surrogatepass")) / bytes_per_token)
    return len(prompt)


def header_strings(headers: Mapping[str, Any] | None) -> dict[str, str]:
    return {name: str(value) for name, value in (headers or {}).items()}


def quota_error(decision: Any, headers: dict[str, str]) -> ApiError:
    """The answer to a quota refusal: 400 when the request alone exceeds a whole quota
    (waiting never helps), else 429 with Retry-After."""
    if decision.too_large:
        return ApiError(400, decision.reason or "the request exceeds the key's quota",
                        code="request_exceeds_quota", headers=headers)
    if decision.retry_after:
        headers = {**headers, "Retry-After": str(max(1, math.ceil(decision.retry_after)))}
    return ApiError(429, decision.reason or "rate limit exceeded", type="rate_limit_error",
                    code="rate_limit_exceeded", headers=headers)


class PerKeyLimit:
    """At most `limit` of something in flight per key: engine sequences (prompts x n, queued
    or running), so that one key's burst cannot fill the engine's queue ahead of everyone
    else's requests, or HTTP requests being answered, so that one key cannot hold every HTTP
    thread (a client that stops reading holds one until the write timeout).

    Args:
      limit: the most one key may have in flight.
      flag: the `ember serve` flag that sets it, named in refusals.
      what: what is counted, as a refusal says it ("sequences", "requests").
      code: the refusals' error code.
      detail: how a whole request counts, in a 400 (one larger than the limit alone).
    """

    def __init__(self, limit: int, *, flag: str, what: str, code: str, detail: str = ""):
        if not is_int(limit) or limit < 1:
            raise ValueError(f"{flag.lstrip('-').replace('-', '_')}={limit!r}: expected an "
                             "integer >= 1")
        self.limit, self.flag, self.what, self.code, self.detail = limit, flag, what, code, detail
        self._held: dict[int, int] = {}   # key id -> count in flight
        self._lock = threading.Lock()

    def held(self, key: Any) -> int:
        with self._lock:
            return self._held.get(key.id, 0)

    def check(self, key: Any, count: int) -> None:
        """Raises the 400 or 429 that take() would, without taking anything."""
        with self._lock:
            self._refuse_if_over(key, count, self._held.get(key.id, 0))

    def take(self, key: Any, count: int) -> None:
        """Counts `count` more for the key, or raises (400: more than the whole limit; 429
        with Retry-After: the limit is reached for now)."""
        with self._lock:
            held = self._held.get(key.id, 0)
            self._refuse_if_over(key, count, held)
            self._held[key.id] = held + count

    def give_back(self, key: Any, count: int) -> None:
        with self._lock:
            left = self._held.get(key.id, 0) - count
            if left > 0:
                self._held[key.id] = left
            else:
                self._held.pop(key.id, None)

    def _refuse_if_over(self, key: Any, count: int, held: int) -> None:
        if count > self.limit:
            raise ApiError(400, f"the request has {count} {self.what}{self.detail}: more than "
                           f"the {self.limit} one key may have in flight ({self.flag})",
                           code=self.code)
        if held + count > self.limit:
            raise ApiError(429, f"key {key.name!r} has {held} {self.what} in flight; "
                           f"{count} more would pass its limit of {self.limit} ({self.flag}): "
                           "retry when some finish", type="rate_limit_error",
                           code=self.code, headers={"Retry-After": "1"})


def sequence_limit(limit: int) -> PerKeyLimit:
    """The engine sequences (prompts x n) one key may have queued or running."""
    return PerKeyLimit(limit, flag="--max-sequences-per-key", what="sequences",
                       code="too_many_sequences", detail=" (prompts x n)")


def request_limit(limit: int) -> PerKeyLimit:
    """The HTTP requests one key may have in flight, from admission until its ledger row is
    final (a response's last write follows, bounded by the write timeout)."""
    return PerKeyLimit(limit, flag="--max-requests-per-key", what="requests",
                       code="too_many_requests")


class EdgeAdmission:
    """A server's checks of a key before the engine sees its request.

    Args:
      ledger: the metering Ledger (check_quota, try_admit, finalize).
      model_name: the served model, as ledger rows name it.
      sequences: the per-key sequence_limit.
      model_info: returns the served ModelInfo (raises a 503 while the engine warms up).
      requests: the per-key request_limit (None: none).
    """

    def __init__(self, ledger: Any, model_name: str, sequences: PerKeyLimit,
                 model_info: Callable[[], ModelInfo], requests: PerKeyLimit | None = None):
        self.ledger, self.model_name, self.sequences = ledger, model_name, sequences
        self.requests = requests
        self._model_info = model_info
        self._bytes_per_token: int | None = None

    def precheck(self, key: Any, prompts: list, sampling: SamplingFields, *,
                 param: str = "prompt") -> None:
        """What can be refused before tokenizing, on lower bounds: a 429 for a key past its
        quota or its requests or sequences in flight, a 400 for a prompt that cannot fit the
        context or a request larger than the key's whole quota.

        Args:
          key: the caller's key.
          prompts: the request's prompts, as text or token ids (chat: the text its template
            renders).
          sampling: the parsed sampling fields (n, max_tokens).
          param: the body field the prompts came from, for a 400's `param`.
        """
        context = self._model_info().max_model_len
        per_prompt = [prompt_tokens_at_least(p, self._max_token_bytes()) for p in prompts]
        if self.requests is not None:
            self.requests.check(key, 1)
        self.sequences.check(key, len(prompts) * sampling.n)
        estimate = sum(per_prompt) + len(prompts) * sampling.n * (sampling.max_tokens or 0)
        decision = self.ledger.check_quota(key, estimate)
        if not (decision.allowed or decision.too_large):   # waiting helps: say so first
            raise quota_error(decision, header_strings(decision.headers))
        if max(per_prompt) > context:
            raise ApiError(400, f"{param} has at least {max(per_prompt)} tokens: beyond the "
                           f"context of max_model_len={context}", param=param,
                           code="context_length_exceeded")
        if not decision.allowed:
            raise quota_error(decision, header_strings(decision.headers))

    def _max_token_bytes(self) -> int:
        if self._bytes_per_token is None:   # once; a race computes the same number twice
            info = self._model_info()
            self._bytes_per_token = max_token_bytes(info.tokenizer, info.vocab_size)
        return self._bytes_per_token

    @contextlib.contextmanager
    def counted_call(self, key: Any, kind: str) -> Iterator[None]:
        """Counts a /tokenize or /detokenize call against the key's requests per minute: a
        zero-token ledger row ("{kind}-<hex>") admitted through the quota before the work
        (429 when the key is past its rpm) and finalized after it (completed, or error when
        the input was refused). Rows, not memory, so replicas sharing a ledger agree."""
        request_id = f"{kind}-{uuid.uuid4().hex}"
        decision = self.ledger.try_admit(request_id, key, self.model_name, 0)
        if not decision.allowed:
            raise quota_error(decision, header_strings(decision.headers))
        status = "error"
        try:
            yield
            status = "completed"
        finally:
            self.ledger.finalize(request_id, status, 0, 0, 0)
