"""ember batch with structured output and forced tool calls: each line's output matches its
constraint, and each is billed once with the usage its body reports."""

import json
import re

import jsonschema

from tests.engine.batch.test_batch import (MODEL, _ledger_rows, llm,  # noqa: F401
                                           model_dir, read_output, run_billed)

SCHEMA = {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]},
                                           "count": {"type": "integer", "minimum": 1,
                                                     "maximum": 9}},
          "required": ["size", "count"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "order", "parameters": SCHEMA}}]
REGEX = "[a-f]{3,6}-[0-9]{2}"


def _line(index: int) -> dict:
    kind = index % 3
    body = {"model": MODEL, "max_tokens": 180, "temperature": 1.0, "seed": index}
    if kind == 0:
        url, body = "/v1/completions", {**body, "prompt": f"code {index}", "guided_regex": REGEX}
    else:
        url = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"order {index}"}]
        if kind == 1:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "order", "schema": SCHEMA}}
        else:
            body.update(tools=TOOLS, tool_choice={"type": "function",
                                                  "function": {"name": "order"}})
    return {"custom_id": f"req-{index}", "method": "POST", "url": url, "body": body}


def test_constrained_lines_match_and_are_billed_once(llm, tmp_path):
    lines = [_line(i) for i in range(12)]
    summary = run_billed(llm, tmp_path, lines)
    assert (summary.succeeded, summary.failed, summary.billed) == (12, 0, 12)
    rows = {row["id"]: row for row in _ledger_rows(tmp_path / "ledger.db")}
    for custom_id, line in read_output(tmp_path / "out.jsonl").items():
        body, index = line["response"]["body"], int(custom_id.split("-")[1])
        choice = body["choices"][0]
        if index % 3 == 0:
            assert re.fullmatch(REGEX, choice["text"]) and choice["finish_reason"] == "stop"
        elif index % 3 == 1:
            jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
        else:
            call = choice["message"]["tool_calls"][0]["function"]
            assert call["name"] == "order" and choice["finish_reason"] == "tool_calls"
            jsonschema.validate(json.loads(call["arguments"]), SCHEMA)
            assert choice["message"]["content"] is None
        row = rows[line["response"]["request_id"]]
        assert row["completion_tokens"] == body["usage"]["completion_tokens"]
        assert row["prompt_tokens"] == body["usage"]["prompt_tokens"]
