"""The tokenizer routes' answers, in vLLM's shapes: /tokenize, /detokenize, /tokenizer_info.

Plain functions of the served model (ModelInfo) and a parsed JSON body; the Service checks
the key, the model name and the key's requests per minute around them (no JAX, no web
framework).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.info import ModelInfo
from engine.openai import api
from engine.openai.api import ApiError, invalid
from engine.openai.prompts import template_messages
from engine.sampling_params import is_int
from engine.tokenizer.chat_template import load_chat_templates

# Paths on the server's disk, which tell a client nothing it can use (vLLM drops them too).
_PRIVATE_FIELDS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")


def tokenize(info: ModelInfo, limits: api.Limits, body: dict) -> dict:
    """POST /tokenize: {"prompt": text} or {"messages": [...], "tools": [...]} -> count,
    max_model_len, tokens (and token_strs when return_token_strs is true). Tools render
    through the chat template as a chat request's do, so the count is the one billed."""
    if body.get("messages") is not None:
        chat = api.parse_chat({"messages": body["messages"], "tools": body.get("tools")},
                              limits)
        ids = _render_chat(info, chat.messages, api.get_bool(body, "add_generation_prompt", True),
                           None if chat.tools is None else list(chat.tools.tools))
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


def _render_chat(info: ModelInfo, messages: list, add_generation_prompt: bool,
                 tools: list[dict] | None = None) -> list:
    try:
        return info.tokenizer.apply_chat_template(
            template_messages(messages), add_generation_prompt=add_generation_prompt,
            tokenize=True, tools=tools)
    except Exception as error:  # noqa: BLE001 - a template failing on user input is a 400
        raise ApiError(400, f"messages: the chat template could not render them: "
                       f"{str(error)[:200]}", param="messages") from None


def detokenize(info: ModelInfo, body: dict) -> dict:
    """POST /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            is_int(t) and 0 <= t < info.vocab_size
            for t in tokens):
        raise invalid("tokens", tokens, f"a list of token ids in [0, {info.vocab_size})")
    return {"prompt": info.tokenizer.decode(tokens)}


def tokenizer_info(info: ModelInfo, model_dir: str | Path | None) -> dict:
    """GET /tokenizer_info, as vLLM answers it: the tokenizer's configuration
    (tokenizer_config.json without file paths) with tokenizer_class and chat_template.

    lm-evaluation-harness's remote tokenizer reads eos_token, bos_token, pad_token and
    chat_template from it (and needs eos_token present) before it tokenizes through
    /tokenize; it falls back to a local tokenizer when this route fails. The special tokens
    are the ones this server's tokenizer uses, as strings; model_max_length is this server's
    context (max_model_len), not the tokenizer file's placeholder.
    """
    config = _read_config(model_dir)
    answer = {name: value for name, value in config.items() if name not in _PRIVATE_FIELDS}
    tokenizer = info.tokenizer
    for name, token_id in (("bos_token", tokenizer.bos_token_id),
                           ("eos_token", tokenizer.eos_token_id),
                           ("pad_token", tokenizer.pad_token_id)):
        answer[name] = (None if token_id is None
                        else tokenizer.decode([token_id], skip_special_tokens=False))
    answer["tokenizer_class"] = config.get("tokenizer_class") or "PreTrainedTokenizerFast"
    answer["model_max_length"] = info.max_model_len
    answer["vocab_size"] = info.vocab_size
    templates = load_chat_templates(Path(model_dir), config) if model_dir is not None else {}
    if "default" in templates:
        answer["chat_template"] = templates["default"]
    else:
        answer.pop("chat_template", None)   # a list of named templates, or none
    return answer


def _read_config(model_dir: str | Path | None) -> dict[str, Any]:
    path = None if model_dir is None else Path(model_dir) / "tokenizer_config.json"
    if path is None or not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    return config if isinstance(config, dict) else {}
