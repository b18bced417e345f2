"""Structured output through the server: a tiny random model writes garbage unless its
constraint holds, so every answer that parses and validates shows the step enforced it."""

import json
import re

import jsonschema
import requests

from tests.server.conftest import auth, openai_client

MODEL = "tiny-llama"
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
          "required": ["colour", "count"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "paint", "description": "Paints things",
                                           "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "wait", "parameters": {
             "type": "object", "properties": {"seconds": {"type": "integer"}}}}}]


def test_json_schema_response_format_content_validates(server, api_key):
    client = openai_client(server, api_key)
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a colour"}], max_tokens=120,
        temperature=1.0, seed=7, n=2,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}})
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    row = server.row(response.id)
    assert row["completion_tokens"] == response.usage.completion_tokens


def test_guided_regex_completion_matches(server, api_key):
    body = {"model": MODEL, "prompt": "Code:", "max_tokens": 60, "temperature": 1.0,
            "seed": 3, "guided_regex": "[a-f]{2,5}-[0-9]{2}"}
    response = requests.post(server.base_url + "/v1/completions", json=body,
                             headers=auth(api_key), timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert re.fullmatch("[a-f]{2,5}-[0-9]{2}", choice["text"]), choice["text"]


def test_named_tool_choice_returns_valid_tool_calls(server, api_key):
    client = openai_client(server, api_key)
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paint the shed"}], max_tokens=120,
        temperature=1.0, seed=5, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "paint"}})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "paint" and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)


def test_tokenize_renders_tools_like_a_chat_request(server, api_key):
    messages = [{"role": "user", "content": "Paint the shed"}]
    counts = []
    for extra in ({}, {"tools": TOOLS}):
        response = requests.post(server.base_url + "/tokenize", headers=auth(api_key),
                                 json={"model": MODEL, "messages": messages, **extra},
                                 timeout=30)
        assert response.status_code == 200, response.text
        counts.append(response.json()["count"])
    assert counts[1] >= counts[0]
    bad = requests.post(server.base_url + "/tokenize", headers=auth(api_key), timeout=30,
                        json={"model": MODEL, "messages": messages, "tools": [{"type": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools[0]"
