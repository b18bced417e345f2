"""Tool calls out of generated text: Hermes and Llama-3 JSON parsers, the forced formats, and
streams that send, however the text is split, what the whole response holds."""

from __future__ import annotations

import json
import random

import pytest

from engine.openai import formatting as fmt
from engine.openai.api import parse_chat, Limits
from engine.openai.prompts import EnginePrompt, PreparedRequest
from engine.openai.responses import ChatAssembler
from engine.openai.tools import (ToolCallFormat, ToolCallStream, finish_reason,
                                 message_tool_calls, parse_tool_calls)
from engine.outputs import CompletionOutput, RequestOutput, Usage
from engine.sampling_params import SamplingParams

HERMES = ToolCallFormat("parse", parser="hermes")
LLAMA = ToolCallFormat("parse", parser="llama3_json")
ARRAY = ToolCallFormat("array")
NAMED = ToolCallFormat("named", function_name="get_weather")

# (format, text, expected content, expected [(name, arguments dict)])
CASES = [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
             '"Zürich", "days": 2}}\n</tool_call>\n<tool_call>{"name": "now", "arguments": {}}'
             '</tool_call>', "Let me check.", [("get_weather", {"city": "Zürich", "days": 2}),
                                               ("now", {})]),
    (HERMES, '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}\n</tool_call>', None,
     [("f", {"x": [1, 2]})]),
    (HERMES, "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and "
             "<tool is not a tag.", []),
    (HERMES, '<tool_call>{"name": "f", "arguments": {"x": }</tool_call> sorry',
     '<tool_call>{"name": "f", "arguments": {"x": }</tool_call> sorry', []),
    (HERMES, 'Thinking...<tool_call>{"name": "f", "arguments": {"q": "a</b"}}', "Thinking...",
     [("f", {"q": "a</b"})]),                             # cut before </tool_call>: still a call
    (LLAMA, '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    (LLAMA, '<|python_tag|>{"name": "a", "parameters": {"n": 1}}; {"name": "b", "parameters": '
            '{}}', None, [("a", {"n": 1}), ("b", {})]),
    (LLAMA, "The weather in Paris is sunny {today}.", "The weather in Paris is sunny {today}.",
     []),
    (LLAMA, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA, '{"name": "a", "parameters": {"n": 1', '{"name": "a", "parameters": {"n": 1', []),
    (ARRAY, '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": '
            '{"city": "Oslo"}}]', None, [("now", {}), ("get_weather", {"city": "Oslo"})]),
    (ARRAY, '[{"name": "now", "parameters": {}}, {"name": "get_w', None, [("now", {})]),
    (NAMED, '{"city": "Lima", "days": 3}', None, [("get_weather", {"city": "Lima", "days": 3})]),
]


def _calls(bodies: list[dict]) -> list[tuple[str, dict]]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"]))
            for call in bodies]


@pytest.mark.parametrize("tool_format, text, content, calls", CASES)
def test_whole_response(tool_format, text, content, calls):
    got_content, bodies = message_tool_calls(text, tool_format)
    assert (got_content, _calls(bodies)) == (content, calls)
    assert all(body["type"] == "function" and body["id"].startswith("call_") for body in bodies)
    assert len({body["id"] for body in bodies}) == len(bodies)


def _stream(tool_format, pieces: list[str]) -> tuple[str, list[dict]]:
    """Feeds the pieces; returns the content sent and the tool calls the deltas add up to
    (as an OpenAI client accumulates them: by index, arguments concatenated)."""
    stream, content, calls = ToolCallStream(tool_format), "", {}
    for place, piece in enumerate(pieces):
        for delta in stream.feed(piece, final=place == len(pieces) - 1):
            assert len(delta) == 1
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                entry = calls.setdefault(call["index"], {"id": call.get("id"), "name": "",
                                                         "arguments": ""})
                assert call.get("id", entry["id"]) == entry["id"]
                entry["name"] += call.get("function", {}).get("name", "")
                entry["arguments"] += call.get("function", {}).get("arguments", "")
    assert sorted(calls) == list(range(len(calls)))
    return content, [{"id": entry["id"], "type": "function", "function": {
        "name": entry["name"], "arguments": entry["arguments"]}} for entry in calls.values()]


