"""OpenAI request bodies -> typed, validated requests (no JAX, no Flask).

Everything a client can get wrong is checked here, before a request is admitted: each mistake
is an ApiError that names the field, the value and what was expected, answered as HTTP 400 in
OpenAI's error shape. Numeric fields are read within the engine's own bounds
(`engine/sampling_params.py` RANGES: what the runner packs into int32 / float32), and every
string of a body must be valid Unicode (`parse_json_body`), so a request that parses can run.
Checks that need the model (token ids within the vocabulary, prompt plus max_tokens within the
context) live in `engine/openai/prompts.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.openai.constraints import (ToolRequest, parse_structured_output, parse_tools,
                                       tool_call_constraint)
# The shared error and field readers, also re-exported: callers take them from here.
from engine.openai.fields import (OPENAI_RANGES, ApiError, get_bool, get_int,  # noqa: F401
                                  get_ranged, get_str, invalid)
from engine.openai.tools import PARSERS
from engine.sampling_params import RANGES, InvalidParamError, check_unicode, is_int
from engine.structured import StructuredOutput
from engine.tokenizer.chat_template import validate_messages

Prompt = str | list[int]


@dataclass(slots=True, frozen=True)
class Limits:
    """What one server accepts beyond the sampling rules."""

    model_name: str
    max_n: int = 16
    max_prompts: int = 64
    max_stop: int = 16
    # max_tokens of a request that gives none (cut to the context it leaves); None: OpenAI's
    # 16 for completions, the whole remaining context for chat.
    default_max_tokens: int | None = None
    # The format tool calls are parsed in for tool_choice "auto" (--tool-call-parser); None:
    # the one the chat template writes (engine/openai/tools.py: detect_parser).
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_n", "max_prompts", "max_stop", "default_max_tokens"):
            value = getattr(self, name)
            if value is not None or name != "default_max_tokens":
                if not (is_int(value) and value >= 1):
                    raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if self.tool_call_parser not in (None, *PARSERS):
            raise ValueError(f"tool_call_parser={self.tool_call_parser!r}: expected one of "
                             f"{PARSERS}")


@dataclass(slots=True)
class SamplingFields:
    """The sampling fields of a body, only those the client set (None = model default)."""

    max_tokens: int | None
    fields: dict[str, Any]          # SamplingParams keyword arguments
    default_max_tokens: int | None  # max_tokens when the body gives none (None: the context)
    n: int
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"   # the body field max_tokens came from, for errors


@dataclass(slots=True)
class CompletionRequest:
    prompts: list[Prompt]
    sampling: SamplingFields
    echo: bool
    logprobs: int | None
    structured_output: StructuredOutput | None = None


@dataclass(slots=True)
class ChatRequest:
    """structured_output: response_format / guided_* / a tool_choice that constrains;
    tools: the tools and tool_choice (None without tools)."""

    messages: list[dict]
    sampling: SamplingFields
    logprobs: bool
    top_logprobs: int | None
    structured_output: StructuredOutput | None = None
    tools: ToolRequest | None = None


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object; invalid UTF-8, invalid JSON, a non-object or a string that
    is not valid Unicode (anywhere in it) is a 400."""
    body = json_object(decode_json(raw))
    check_json_text(body)
    return body


