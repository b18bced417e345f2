"""Tool calls in generated text -> OpenAI `tool_calls`, whole or as stream deltas (no JAX).

What the text holds depends on how the request asked (`ToolCallFormat.mode`):

- "parse" (tool_choice "auto"): the model's own format, named by `parser`:
  - "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen2, Qwen3,
    Hermes templates); text outside the blocks is the message's content;
  - "llama3_json": the whole output one or more `{"name": ..., "parameters": {...}}` objects
    (separated by ";"), after an optional <|python_tag|> (Llama 3.1 to 3.3 templates); an
    output that does not start with such an object is content.
- "array" (tool_choice "required"): the grammar made it `[{"name", "parameters"}, ...]`.
- "named" (a named tool_choice): the grammar made the whole output the function's arguments.

`parse_tool_calls(text, final)` is the one parser: a stream calls it on the text so far
(final=False) and sends what grew since (content held back while it may still turn into a
call, a call only once whole); the response calls it once (final=True). So the content and
calls a stream sends add up to what the response holds. A block whose JSON is not a call stays
content. `arguments` is always JSON text (json.dumps of the arguments, or the named
function's output as generated).
"""

from __future__ import annotations

import json
import secrets
import weakref
from dataclasses import dataclass, field
from typing import Any

PARSERS = ("hermes", "llama3_json")
_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()


@dataclass(slots=True, frozen=True)
class ToolCallFormat:
    """How one request's output holds tool calls: mode "parse" (with a parser), "array" or
    "named" (with function_name); see the module docstring."""

    mode: str
    parser: str | None = None
    function_name: str | None = None


@dataclass(slots=True, frozen=True)
class ParsedCall:
    name: str
    arguments: str   # JSON text


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_tool_calls(text: str, fmt: ToolCallFormat, final: bool
                     ) -> tuple[str, list[ParsedCall]]:
    """(content, calls) of `text`. With final=False only what can no longer change: content
    never includes what may still become a call, and calls are whole; each later answer
    extends the earlier one (its content starts with the earlier content, its calls with
    the earlier calls)."""
    if fmt.mode == "named":
        return "", [ParsedCall(fmt.function_name, text)] if final else []
    if fmt.mode == "array":
        calls = _array_calls(text)
        return (text if final and not calls else ""), calls
    if fmt.parser == "llama3_json":
        return _llama3_json(text, final)
    return _hermes(text, final)


def _as_call(value: Any, *argument_keys: str) -> ParsedCall | None:
    """A decoded {"name": ..., "<arguments key>": {...}} as a call; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in argument_keys if key in value), {})
    if isinstance(arguments, str):   # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _decode_whole(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _hermes(text: str, final: bool) -> tuple[str, list[ParsedCall]]:
    content, calls, position = [], [], 0
    while True:
        start = text.find(_HERMES_START, position)
        if start < 0:
            tail = text[position:]
            content.append(tail if final else _drop_partial_marker(tail, _HERMES_START))
            break
        content.append(text[position:start])
        end = text.find(_HERMES_END, start)
        if end < 0 and not final:
            break   # an open block: wait for its end
        block_end = len(text) if end < 0 else end + len(_HERMES_END)
        body = text[start + len(_HERMES_START):len(text) if end < 0 else end]
        call = _as_call(_decode_whole(body), "arguments", "parameters")
        if call is None:
            content.append(text[start:block_end])
        else:
            calls.append(call)
        position = block_end
        if end < 0:
            break
    joined = "".join(content)
    return (joined.rstrip() if calls or not final else joined), calls


def _drop_partial_marker(text: str, marker: str) -> str:
    """`text` less a tail that could be the start of `marker` ("<tool" of "<tool_call>")."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size]
    return text


def _llama3_json(text: str, final: bool) -> tuple[str, list[ParsedCall]]:
    body = text.lstrip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].lstrip()
    elif not final and _PYTHON_TAG.startswith(body):
        return "", []
    if not body.startswith("{"):
        return (text if final or body else ""), []
    calls, position = [], 0
    while position < len(body):
        try:
            value, end = _DECODER.raw_decode(body, position)
        except ValueError:
            break   # not whole yet (or not JSON: the rest is left out)
        call = _as_call(value, "parameters", "arguments")
        if call is None:
            break
        calls.append(call)
        position = _skip(body, end, " \t\r\n;")
    if not calls and (final or position < len(body) and _whole_json_prefix(body)):
        return text, []   # a JSON object that is not a call: plain content
    return "", calls


