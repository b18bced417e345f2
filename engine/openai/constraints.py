"""Structured output and tools in OpenAI bodies -> StructuredOutput and ToolRequest (no JAX).

A body may constrain its output in one of these ways (two at once is a 400):

- `response_format`: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
  "json_schema": {"name", "schema", "strict", "description"}} (OpenAI);
- vLLM's extension fields: `guided_json` (a schema, or its JSON text), `guided_regex`,
  `guided_grammar` (Lark or GBNF), `guided_choice` (a list of strings), or the same in one
  `structured_outputs` object (`json`, `regex`, `grammar`, `choice`, `json_object: true`);
- tools (chat only): `tool_choice` "required" constrains the output to a JSON list of calls
  `[{"name": ..., "parameters": {...}}, ...]` of the given tools, a named function to that
  function's parameters; "auto" leaves the output free and parses the model's own format
  (engine/openai/tools.py); "none" neither constrains nor parses.

Each mistake is a 400 naming the field by its JSON path (`response_format.json_schema.schema`,
`tools[1].function.parameters`) with llguidance's message, so an unsupported JSON-schema
keyword is named (`Unimplemented keys: ["uniqueItems"]`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.openai.fields import ApiError, get_bool, invalid
from engine.structured import StructuredOutput, StructuredOutputError

TOOL_CHOICES = ("none", "auto", "required")
MAX_TOOLS = 128
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# (body field, structured_outputs key, kind); vLLM's names.
_GUIDED = (("guided_json", "json", "json_schema"), ("guided_regex", "regex", "regex"),
           ("guided_grammar", "grammar", "grammar"), ("guided_choice", "choice", "choice"))
_STRUCTURED_KEYS = frozenset({key for _, key, _ in _GUIDED} | {"json_object"})
# vLLM options that change what the constraint allows, which llguidance's grammar here does
# not take: refused rather than ignored.
_UNSUPPORTED_GUIDED = ("guided_whitespace_pattern", "disable_any_whitespace",
                       "structural_tag")


@dataclass(slots=True, frozen=True)
class ToolRequest:
    """A chat request's tools and what it asks of them.

    Attributes:
      tools: the tool definitions as given, passed to the chat template.
      choice: "none", "auto", "required" or "function" (a named function).
      function_name: the named function (choice "function").
      parallel: more than one call allowed (parallel_tool_calls).
      parser: the server's --tool-call-parser ("hermes", "llama3_json"); None: detected from
        the chat template.
    """

    tools: tuple[dict, ...]
    choice: str
    function_name: str | None = None
    parallel: bool = True
    parser: str | None = None

    def functions(self) -> dict[str, dict]:
        """Each function's parameters schema by name ({} when it gives none)."""
        return {tool["function"]["name"]: tool["function"].get("parameters") or
                {"type": "object", "properties": {}} for tool in self.tools}


def parse_structured_output(body: dict) -> StructuredOutput | None:
    """The body's output constraint (response_format, guided_*, structured_outputs)."""
    found: list[tuple[str, StructuredOutput]] = []
    response_format = _response_format(body)
    if response_format is not None:
        found.append(("response_format", response_format))
    for name, _, kind in _GUIDED:
        if body.get(name) is not None:
            found.append((name, _build(name, kind, body[name])))
    for name in _UNSUPPORTED_GUIDED:   # they would shape the output in a way not enforced
        if body.get(name) is not None:
            raise invalid(name, body[name], "it to be left out: not supported by this server",
                          "unsupported_parameter")
    options = body.get("structured_outputs")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("structured_outputs", options, "an object", "invalid_type")
        for key in options:
            if key not in _STRUCTURED_KEYS:
                raise invalid(f"structured_outputs.{key}", options[key], "one of the keys "
                              f"{sorted(_STRUCTURED_KEYS)}", "unsupported_parameter")
        for _, key, kind in _GUIDED:
            if options.get(key) is not None:
                found.append((f"structured_outputs.{key}",
                              _build(f"structured_outputs.{key}", kind, options[key])))
        if get_bool(options, "json_object"):
            found.append(("structured_outputs.json_object", StructuredOutput.json_object()))
    if len(found) > 1:
        raise invalid(found[1][0], body.get(found[1][0].split(".")[0]),
                      f"one output constraint per request: {found[0][0]} is given too",
                      "invalid_value")
    return found[0][1] if found else None


