"""Chat templates: find a model's Jinja template and render messages with it as transformers does.

A template is untrusted code from a model repository, so it runs in Jinja's immutable sandbox. The
environment mirrors transformers' (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII and does not HTML-escape, `{% generation %}` blocks)
so the same template gives the same text. No JAX.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.sampling_params import check_unicode

ROLES = ("system", "user", "assistant", "tool", "developer")
# transformers copies a message's reasoning under each name, as templates read different ones.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def load_chat_templates(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """Returns the directory's chat templates by name; a lone template is named "default".

    Newer transformers saves `chat_template.jinja` (plus `additional_chat_templates/NAME.jinja`),
    which win over `chat_template` in tokenizer_config.json (a string or a list of {name,
    template}); processors of older transformers saved `chat_template.json` instead.
    """
    templates: dict[str, str] = {}
    if (model_dir / "chat_template.jinja").is_file():
        templates["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    configured = tokenizer_config.get("chat_template")
    if configured is None and (model_dir / "chat_template.json").is_file():
        configured = json.loads((model_dir / "chat_template.json").read_text(encoding="utf-8"))
        configured = configured.get("chat_template")
    if isinstance(configured, str):
        return {"default": configured}
    if isinstance(configured, list):
        return {entry["name"]: entry["template"] for entry in configured}
    return {}


def select_chat_template(templates: Mapping[str, str], tools: Sequence[Any] | None,
                         model_dir: Path) -> str:
    """Picks "tool_use" when tools are given and the model has one, else "default"."""
    if not templates:
        raise ValueError(f"{model_dir}: tokenizer_config.json has no chat_template")
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" not in templates:
        raise ValueError(
            f"{model_dir}: chat templates {sorted(templates)}: expected one named 'default'")
    return templates["default"]


def validate_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Checks OpenAI-style messages and returns the copies a template sees.

    Each message is a dict with a role in ROLES and a content that is a string or a list of text
    parts ({"type": "text", "text": str}); an assistant message that carries `tool_calls` may leave
    content out. Keys whose value is None are dropped, as transformers drops them (templates handle
    a missing key better than a literal None).

    Raises:
      ValueError: naming the message index and field, e.g. "messages[2].role='bot': expected ...".
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages={messages!r}: expected a non-empty list of message dicts")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{index}]={message!r}: expected a dict with 'role' and 'content'")
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role={role!r}: expected one of {ROLES}")
        if "content" in message or not (role == "assistant" and message.get("tool_calls")):
            _check_content(index, message.get("content"))
        reasoning = next((message[key] for key in _REASONING_KEYS if key in message), None)
        if reasoning is not None:
            message.setdefault("thinking", reasoning)
            message["reasoning_content"] = reasoning
        checked.append(message)
    return checked


def _check_content(index: int, content: Any) -> None:
    if isinstance(content, str):
        check_unicode(f"messages[{index}].content", content)
        return
    if not isinstance(content, list):
        raise ValueError(f"messages[{index}].content={content!r}: "
                         "expected a string or a list of text parts")
    for part_index, part in enumerate(content):
        is_text = isinstance(part, Mapping) and part.get("type") == "text"
        if not (is_text and isinstance(part.get("text"), str)):
            raise ValueError(f"messages[{index}].content[{part_index}]={part!r}: "
                             "expected {'type': 'text', 'text': <string>}")
        check_unicode(f"messages[{index}].content[{part_index}].text", part["text"])


def render_chat_template(template: str, messages: list[dict[str, Any]], *,
                         add_generation_prompt: bool, tools: Sequence[Any] | None,
                         variables: Mapping[str, Any]) -> str:
    """Renders checked messages; `variables` holds the special tokens and caller kwargs.

    Raises:
      ValueError: when the template calls raise_exception (e.g. roles out of order).
    """
    context = {**variables, "messages": messages, "tools": _check_tools(tools),
               "add_generation_prompt": add_generation_prompt}
    context.setdefault("documents", None)
    try:
        return _compile(template).render(**context)
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template rejected the messages: {error}") from error


def _check_tools(tools: Sequence[Any] | None) -> list[Any] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools={tools!r}: expected a list of JSON-schema dicts")
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{index}]={tool!r}: expected a JSON-schema dict")
    return list(tools)


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (marks assistant text for training masks)
    and renders its body unchanged, which is all inference needs."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body)
        return call.set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
