"""Engine outputs -> OpenAI response bodies, stream chunks and logprobs formats (no JAX)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from engine.outputs import Logprob, PositionLogprobs, Usage

SSE_DONE = b"data: [DONE]\n\n"


def json_text(body: Any) -> str:
    """A response body as JSON text: UTF-8 left unescaped, dates and times as ISO 8601.

    Args:
      body: JSON-able values, and datetime/date (the ledger's usage rows carry them).

    Returns:
      The JSON text.

    Raises:
      TypeError: a value that is neither JSON-able nor a date or time.
    """
    return json.dumps(body, ensure_ascii=False, default=_iso_date)


def _iso_date(value: Any) -> str:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: expected JSON values, "
                    "datetime or date")


def sse(payload: dict) -> bytes:
    """One Server-Sent Event carrying a JSON payload."""
    return b"data: " + json_text(payload).encode("utf-8") + b"\n\n"


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def add_usage(total: Usage, more: Usage) -> Usage:
    return Usage(total.prompt_tokens + more.prompt_tokens,
                 total.completion_tokens + more.completion_tokens,
                 total.cached_tokens + more.cached_tokens)


def _top(position: PositionLogprobs, count: int) -> list[tuple[int, Logprob]]:
    """The `count` most likely tokens of a position, most likely first: (token id, entry)."""
    ranked = sorted(position.items(), key=lambda item: item[1].rank)
    return [(token_id, entry) for token_id, entry in ranked if entry.rank <= count][:count]


# ------------------------------------------------------------------ legacy completions
def completion_logprobs(positions: list[PositionLogprobs | None], token_ids: list[int],
                        count: int, first_offset: int, first_token: str = "") -> dict:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs and text_offset.

    Args:
      positions: per token, {token_id: Logprob} with the actual token among them; None for a
        position nothing predicts (the first prompt token when echoing).
      token_ids: the actual tokens, aligned with positions.
      count: how many top logprobs to list per position.
      first_offset: text offset of the first token in the returned text.
      first_token: the text of a token whose position is None.
    """
    body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = first_offset
    for token_id, position in zip(token_ids, positions):
        if position is None:
            text, logprob, top = first_token, None, None
        else:
            chosen = position[token_id]
            text, logprob = chosen.decoded_token, chosen.logprob
            top = {}
            for _, entry in _top(position, count):   # tokens of the same text: the likelier
                top.setdefault(entry.decoded_token, entry.logprob)
            # The sampled token always, as OpenAI and vLLM list it: up to count + 1 entries.
            top.setdefault(text, logprob)
        body["tokens"].append(text)
        body["token_logprobs"].append(logprob)
        body["top_logprobs"].append(top)
        body["text_offset"].append(offset)
        offset += len(text)
    return body


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(response_id: str, created: int, model: str, choices: list[dict],
                    usage: Usage | None, *, chunk: bool = False, include_usage: bool = True
                    ) -> dict:
    """A whole response, or (chunk=True) one stream chunk; a chunk carries "usage": null only
    when the client asked for usage."""
    body = {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if not chunk or include_usage:
        body["usage"] = None if usage is None else usage_body(usage)
    return body


# ------------------------------------------------------------------ chat
def chat_logprobs(positions: list[PositionLogprobs], token_ids: list[int], count: int,
                  token_bytes: Callable[[int], bytes] | None = None) -> dict:
    """Chat logprobs: per token its text, logprob, bytes and the top `count`.

    `token_bytes` gives a token's own bytes (Tokenizer.token_bytes), which a token holding
    part of a character needs (its text is U+FFFD); None: the UTF-8 of its text.
    """
    def entry_body(token_id: int, entry) -> dict:
        raw = entry.decoded_token.encode("utf-8") if token_bytes is None else token_bytes(
            token_id)
        return {"token": entry.decoded_token, "logprob": entry.logprob, "bytes": list(raw)}

    content = []
    for token_id, position in zip(token_ids, positions):
        content.append({**entry_body(token_id, position[token_id]),
                        "top_logprobs": [entry_body(i, entry)
                                         for i, entry in _top(position, count)]})
    return {"content": content, "refusal": None}


def chat_choice(index: int, content: str | None, finish_reason: str | None,
                logprobs: dict | None = None, tool_calls: list[dict] | None = None) -> dict:
    """One choice of a chat response; tool_calls as engine/openai/tools.py builds them."""
    return {"index": index, "message": {"role": "assistant", "content": content,
                                        "refusal": None, "tool_calls": tool_calls or []},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_body(response_id: str, created: int, model: str, choices: list[dict],
              usage: Usage | None, *, chunk: bool = False, include_usage: bool = True) -> dict:
    body = {"id": response_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if not chunk or include_usage:
        body["usage"] = None if usage is None else usage_body(usage)
    return body