def _response_format(body: dict) -> StructuredOutput | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_object()
    if kind != "json_schema":
        raise invalid("response_format", fmt, 'an object whose "type" is "text", '
                      '"json_object" or "json_schema"')
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format.json_schema", spec,
                      'an object with "name" and "schema"', "invalid_type")
    name = spec.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise invalid("response_format.json_schema.name", name,
                      "a name of 1 to 64 letters, digits, '_' or '-'")
    get_bool(spec, "strict")   # always enforced; read only to check its type
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise invalid("response_format.json_schema.schema", schema, "a JSON schema object",
                      "invalid_type")
    return _build("response_format.json_schema.schema", "json_schema", schema)


def _build(param: str, kind: str, value: Any) -> StructuredOutput:
    """A StructuredOutput from one field; the library's refusal is a 400 naming `param`."""
    try:
        if kind == "json_schema":
            return StructuredOutput.json_schema(value)
        if kind == "regex":
            return StructuredOutput.regex(value)
        if kind == "grammar":
            return StructuredOutput.grammar_text(value)
        return StructuredOutput.choice(value)
    except StructuredOutputError as error:
        raise ApiError(400, f"{param}: {error.reason}"[:500], param=param,
                       code="invalid_value") from None


def parse_tools(body: dict, parser: str | None) -> ToolRequest | None:
    """The body's tools, tool_choice and parallel_tool_calls; None without tools (or with
    tool_choice "none" and no tools)."""
    for name in ("functions", "function_call"):   # OpenAI's deprecated names
        if body.get(name) is not None:
            raise invalid(name, body[name], "tools and tool_choice instead: the deprecated "
                          f"{name} is not supported", "unsupported_parameter")
    tools = _tools(body.get("tools"))
    choice, function_name = _tool_choice(body.get("tool_choice"), tools)
    parallel = get_bool(body, "parallel_tool_calls", True)
    if not tools:
        return None
    return ToolRequest(tuple(tools), choice, function_name, parallel, parser)


def _tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid("tools", tools, f"a list of at most {MAX_TOOLS} tools", "invalid_type")
    names = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(where, tool, '{"type": "function", "function": {...}}')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function", function, "an object", "invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name) or name in names:
            raise invalid(f"{where}.function.name", name, "a name of 1 to 64 letters, digits, "
                          "'_' or '-', not used by another tool")
        names.add(name)
        if function.get("description") is not None and not isinstance(
                function["description"], str):
            raise invalid(f"{where}.function.description", function["description"],
                          "a string", "invalid_type")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"{where}.function.parameters", parameters, "a JSON schema object",
                          "invalid_type")
        if parameters and parameters.get("type") != "object":
            # Arguments are an object (OpenAI refuses any other schema alike): without
            # "type", a constraint would allow a number or a list as the arguments.
            raise invalid(f"{where}.function.parameters", parameters,
                          'a JSON schema of "type": "object"')
    return tools


def _tool_choice(choice: Any, tools: list[dict]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise invalid("tool_choice", choice, f"one of {TOOL_CHOICES} or a named function")
        if choice != "none" and not tools:   # OpenAI and vLLM refuse "auto" alike
            raise invalid("tool_choice", choice, "tools to choose from")
        return choice, None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and isinstance(
        choice.get("function"), dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name is None:
        raise invalid("tool_choice", choice, '"none", "auto", "required" or {"type": '
                      '"function", "function": {"name": ...}}')
    if name not in {tool["function"]["name"] for tool in tools}:
        raise invalid("tool_choice.function.name", name, "the name of one of the tools")
    return "function", name


def tool_call_constraint(tools: ToolRequest) -> StructuredOutput | None:
    """What tool_choice imposes on the output: a named function's parameters, or a list of
    calls for "required"; None for "auto" and "none"."""
    functions = tools.functions()
    names = list(functions)
    if tools.choice == "function":
        index = names.index(tools.function_name)
        return _build(f"tools[{index}].function.parameters", "json_schema",
                      functions[tools.function_name])
    if tools.choice != "required":
        return None
    for index, name in enumerate(names):   # each on its own first, so a 400 names the tool
        _build(f"tools[{index}].function.parameters", "json_schema", functions[name])
    call = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
             "required": ["name", "parameters"], "additionalProperties": False}
            for name, schema in functions.items()]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": call}}
    if not tools.parallel:
        schema["maxItems"] = 1
    return _build("tools", "json_schema", schema)