def _whole_json_prefix(text: str) -> bool:
    try:
        _DECODER.raw_decode(text)
        return True
    except ValueError:
        return False


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _array_calls(text: str) -> list[ParsedCall]:
    position = _skip(text, 0, " \t\r\n")
    if not text.startswith("[", position):
        return []
    calls, position = [], position + 1
    while True:
        position = _skip(text, position, " \t\r\n,")
        try:
            value, position = _DECODER.raw_decode(text, position)
        except ValueError:
            return calls   # the rest is not whole yet (or was cut by max_tokens)
        call = _as_call(value, "parameters", "arguments")
        if call is None:
            return calls
        calls.append(call)


def call_body(call: ParsedCall, call_id: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def message_tool_calls(text: str, fmt: ToolCallFormat) -> tuple[str | None, list[dict]]:
    """A whole response's (content, tool_calls); content None when calls took it all."""
    content, calls = parse_tool_calls(text, fmt, final=True)
    bodies = [call_body(call, new_call_id()) for call in calls]
    return (content or None) if bodies else text, bodies


def finish_reason(reason: str | None, called: bool, stop_reason: int | str | None = None
                  ) -> str | None:
    """OpenAI's finish_reason: "tool_calls" for an output that ended on its own with calls;
    one a stop string or stop token cut (its call may be incomplete) stays "stop"."""
    return "tool_calls" if called and reason == "stop" and stop_reason is None else reason


@dataclass(slots=True)
class ToolCallStream:
    """One streamed choice: the text so far in, chat deltas out."""

    fmt: ToolCallFormat
    text: str = ""
    content_sent: int = 0
    calls_sent: int = 0
    call_ids: list[str] = field(default_factory=list)

    @property
    def called(self) -> bool:
        return self.calls_sent > 0

    def feed(self, new_text: str, final: bool) -> list[dict]:
        """The deltas (`{"content": ...}` or `{"tool_calls": [...]}`) that `new_text` makes
        sendable; `final` once the choice has finished."""
        self.text += new_text
        if self.fmt.mode == "named":
            return self._named(new_text)
        content, calls = parse_tool_calls(self.text, self.fmt, final)
        deltas = []
        if len(content) > self.content_sent:
            deltas.append({"content": content[self.content_sent:]})
            self.content_sent = len(content)
        for call in calls[self.calls_sent:]:
            self.call_ids.append(new_call_id())
            deltas.append({"tool_calls": [{"index": self.calls_sent,
                                           **call_body(call, self.call_ids[-1])}]})
            self.calls_sent += 1
        return deltas

    def _named(self, new_text: str) -> list[dict]:
        # The arguments are the output itself: a header first, then each piece as it comes.
        deltas = []
        if not self.call_ids:
            self.call_ids.append(new_call_id())
            deltas.append({"tool_calls": [{"index": 0, **call_body(
                ParsedCall(self.fmt.function_name, ""), self.call_ids[0])}]})
            self.calls_sent = 1
        if new_text:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": new_text}}]})
        return deltas


_formats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def detect_parser(tokenizer) -> str:
    """The tool-call format the model's chat template writes for an assistant's call:
    "hermes" for <tool_call> blocks, "llama3_json" for {"name", "parameters"} objects;
    "hermes" when the template shows neither. Found by rendering one probe conversation
    (once per tokenizer), so any template that writes either format is recognised."""
    if tokenizer not in _formats:
        _formats[tokenizer] = _probe(tokenizer)
    return _formats[tokenizer]


def _probe(tokenizer) -> str:
    tool = {"type": "function", "function": {"name": "probe_fn", "description": "probe",
                                             "parameters": {"type": "object", "properties": {
                                                 "probe_arg": {"type": "integer"}}}}}
    call = {"id": "call_0", "type": "function",
            "function": {"name": "probe_fn", "arguments": {"probe_arg": 1}}}
    messages = [{"role": "user", "content": "probe"},
                {"role": "assistant", "content": "", "tool_calls": [call]}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=[tool],
                                             add_generation_prompt=False)
    except ValueError:
        return "hermes"
    if _HERMES_START in text:
        return "hermes"
    if '"parameters"' in text and "probe_fn" in text:
        return "llama3_json"
    return "hermes"
