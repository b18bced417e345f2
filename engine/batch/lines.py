"""Batch request lines -> the server's requests and response bodies (no JAX).

Each input line is read and checked as the server reads an HTTP request (the same parsing,
validation and assemblers: engine/openai/api.py, prompts.py and responses.py), so
an output body is what `ember serve` would answer to that body, and a bad line gets the 4xx
error body the server would give.

Determinism, so that a resumed run writes what an uninterrupted one would:
- ids: the output line's `id` is "batch_req_<h>", and the response's `id` and `request_id`
  (also the ledger row) are "cmpl-<h>" / "chatcmpl-<h>", where h hashes the account, the
  model name, the custom_id, the url and the body. The same line run again for the same
  account (a resume, or a rerun into another output file) is recognised by the ledger and
  billed once: it answers with the same bytes, bar the fields below.
- seeds: a body without "seed" samples with one derived from its custom_id.
- what differs between runs: `created` (when the run that answered the line started) and
  usage.prompt_tokens_details.cached_tokens (prefix-cache hits depend on what ran before).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from engine.info import ModelInfo
from engine.openai import api
from engine.openai.api import ApiError, invalid
from engine.openai.formatting import add_usage
from engine.openai.prompts import PreparedRequest, prepare_chat, prepare_completion
from engine.openai.responses import ChatAssembler, CompletionAssembler
from engine.outputs import RequestOutput, Usage
from engine.sampling_params import lone_surrogate_at

ROUTES = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}
LINE_SEPARATORS = ("\x85", "\u2028", "\u2029")   # raw in json.dumps, breaks to splitlines


@dataclass(slots=True)
class BatchRequest:
    """One input line: the request to run, or the error that answers it.

    custom_id is "line-N" when the line has none (it is not JSON, or lacks the field).
    """

    line_no: int
    custom_id: str
    url: str | None = None
    body: dict | None = None
    error: ApiError | None = None
    raw: bytes = b""


@dataclass(slots=True, frozen=True)
class BatchIds:
    line_id: str      # the output line's "id"
    request_id: str   # the response body's "id", its request_id and the ledger row


@dataclass(slots=True)
class BatchJob:
    """A valid line in flight: its engine prompts and their outputs as they finish."""

    request: BatchRequest
    ids: BatchIds
    prepared: PreparedRequest
    assembler: CompletionAssembler | ChatAssembler
    outputs: list[RequestOutput | None] = field(default_factory=list)

    @property
    def usage(self) -> Usage:
        total = Usage(0, 0, 0)
        for output in self.outputs:
            total = add_usage(total, output.usage)
        return total


def parse_line(line_no: int, raw: bytes) -> BatchRequest:
    """Reads one input line's envelope: {"custom_id", "method": "POST", "url", "body"}."""
    request = BatchRequest(line_no, f"line-{line_no}", raw=raw)
    try:
        line = api.json_object(api.decode_json(raw))
    except ApiError as error:
        request.error = error
        return request
    custom_id = line.get("custom_id")
    if isinstance(custom_id, str) and custom_id and lone_surrogate_at(custom_id) is None:
        request.custom_id = custom_id
    try:
        # The envelope's strings first (they reach the output line), then the body's, named
        # as the server names them ("prompt", not "body.prompt").
        api.check_json_text({name: value for name, value in line.items() if name != "body"})
        if request.custom_id != custom_id:
            raise invalid("custom_id", custom_id, "a non-empty string")
        url, method, body = line.get("url"), line.get("method"), line.get("body")
        if not isinstance(url, str):
            raise invalid("url", url, f"one of {sorted(ROUTES)}")
        if url not in ROUTES:   # what the server answers a request to a route it lacks
            raise ApiError(404, f"no route {method if isinstance(method, str) else 'POST'} "
                           f"{url[:200]}", code="not_found")
        if not isinstance(method, str):
            raise invalid("method", method, "'POST'")
        if method != "POST":
            raise ApiError(405, f"method {method[:20]} is not allowed on {url}",
                           code="method_not_allowed")
        if body is None:
            raise invalid("body", body, "a JSON object: the request's body")
        api.check_json_text(api.json_object(body))
        request.url, request.body = url, body
    except ApiError as error:
        request.error = error
    return request


