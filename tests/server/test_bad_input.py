"""Malformed requests: each gets the right 4xx in OpenAI's error shape (never a 500), and the
request after it is served. The engine thread never sees any of them."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.server.conftest import MAX_MODEL_LEN, VOCAB_SIZE, auth

OK = {"model": "tiny-llama", "prompt": "fine", "max_tokens": 2}
CHAT_OK = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
           "max_tokens": 2}


def completion(**fields):
    return {**OK, **fields}


def chat(**fields):
    return {**CHAT_OK, **fields}


def without(body: dict, name: str) -> dict:
    return {key: value for key, value in body.items() if key != name}


C, CHAT = "/v1/completions", "/v1/chat/completions"
# (case id, method, path, body: dict or raw bytes, status, error code or None, param or None)
CASES = [
    ("truncated-json", "POST", C, b'{"prompt": ', 400, "invalid_json", None),
    ("json-array", "POST", C, b"[1, 2]", 400, "invalid_json", None),
    ("json-string", "POST", C, b'"prompt"', 400, "invalid_json", None),
    ("empty-body", "POST", C, b"", 400, "invalid_json", None),
    ("nan-constant", "POST", C, b'{"prompt": "a", "temperature": NaN}', 400, "invalid_json", None),
    ("deep-nesting", "POST", C, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    ("invalid-utf8", "POST", C, b'{"prompt": "\xff\xfe\xfa"}', 400, "invalid_encoding", None),
    ("10mb-body", "POST", C, b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 400,
     "request_too_large", None),
    ("prompt-missing", "POST", C, without(OK, "prompt"), 400, "invalid_type", "prompt"),
    ("prompt-number", "POST", C, completion(prompt=5), 400, "invalid_type", "prompt"),
    ("prompt-empty-list", "POST", C, completion(prompt=[]), 400, "invalid_value", "prompt"),
    ("prompt-empty-ids", "POST", C, completion(prompt=[[]]), 400, "invalid_type", "prompt"),
    ("prompt-mixed", "POST", C, completion(prompt=["a", 1]), 400, "invalid_type", "prompt"),
    ("prompt-bools", "POST", C, completion(prompt=[True, False]), 400, "invalid_type", "prompt"),
    ("prompt-empty-string", "POST", C, completion(prompt=""), 400, "invalid_value", "prompt"),
    ("ids-out-of-vocab", "POST", C, completion(prompt=[5, VOCAB_SIZE]), 400, "invalid_value",
     "prompt[1]"),
    ("ids-negative", "POST", C, completion(prompt=[[5], [-1]]), 400, "invalid_value",
     "prompt[1][0]"),
    ("prompt-too-long", "POST", C, completion(prompt=[5] * (MAX_MODEL_LEN + 1)), 400,
     "context_length_exceeded", "prompt"),
    ("prompt-plus-max-tokens", "POST", C, completion(prompt=[5] * 200, max_tokens=100), 400,
     "context_length_exceeded", "max_tokens"),
    ("max-tokens-negative", "POST", C, completion(max_tokens=-1), 400, "invalid_value",
     "max_tokens"),
    ("max-tokens-string", "POST", C, completion(max_tokens="10"), 400, "invalid_type",
     "max_tokens"),
    ("max-tokens-float", "POST", C, completion(max_tokens=10.5), 400, "invalid_type",
     "max_tokens"),
    ("max-tokens-huge", "POST", C, completion(max_tokens=10 ** 30), 400,
     "context_length_exceeded", "max_tokens"),
    ("max-tokens-bool", "POST", C, completion(max_tokens=True), 400, "invalid_type",
     "max_tokens"),
    ("temperature-negative", "POST", C, completion(temperature=-0.5), 400, "invalid_value",
     "temperature"),
    ("temperature-huge", "POST", C, completion(temperature=1e300), 400, "invalid_value",
     "temperature"),
    ("temperature-string", "POST", C, completion(temperature="hot"), 400, "invalid_type",
     "temperature"),
    ("temperature-bool", "POST", C, completion(temperature=True), 400, "invalid_type",
     "temperature"),
    ("top-p-zero", "POST", C, completion(top_p=0), 400, "invalid_value", "top_p"),
    ("top-p-above-one", "POST", C, completion(top_p=1.5), 400, "invalid_value", "top_p"),
    ("top-k-negative", "POST", C, completion(top_k=-5), 400, "invalid_value", "top_k"),
    ("min-p-two", "POST", C, completion(min_p=2), 400, "invalid_value", "min_p"),
    ("n-zero", "POST", C, completion(n=0), 400, "invalid_value", "n"),
    ("n-thousand", "POST", C, completion(n=1000), 400, "invalid_value", "n"),
    ("n-float", "POST", C, completion(n=2.0), 400, "invalid_type", "n"),
    ("stop-number", "POST", C, completion(stop=5), 400, "invalid_value", "stop"),
    ("stop-empty", "POST", C, completion(stop=[""]), 400, "invalid_value", "stop"),
    ("stop-hundred", "POST", C, completion(stop=["x"] * 100), 400, "invalid_value", "stop"),
    ("seed-string", "POST", C, completion(seed="x"), 400, "invalid_type", "seed"),
    ("seed-huge", "POST", C, completion(seed=2 ** 70), 400, "invalid_value", "seed"),
    ("presence-penalty", "POST", C, completion(presence_penalty=3), 400, "invalid_value",
     "presence_penalty"),
    ("frequency-penalty", "POST", C, completion(frequency_penalty=-3), 400, "invalid_value",
     "frequency_penalty"),
    ("repetition-penalty-zero", "POST", C, completion(repetition_penalty=0), 400,
     "invalid_value", "repetition_penalty"),
    ("logprobs-fifty", "POST", C, completion(logprobs=50), 400, "invalid_value", "logprobs"),
    ("logprobs-bool", "POST", C, completion(logprobs=True), 400, "invalid_type", "logprobs"),
    ("echo-string", "POST", C, completion(echo="yes"), 400, "invalid_type", "echo"),
    ("stream-int", "POST", C, completion(stream=1), 400, "invalid_type", "stream"),
    ("stream-options-alone", "POST", C, completion(stream_options={"include_usage": True}), 400,
     "invalid_value", "stream_options"),
    ("unknown-model", "POST", C, completion(model="gpt-4"), 404, "model_not_found", "model"),
    ("model-number", "POST", C, completion(model=7), 400, "invalid_type", "model"),
    ("logit-bias", "POST", C, completion(logit_bias={"1": 5}), 400, "unsupported_parameter",
     "logit_bias"),
    ("best-of", "POST", C, completion(best_of=3), 400, "unsupported_parameter", "best_of"),
    ("stop-token-out-of-vocab", "POST", C, completion(stop_token_ids=[1000]), 400,
     "invalid_value", "stop_token_ids[0]"),
    ("messages-missing", "POST", CHAT, without(CHAT_OK, "messages"), 400, "invalid_type",
     "messages"),
    ("messages-empty", "POST", CHAT, chat(messages=[]), 400, "invalid_value", "messages"),
    ("messages-string", "POST", CHAT, chat(messages="hi"), 400, "invalid_type", "messages"),
    ("messages-unknown-role", "POST", CHAT, chat(messages=[{"role": "bot", "content": "x"}]),
     400, "invalid_value", "messages"),
    ("messages-no-content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400,
     "invalid_value", "messages"),
    ("messages-content-number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]),
     400, "invalid_value", "messages"),
    ("messages-not-dicts", "POST", CHAT, chat(messages=["hi"]), 400, "invalid_value",
     "messages"),
    ("messages-image-part", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "invalid_value", "messages"),
    ("top-logprobs-alone", "POST", CHAT, chat(top_logprobs=2), 400, "invalid_value",
     "top_logprobs"),
    ("max-completion-tokens-zero", "POST", CHAT, chat(max_completion_tokens=0), 400,
     "invalid_value", "max_completion_tokens"),
    ("chat-context", "POST", CHAT, chat(max_tokens=MAX_MODEL_LEN), 400,
     "context_length_exceeded", "max_tokens"),
    ("chat-context-max-completion-tokens", "POST", CHAT,
     chat(max_completion_tokens=MAX_MODEL_LEN), 400, "context_length_exceeded",
     "max_completion_tokens"),
    ("tool-name", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f g"}}]),
     400, "invalid_value", "tools[0].function.name"),
    ("json-schema-missing", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400,
     "invalid_type", "response_format.json_schema"),
    ("json-schema-unsupported", "POST", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}), 400,
     "invalid_value", "response_format.json_schema.schema"),
    ("guided-regex", "POST", C, completion(guided_regex="[a-"), 400, "invalid_value",
     "guided_regex"),
    ("unknown-route", "GET", "/v1/nope", None, 404, "not_found", None),
    ("completions-get", "GET", C, None, 405, "method_not_allowed", None),
    ("chat-put", "PUT", CHAT, CHAT_OK, 405, "method_not_allowed", None),
    ("health-post", "POST", "/health", OK, 405, "method_not_allowed", None),
    ("tokenize-number", "POST", "/tokenize", {"prompt": 5}, 400, "invalid_type", "prompt"),
    ("detokenize-out-of-vocab", "POST", "/detokenize", {"tokens": [999]}, 400, "invalid_value",
     "tokens"),
    ("usage-group-by-week", "GET", "/v1/usage?group_by=week", None, 400, "invalid_value",
     "group_by"),
    ("usage-start-yesterday", "GET", "/v1/usage?start=yesterday", None, 400, "invalid_value",
     "start"),
    # Valid ISO 8601, but their UTC falls outside years 1-9999 (a 500 once).
    ("usage-start-past-year-9999", "GET", "/v1/usage?start=9999-12-31T23:59:59-23:59", None,
     400, "invalid_value", "start"),
    ("usage-end-before-year-1", "GET", "/v1/usage?end=0001-01-01T00:00:00%2B23:59", None, 400,
     "invalid_value", "end"),
    ("unknown-model-card", "GET", "/v1/models/gpt-4", None, 404, "model_not_found", None),
]
# Values that pass a naive check (an int, a number > 0) but overflow what the runner packs
# (int32, float32) or reach it as 0: before validation they failed every request in the step.
POISONED = [
    ("top-k-int32-overflow", C, completion(top_k=2 ** 31), "top_k"),
    ("seed-below-int64", C, completion(seed=-2 ** 63 - 1), "seed"),
    ("min-tokens-int32-overflow", C, completion(min_tokens=2 ** 31), "min_tokens"),
    ("min-tokens-above-max-tokens", C, completion(min_tokens=5, max_tokens=2), "min_tokens"),
    ("repetition-penalty-zero-in-float32", C, completion(repetition_penalty=1e-300),
     "repetition_penalty"),
    ("repetition-penalty-tiny", C, completion(repetition_penalty=1e-40), "repetition_penalty"),
    ("top-p-zero-in-float32", C, completion(top_p=1e-50), "top_p"),
    ("stop-token-int32-overflow", C, completion(stop_token_ids=[2 ** 31]), "stop_token_ids"),
    ("chat-top-k-int32-overflow", CHAT, chat(top_k=2 ** 31), "top_k"),
]
# A lone surrogate (valid JSON, decoded by Python's json) wherever a string enters.
SURROGATES = [
    ("surrogate-prompt", C, completion(prompt="a\ud800"), "prompt"),
    ("surrogate-prompt-list", C, completion(prompt=["ok", "\udfff"]), "prompt[1]"),
    ("surrogate-chat-content", CHAT, chat(messages=[{"role": "user", "content": "\ud83d"}]),
     "messages[0].content"),
    ("surrogate-chat-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "\ud800"}]}]), "messages[0].content[0].text"),
    ("surrogate-stop", C, completion(stop=["ok", "\ud800"]), "stop[1]"),
    ("surrogate-user", C, completion(user="\udc00"), "user"),
    ("surrogate-model", C, completion(model="\ud800"), "model"),
    ("surrogate-key", C, b'{"prompt": "x", "\\ud800": 1}', "'\\ud800'"),
    ("surrogate-tokenize", "/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("surrogate-tokenize-chat", "/tokenize",
     {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ("surrogate-detokenize", "/detokenize", {"tokens": [5], "model": "\ud800"}, "model"),
]
CASES += [(name, "POST", path, body, 400, "invalid_value", param)
          for name, path, body, param in POISONED]
CASES += [(name, "POST", path, body, 400, "invalid_encoding", param)
          for name, path, body, param in SURROGATES]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_request_gets_its_4xx_then_the_next_is_served(server, api_key, case):
    _, method, path, body, status, code, param = case
    options = {"data": body} if isinstance(body, bytes) else {"json": body}
    headers = {**auth(api_key), "Content-Type": "application/json"}   # as a client sends
    response = requests.request(method, server.base_url + path, headers=headers,
                                timeout=60, **options)
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"] and len(error["message"]) < 600
    served = requests.post(server.base_url + C, json={**OK, "ignore_eos": True},
                           headers=auth(api_key), timeout=60)   # unseeded: EOS may come
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 2


def test_poisoned_requests_beside_another_keys_stream_leave_it_whole(server):
    """Another tenant's poisoned requests while a stream runs: each is a 400, and the stream
    ends with the tokens it has alone, billed as completed."""
    (_, victim), (_, attacker) = server.create_key(), server.create_key()
    body = {"model": "tiny-llama", "prompt": "def f(x):", "max_tokens": 48, "ignore_eos": True,
            "temperature": 0}
    alone = requests.post(server.base_url + C, json=body, headers=auth(victim), timeout=120)
    with requests.post(server.base_url + C, json={**body, "stream": True}, headers=auth(victim),
                       stream=True, timeout=120) as stream:
        lines = stream.iter_lines()
        events = [next(line for line in lines if line)]   # the stream is running
        poisons = [(path, body) for _, path, body, _ in POISONED + SURROGATES]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda case: requests.post(
                server.base_url + case[0], json=case[1], headers=auth(attacker),
                timeout=60).status_code, poisons))
        events += [line for line in lines if line]
    assert statuses == [400] * len(poisons)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone.json()["choices"][0]["text"]
    row = finished_row(server, chunks[0]["id"])
    assert (row["status"], row["completion_tokens"]) == ("completed", 48)


def finished_row(server, request_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while (row := server.row(request_id))["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    return row


def test_no_bad_input_reached_the_engine_or_caused_a_500(server):
    assert len(CASES) >= 40
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    assert 'ember_http_responses_total{code="500"}' not in text
    assert 'status="error"' not in text
    assert server.metric("ember_kv_page_usage_ratio") == 0
