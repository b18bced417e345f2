"""tool_choice "required" and a named function: outputs drawn under their grammars parse as
the tool calls they promise, with arguments valid against each tool's parameters."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from engine.openai.constraints import ToolRequest, tool_call_constraint
from engine.openai.tools import ToolCallFormat, message_tool_calls
from tests.engine.structured.sampling import draw, vocab_for

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
    "additionalProperties": False}
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 16},
    "limit": {"type": "integer", "minimum": 1, "maximum": 20}}, "required": ["query"],
    "additionalProperties": False}
TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}})


@pytest.mark.parametrize("choice, name, parallel", [
    ("required", None, True), ("required", None, False), ("function", "search", True)])
def test_drawn_outputs_are_the_promised_calls(trained_tokenizer, choice, name, parallel):
    vocab = vocab_for(trained_tokenizer)
    tools = ToolRequest(TOOLS, choice, name, parallel)
    spec = tool_call_constraint(tools)
    fmt = ToolCallFormat("named", function_name=name) if name else ToolCallFormat("array")
    schemas = {"get_weather": WEATHER, "search": SEARCH}
    rng, finished = random.Random(f"{choice}{parallel}"), 0
    for _ in range(10):
        tokens, done = draw(vocab, vocab.compiler.matcher(spec), rng)
        if not done:
            continue
        finished += 1
        content, calls = message_tool_calls(trained_tokenizer.decode(tokens), fmt)
        assert content is None and calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call["function"]["name"] == (name or call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                schemas[call["function"]["name"]])
    assert finished >= 5