def parse_input(lines: list[tuple[int, bytes]]) -> list[BatchRequest]:
    """Parses every line; a repeated custom_id is a ValueError naming both lines."""
    requests, seen = [], {}
    for line_no, raw in lines:
        request = parse_line(line_no, raw)
        first = seen.setdefault(request.custom_id, line_no)
        if first != line_no:
            raise ValueError(f"custom_id={request.custom_id!r} appears on line {first} and "
                             f"line {line_no}: expected each custom_id once")
        requests.append(request)
    return requests


def batch_ids(account: str, model: str, request: BatchRequest) -> BatchIds:
    identity = [account, model, request.custom_id, request.url, request.body]
    if request.body is None:
        identity.append(request.raw.decode("utf-8", "replace"))
    try:
        text = json.dumps(identity, sort_keys=True, ensure_ascii=False)
    except RecursionError:   # a body nested about as deep as the JSON reader allows
        text = json.dumps(identity[:4] + [None, request.raw.decode("utf-8", "replace")],
                          ensure_ascii=False)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    return BatchIds(f"batch_req_{digest}", f"{ROUTES.get(request.url, 'req')}-{digest}")


def default_seed(custom_id: str) -> int:
    """The seed of a request that names none: a resumed run samples what the first would."""
    return int.from_bytes(hashlib.sha256(custom_id.encode("utf-8")).digest()[:4], "big")


def plan_job(request: BatchRequest, ids: BatchIds, model: ModelInfo, limits: api.Limits,
             created: int) -> BatchJob:
    """Validates a line's body as the server does and builds its response assembler.

    Raises:
      ApiError: what the server would answer instead of a response.
    """
    if request.error is not None:
        raise request.error
    chat = request.url == "/v1/chat/completions"
    parsed = (api.parse_chat if chat else api.parse_completion)(request.body, limits)
    if parsed.sampling.stream:
        raise invalid("stream", True, "false or left out: a batch answers each request with "
                      "one response body", "unsupported_parameter")
    parsed.sampling.fields.setdefault("seed", default_seed(request.custom_id))
    if chat:
        prepared = prepare_chat(parsed, model)
        assembler = ChatAssembler(parsed, prepared, ids.request_id, created, limits.model_name,
                                  model.tokenizer)
    else:
        prepared = prepare_completion(parsed, model)
        assembler = CompletionAssembler(parsed, prepared, model.tokenizer, ids.request_id,
                                        created, limits.model_name)
    return BatchJob(request, ids, prepared, assembler, [None] * len(prepared.prompts))


def output_line(request: BatchRequest, ids: BatchIds, status_code: int, body: dict) -> bytes:
    """One output line, keys in the order jsonl.py's reader expects."""
    line = {"id": ids.line_id, "custom_id": request.custom_id,
            "response": {"status_code": status_code, "request_id": ids.request_id,
                         "body": body},
            "error": None}
    text = json.dumps(line, ensure_ascii=False)
    # Still the same JSON; but readers that split lines with str.splitlines() would also
    # split at these three, so they travel escaped.
    for separator in LINE_SEPARATORS:
        text = text.replace(separator, f"\\u{ord(separator):04x}")
    return text.encode("utf-8") + b"\n"


def success_line(job: BatchJob) -> bytes:
    body = job.assembler.response(job.outputs, job.usage)
    return output_line(job.request, job.ids, 200, body)


def error_line(request: BatchRequest, ids: BatchIds, error: ApiError) -> bytes:
    return output_line(request, ids, error.status, error.body())