def _splits(text: str, rng: random.Random):
    yield [text]
    yield list(text)                                               # a character at a time
    for cut in range(len(text) + 1):                               # every two-piece split
        yield [text[:cut], text[cut:]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("tool_format, text, content, calls", CASES)
def test_streams_add_up_to_the_response(tool_format, text, content, calls):
    rng = random.Random(text)
    whole_content, whole_bodies = message_tool_calls(text, tool_format)
    for pieces in _splits(text, rng):
        streamed_content, bodies = _stream(tool_format, pieces)
        assert streamed_content == (whole_content or ""), pieces
        assert _calls(bodies) == _calls(whole_bodies), pieces
        if "<tool_call>" in text:
            assert "<tool" not in streamed_content or "</tool_call> sorry" in text


def test_named_stream_sends_the_header_first():
    stream = ToolCallStream(NAMED)
    first = stream.feed('{"ci', final=False)
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}
    assert stream.feed('ty": "Rome"}', final=True) == [
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Rome"}'}}]}]


def test_partial_parses_only_grow():
    text = CASES[0][1]
    for cut in range(len(text)):
        early_content, early_calls = parse_tool_calls(text[:cut], HERMES, final=False)
        content, calls = parse_tool_calls(text, HERMES, final=True)
        assert content.startswith(early_content) and calls[:len(early_calls)] == early_calls


@pytest.mark.parametrize("reason, called, expected", [
    ("stop", True, "tool_calls"), ("length", True, "length"), ("stop", False, "stop"),
    (None, True, None)])
def test_finish_reason(reason, called, expected):
    assert finish_reason(reason, called) == expected


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _outputs(text: str, done: bool) -> RequestOutput:
    sample = CompletionOutput(0, text, list(range(len(text))), 0.0, None,
                              "stop" if done else None)
    return RequestOutput("r", None, [1], [sample], finished=done)


def test_chat_assembler_streams_and_answers_tool_calls():
    request = parse_chat({"messages": [{"role": "user", "content": "weather?"}],
                          "tools": TOOLS, "stream": True}, Limits("m"))
    prepared = PreparedRequest([EnginePrompt(None, [1])], SamplingParams(),
                               ToolCallFormat("parse", parser="hermes"))
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n' \
           '</tool_call>'
    streaming = ChatAssembler(request, prepared, "id", 0, "m")
    chunks = []
    for cut in range(0, len(text), 7):
        chunks += streaming.chunks({0: _outputs(text[:cut], False)})
    chunks += streaming.chunks({0: _outputs(text, True)})
    deltas = [chunk["choices"][0] for chunk in chunks]
    assert "".join(d["delta"].get("content", "") for d in deltas) == "Sure."
    calls = [call for d in deltas for call in d["delta"].get("tool_calls", [])]
    assert [c["function"] for c in calls] == [{"name": "get_weather",
                                               "arguments": '{"city": "Oslo"}'}]
    assert [d["finish_reason"] for d in deltas][-1] == "tool_calls"
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    body = ChatAssembler(request, prepared, "id", 0, "m").response(
        [_outputs(text, True)], Usage(1, len(text)))
    message = body["choices"][0]["message"]
    assert message["content"] == "Sure." and body["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"][0]["function"] == calls[0]["function"]


def test_chat_choice_without_tools_is_unchanged():
    assert fmt.chat_choice(0, "hi", "stop")["message"] == {
        "role": "assistant", "content": "hi", "refusal": None, "tool_calls": []}


@pytest.mark.parametrize("reason, called, stop_reason, expected", [
    ("stop", True, None, "tool_calls"),      # ended on its own (EOS, a finished grammar)
    ("stop", True, '"days"', "stop"),        # a stop string cut the call: it may be partial
    ("stop", True, 7, "stop"),               # so did a stop token
    ("stop", False, None, "stop"),
    ("length", True, None, "length"),
])
def test_finish_reason_says_tool_calls_only_for_calls_that_ended_whole(reason, called,
                                                                       stop_reason, expected):
    assert finish_reason(reason, called, stop_reason) == expected
