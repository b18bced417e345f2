"""OpenAI request bodies -> typed, validated requests (no JAX, no Flask).

Everything a client can get wrong is checked here, before a request is admitted: each mistake
is an ApiError that names the field, the value and what was expected, answered as HTTP 400 in
OpenAI's error shape. Checks that need the model (token ids within the vocabulary, prompt plus
max_tokens within the context) live in `engine/openai/prompts.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import MAX_TOP_LOGPROBS, is_int
from engine.tokenizer.chat_template import validate_messages

Prompt = str | list[int]


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(slots=True, frozen=True)
class Limits:
    """What one server accepts beyond the sampling rules."""

    model_name: str
    max_n: int = 16
    max_prompts: int = 64
    max_stop: int = 16


@dataclass(slots=True)
class SamplingFields:
    """The sampling fields of a body, only those the client set (None = model default)."""

    max_tokens: int | None
    fields: dict[str, Any]          # SamplingParams keyword arguments
    n: int
    stream: bool
    include_usage: bool


@dataclass(slots=True)
class CompletionRequest:
    prompts: list[Prompt]
    sampling: SamplingFields
    echo: bool
    logprobs: int | None


@dataclass(slots=True)
class ChatRequest:
    messages: list[dict]
    sampling: SamplingFields
    logprobs: bool
    top_logprobs: int | None


def invalid(name: str, value: Any, expected: str, code: str = "invalid_value") -> ApiError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ApiError(400, f"{name}={shown}: expected {expected}", param=name, code=code)


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object; invalid UTF-8, invalid JSON or a non-object is a 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"body is not valid UTF-8 (byte {error.start})",
                       code="invalid_encoding") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"body is not valid JSON: {str(error)[:120]}",
                       code="invalid_json") from None
    return json_object(body)


def json_object(body: Any) -> dict:
    """A decoded body that must be a JSON object (a 400 otherwise)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"body is a JSON {type(body).__name__}: expected an object",
                       code="invalid_json")
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# ------------------------------------------------------------------ typed field readers
def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def get_int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise invalid(name, value, "an integer", "invalid_type")
    if value < low or (high is not None and value > high):
        raise invalid(name, value, f"an integer in [{low}, {high}]" if high is not None
                      else f"an integer >= {low}")
    return value


def get_number(body: dict, name: str, low: float, high: float, *,
               low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise invalid(name, value, "a finite number", "invalid_type")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(name, value, f"a number in {bracket}{low}, {high}]")
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, value, "true or false", "invalid_type")
    return value


def get_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, value, "a string", "invalid_type")
    return value


# ------------------------------------------------------------------ shared fields
def check_model(body: dict, limits: Limits) -> None:
    model = get_str(body, "model")
    if model is not None and model != limits.model_name:
        raise ApiError(400, f"model={model[:80]!r}: this server serves {limits.model_name!r}",
                       param="model", code="model_not_found")


def _unsupported(body: dict, name: str, allowed: tuple = (None,)) -> None:
    if body.get(name, None) not in allowed:
        raise invalid(name, body[name], "it to be left out: not supported by this server",
                      "unsupported_parameter")


def _stop(body: dict, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > limits.max_stop
            or not all(isinstance(s, str) and 0 < len(s) <= 1024 for s in stops)):
        raise invalid("stop", stop, f"a non-empty string or a list of at most "
                      f"{limits.max_stop} non-empty strings")
    return tuple(stops)


def _stop_token_ids(body: dict) -> tuple[int, ...]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or len(ids) > 64 or not all(is_int(t) and t >= 0 for t in ids):
        raise invalid("stop_token_ids", ids, "a list of at most 64 non-negative token ids")
    return tuple(ids)


def parse_sampling(body: dict, limits: Limits, max_tokens: int | None) -> SamplingFields:
    """Reads the fields both endpoints share; `max_tokens` is the endpoint's resolved limit."""
    check_model(body, limits)
    get_str(body, "user")
    _unsupported(body, "logit_bias", (None, {}))
    _unsupported(body, "suffix", (None, ""))
    fields: dict[str, Any] = {}
    ranged = {"temperature": (0.0, 2.0, False), "top_p": (0.0, 1.0, True),
              "min_p": (0.0, 1.0, False), "presence_penalty": (-2.0, 2.0, False),
              "frequency_penalty": (-2.0, 2.0, False), "repetition_penalty": (0.0, 10.0, True)}
    for name, (low, high, low_open) in ranged.items():
        value = get_number(body, name, low, high, low_open=low_open)
        if value is not None:
            fields[name] = value
    for name, low, high in (("top_k", -1, None), ("seed", -2 ** 63, 2 ** 64 - 1),
                            ("min_tokens", 0, None)):
        value = get_int(body, name, low, high)
        if value is not None:
            fields[name] = value
    if get_bool(body, "ignore_eos"):
        fields["ignore_eos"] = True
    fields["stop"] = _stop(body, limits)
    fields["stop_token_ids"] = _stop_token_ids(body)
    n = get_int(body, "n", 1, limits.max_n) or 1
    best_of = get_int(body, "best_of", 1)
    if best_of is not None and best_of != n:
        raise invalid("best_of", best_of, f"it to equal n={n}: best_of is not supported",
                      "unsupported_parameter")
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", options, "it only together with stream=true")
        if not isinstance(options, dict):
            raise invalid("stream_options", options, "an object", "invalid_type")
        include_usage = get_bool(options, "include_usage")
    return SamplingFields(max_tokens, fields, n, stream, include_usage)


# ------------------------------------------------------------------ endpoints
def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    """POST /v1/completions: prompt as text, texts, token ids or lists of token ids."""
    prompts = _prompts(body.get("prompt"), limits)
    max_tokens = get_int(body, "max_tokens", 0)
    sampling = parse_sampling(body, limits, max_tokens)
    logprobs = get_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return CompletionRequest(prompts, sampling, get_bool(body, "echo"), logprobs)


def _prompts(prompt: Any, limits: Limits) -> list[Prompt]:
    expected = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt", prompt, f"{expected} (non-empty)",
                      "invalid_type" if not isinstance(prompt, list) else "invalid_value")
    if all(is_int(t) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise invalid("prompt", prompt, expected, "invalid_type")
    if len(prompts) > limits.max_prompts:
        raise invalid("prompt", f"<{len(prompts)} prompts>",
                      f"at most {limits.max_prompts} prompts in one request")
    return prompts


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    """POST /v1/chat/completions: messages through the model's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", messages, "a non-empty list of messages",
                      "invalid_type" if not isinstance(messages, list) else "invalid_value")
    try:
        validate_messages(messages)
    except ValueError as error:
        raise ApiError(400, str(error)[:300], param="messages", code="invalid_value") from None
    for name in ("tools", "functions"):
        _unsupported(body, name, (None, []))
    _unsupported(body, "tool_choice", (None, "none", "auto"))
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise invalid("response_format", fmt, '{"type": "text"}: structured output is not '
                      "supported", "unsupported_parameter")
    max_tokens = get_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", 1)
    sampling = parse_sampling(body, limits, max_tokens)
    logprobs = get_bool(body, "logprobs")
    top_logprobs = get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs", top_logprobs, "it only together with logprobs=true")
    return ChatRequest(messages, sampling, logprobs, top_logprobs)
