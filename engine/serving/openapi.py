"""The server's OpenAPI 3.1 document (GET /openapi.json): its routes and request bodies.

The numeric bounds come from the one place the server validates them (engine.sampling_params
RANGES, narrowed by engine.openai.api.OPENAI_RANGES) and the list limits from the server's
api.Limits, so a body valid by this document is one the server accepts, and a fuzzer
(tests/server/test_fuzz.py) generates bodies from it and mutates them. No JAX.
"""

from __future__ import annotations

from typing import Any

from engine.openai import api
from engine.openai.constraints import MAX_TOOLS, TOOL_CHOICES
from engine.sampling_params import RANGES

_SAMPLED = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "top_k", "seed", "min_tokens")


def _ranged(name: str) -> dict:
    bounds = api.OPENAI_RANGES.get(name) or RANGES[name]
    schema: dict[str, Any] = {"type": "integer" if bounds.integer else "number",
                              "maximum": bounds.high}
    schema["exclusiveMinimum" if bounds.low_open else "minimum"] = bounds.low
    return schema


def _array(items: dict, most: int | None = None, least: int = 0) -> dict:
    schema = {"type": "array", "items": items, "minItems": least}
    return schema if most is None else {**schema, "maxItems": most}


def _sampling(limits: api.Limits) -> dict:
    token_id = {"type": "integer", "minimum": 0}
    stop_text = {"type": "string", "minLength": 1, "maxLength": 1024}
    fields = {name: _ranged(name) for name in _SAMPLED}
    fields.update({
        "model": {"type": "string", "enum": [limits.model_name]},
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object",
                           "properties": {"include_usage": {"type": "boolean"}}},
        "stop": {"anyOf": [stop_text, _array(stop_text, limits.max_stop)]},
        "stop_token_ids": _array(token_id, 64),
        "ignore_eos": {"type": "boolean"},
        "user": {"type": "string"},
    })
    fields.update(_constraints())
    return fields


def _constraints() -> dict:
    """The output constraints both routes take (engine/openai/constraints.py); one per body."""
    name = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
    schema = {"type": "object"}
    text = {"type": "string", "minLength": 1}
    choice = _array(text, least=1)
    json_schema = {"type": "object", "required": ["name", "schema"], "properties": {
        "name": name, "schema": schema, "strict": {"type": "boolean"},
        "description": {"type": "string"}}}
    return {
        "response_format": {"anyOf": [
            {"type": "object", "required": ["type"],
             "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"],
             "properties": {"type": {"const": "json_schema"}, "json_schema": json_schema}}]},
        "guided_json": {"anyOf": [schema, text]},
        "guided_regex": text,
        "guided_grammar": text,
        "guided_choice": choice,
        "structured_outputs": {"type": "object", "properties": {
            "json": {"anyOf": [schema, text]}, "regex": text, "grammar": text,
            "choice": choice, "json_object": {"type": "boolean"}}},
    }


def _tools() -> dict:
    """Chat's tools, tool_choice and parallel_tool_calls; a named function must be one of
    the tools."""
    name = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
    tool = {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": name, "description": {"type": "string"},
            "parameters": {"type": "object"}}}}}
    named = {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": name}}}}
    return {"tools": _array(tool, MAX_TOOLS),
            "tool_choice": {"anyOf": [{"enum": list(TOOL_CHOICES)}, named]},
            "parallel_tool_calls": {"type": "boolean"}}


def _completion(limits: api.Limits) -> dict:
    token_ids = _array({"type": "integer", "minimum": 0}, least=1)
    prompt = {"anyOf": [{"type": "string", "minLength": 1},
                        _array({"type": "string", "minLength": 1}, limits.max_prompts, 1),
                        token_ids, _array(token_ids, limits.max_prompts, 1)]}
    properties = {**_sampling(limits), "prompt": prompt,
                  "max_tokens": {"type": "integer", "minimum": 0,
                                 "maximum": RANGES["max_tokens"].high},
                  "echo": {"type": "boolean"}, "logprobs": _ranged("logprobs")}
    return {"type": "object", "required": ["prompt"], "properties": properties}


def _chat(limits: api.Limits) -> dict:
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "user", "assistant", "developer"]},
        "content": {"anyOf": [{"type": "string"}, _array(part, least=1)]}}}
    max_tokens = {"type": "integer", "minimum": 1, "maximum": RANGES["max_tokens"].high}
    properties = {**_sampling(limits), **_tools(), "messages": _array(message, least=1),
                  "max_tokens": max_tokens, "max_completion_tokens": max_tokens,
                  "logprobs": {"type": "boolean"}, "top_logprobs": _ranged("logprobs")}
    return {"type": "object", "required": ["messages"], "properties": properties}


def _tokenize(limits: api.Limits) -> dict:
    return {"type": "object", "properties": {
        "model": {"type": "string", "enum": [limits.model_name]},
        "prompt": {"type": "string"}, "messages": _chat(limits)["properties"]["messages"],
        "tools": _tools()["tools"],
        "add_special_tokens": {"type": "boolean"}, "add_generation_prompt": {"type": "boolean"},
        "return_token_strs": {"type": "boolean"}}}


def _detokenize(limits: api.Limits) -> dict:
    return {"type": "object", "required": ["tokens"], "properties": {
        "model": {"type": "string", "enum": [limits.model_name]},
        "tokens": _array({"type": "integer", "minimum": 0})}}


def _post(summary: str, body: dict) -> dict:
    return {"post": {"summary": summary, "security": [{"bearer": []}],
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": body}}},
                     "responses": _RESPONSES}}


def _get(summary: str, secured: bool = True, parameters: list | None = None) -> dict:
    operation = {"summary": summary, "responses": _RESPONSES,
                 "security": [{"bearer": []}] if secured else []}
    return {"get": {**operation, "parameters": parameters} if parameters else operation}


_RESPONSES = {"200": {"description": "OK"},
              "default": {"description": "An error: {\"error\": {message, type, param, code}}"}}
_USAGE_PARAMETERS = [{"name": name, "in": "query", "required": False,
                      "schema": {"type": "string"}} for name in ("group_by", "key", "start", "end")]


def openapi_document(limits: api.Limits) -> dict:
    """The OpenAPI 3.1 document of a server with these limits."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ember", "version": "1",
                 "description": "OpenAI-compatible completions with API keys, quotas and a "
                                "usage ledger"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/completions": _post("Text completions", _completion(limits)),
            "/v1/chat/completions": _post("Chat completions", _chat(limits)),
            "/tokenize": _post("Token ids of a prompt or conversation", _tokenize(limits)),
            "/detokenize": _post("Text of token ids", _detokenize(limits)),
            "/v1/models": _get("The served model"),
            "/v1/usage": _get("The key's usage (any key's for an admin key)",
                              parameters=_USAGE_PARAMETERS),
            "/tokenizer_info": _get("The tokenizer's configuration and chat template"),
            "/health": _get("200 once the engine serves, else 503", secured=False),
            "/metrics": _get("Prometheus metrics (nothing per key)", secured=False),
            "/openapi.json": _get("This document", secured=False),
        },
    }