def decode_json(raw: bytes) -> Any:
    """Any JSON value; invalid UTF-8 or invalid JSON (NaN and Infinity included) is a 400.
    Its strings may still hold lone surrogates: see check_json_text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"body is not valid UTF-8 (byte {error.start})",
                       code="invalid_encoding") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"body is not valid JSON: {str(error)[:120]}",
                       code="invalid_json") from None


def check_json_text(value: Any, path: str = "") -> None:
    """A 400 naming the JSON path of the first string (or key) in `value` that is not valid
    Unicode, such as "messages[0].content" or "stop[1]".

    Valid UTF-8 cannot encode a surrogate, but JSON's "\\ud800" escape decodes to a lone one,
    which no tokenizer, template or UTF-8 response can carry.
    """
    stack = [(path, value)]
    while stack:   # depth-first, in document order, without recursion (bodies nest deeply)
        path, item = stack.pop()
        if isinstance(item, str):
            _check_text(path or "body", item)
        elif isinstance(item, dict):
            members = []
            for key, child in item.items():
                _check_text(_member(path, ascii(key)), key)
                if isinstance(child, (str, list, dict)):
                    members.append((_member(path, key), child))
            stack.extend(reversed(members))
        elif isinstance(item, list):
            stack.extend((f"{path}[{index}]", item[index]) for index in
                         reversed(range(len(item))) if isinstance(item[index], (str, list, dict)))


def _member(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_text(path: str, text: str) -> None:
    try:
        check_unicode(path, text)
    except InvalidParamError as error:
        raise ApiError(400, str(error), param=path, code="invalid_encoding") from None


def json_object(body: Any) -> dict:
    """A decoded body that must be a JSON object (a 400 otherwise)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"body is a JSON {type(body).__name__}: expected an object",
                       code="invalid_json")
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# ------------------------------------------------------------------ shared fields
def check_model(body: dict, limits: Limits) -> None:
    model = get_str(body, "model")
    if model is not None and model != limits.model_name:
        # 404, as OpenAI and vLLM answer (the client raises NotFoundError).
        raise ApiError(404, f"model={model[:80]!r}: this server serves {limits.model_name!r}",
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
    bounds = RANGES["stop_token_ids"]
    if not isinstance(ids, list) or len(ids) > 64 or not all(bounds.contains(t) for t in ids):
        raise invalid("stop_token_ids", ids, f"a list of at most 64 token ids in "
                      f"[0, {bounds.high}]")
    return tuple(ids)


def parse_sampling(body: dict, limits: Limits, max_tokens: int | None,
                   max_tokens_param: str = "max_tokens") -> SamplingFields:
    """Reads the fields both endpoints share; `max_tokens` is the endpoint's resolved limit,
    read from body field `max_tokens_param`."""
    check_model(body, limits)
    get_str(body, "user")
    _unsupported(body, "logit_bias", (None, {}))
    _unsupported(body, "suffix", (None, ""))
    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "top_k", "seed", "min_tokens"):
        value = get_ranged(body, name)
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
    return SamplingFields(max_tokens, fields, limits.default_max_tokens, n, stream,
                          include_usage, max_tokens_param)


# ------------------------------------------------------------------ endpoints
def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    """POST /v1/completions: prompt as text, texts, token ids or lists of token ids."""
    prompts = _prompts(body.get("prompt"), limits)
    max_tokens = get_int(body, "max_tokens", 0)
    sampling = parse_sampling(body, limits, max_tokens)
    if sampling.default_max_tokens is None:
        sampling.default_max_tokens = 16   # OpenAI's legacy default for completions
    logprobs = get_ranged(body, "logprobs")
    return CompletionRequest(prompts, sampling, get_bool(body, "echo"), logprobs,
                             parse_structured_output(body))


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
    tools = parse_tools(body, limits.tool_call_parser)
    structured = parse_structured_output(body)
    forced = tool_call_constraint(tools) if tools is not None else None
    if forced is not None and structured is not None:
        raise invalid("tool_choice", body.get("tool_choice"), f"{tools.choice!r} only without "
                      "response_format or guided_* (both constrain the output)")
    max_tokens_param = "max_completion_tokens"   # OpenAI's name now; max_tokens still read
    max_tokens = get_int(body, max_tokens_param, 1)
    if max_tokens is None:
        max_tokens_param = "max_tokens"
        max_tokens = get_int(body, max_tokens_param, 1)
    sampling = parse_sampling(body, limits, max_tokens, max_tokens_param)
    logprobs = get_bool(body, "logprobs")
    top_logprobs = get_int(body, "top_logprobs", 0, RANGES["logprobs"].high)
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs", top_logprobs, "it only together with logprobs=true")
    return ChatRequest(messages, sampling, logprobs, top_logprobs, forced or structured, tools)
