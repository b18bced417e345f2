"""Fuzzing the running server from its own OpenAPI document (GET /openapi.json): over 1,000
bodies, valid by the document, mutated, or broken bytes, get no 5xx; afterwards the engine
still serves and holds no KV page."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import auth
from tests.server.hostile import wait_idle

EXAMPLES = 1100
# Valid bodies stay cheap to generate (mutations still reach every bound).
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "min_tokens": 4, "logprobs": 2,
        "top_logprobs": 2}
SENT: list[int] = []   # status codes, one per request sent


def from_schema(schema: dict, name: str = "") -> st.SearchStrategy:
    """A strategy for the JSON values a (subset of) JSON Schema 2020-12 accepts."""
    if "anyOf" in schema:
        return st.one_of([from_schema(option, name) for option in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum") or [schema["const"]])
    kind = schema.get("type")
    if kind == "object":
        properties = {key: from_schema(value, key)
                      for key, value in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {key: value for key, value in properties.items() if key in required},
            optional={key: value for key, value in properties.items() if key not in required})
    if kind == "array":
        most = min(schema.get("maxItems", 3), 3)
        return st.lists(from_schema(schema["items"]), min_size=schema.get("minItems", 0),
                        max_size=max(most, schema.get("minItems", 0)))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = min(schema.get("maximum", 2 ** 31), CAPS.get(name, 2 ** 63))
        if kind == "integer":
            return st.integers(low, high)
        return st.floats(low, high, exclude_min="exclusiveMinimum" in schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 12), 12))
    raise ValueError(f"schema {schema!r}: not supported by this fuzzer")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(st.characters(codec=None, exclude_categories=()))    # lone surrogates too
    | st.sampled_from(["\ud800", "a\udfffb", "\x00", "a" * 5000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def mutated(body: st.SearchStrategy) -> st.SearchStrategy:
    """A valid body with one field replaced, removed or added, or the body replaced."""
    def mutate(draw_body: dict, data) -> object:
        how = data.draw(st.sampled_from(["replace", "remove", "add", "whole"]))
        names = sorted(draw_body)
        if how == "whole":
            return data.draw(JSON_VALUES)
        if how == "remove" and names:
            removed = data.draw(st.sampled_from(names))
            return {k: v for k, v in draw_body.items() if k != removed}
        name = data.draw(st.sampled_from(names)) if how == "replace" and names else \
            data.draw(st.text(max_size=12))
        return {**draw_body, name: data.draw(JSON_VALUES)}

    return st.tuples(body, st.data()).map(lambda pair: mutate(*pair))


def broken_bytes(body: st.SearchStrategy) -> st.SearchStrategy:
    """A valid body's JSON text cut short, or with one byte replaced."""
    def damage(text: bytes, cut: int, byte: int) -> bytes:
        cut = cut % (len(text) + 1)
        return text[:cut] if byte < 0 else text[:cut] + bytes([byte]) + text[cut + 1:]

    return st.builds(damage, body.map(lambda b: json.dumps(b).encode()),
                     st.integers(0, 10 ** 6), st.integers(-1, 255))


@pytest.fixture(scope="module")
def document(server) -> dict:
    response = requests.get(server.base_url + "/openapi.json", timeout=30)
    assert response.status_code == 200 and response.json()["openapi"].startswith("3.")
    return response.json()


@pytest.fixture(scope="module")
def fuzz_key(server) -> str:
    return server.create_key()[1]


def requests_for(document: dict) -> st.SearchStrategy:
    """(path, JSON value or raw bytes) for every POST route of the document."""
    cases = []
    for path, item in document["paths"].items():
        if "post" not in item:
            continue
        body = from_schema(item["post"]["requestBody"]["content"]["application/json"]["schema"])
        cases.append(st.tuples(st.just(path), st.one_of(body, mutated(body),
                                                        broken_bytes(body))))
    return st.one_of(cases)


def test_fuzzed_bodies_get_no_5xx(server, document, fuzz_key):
    session = requests.Session()
    session.headers.update(auth(fuzz_key))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests_for(document))
    def send(case):
        path, body = case
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = session.post(server.base_url + path, data=data, timeout=60,
                                headers={"Content-Type": "application/json"})
        SENT.append(response.status_code)
        assert response.status_code < 500, (path, data[:300], response.text[:300])

    send()
    assert len(SENT) >= 1000
    assert {200, 400} <= set(SENT), sorted(set(SENT))   # both valid and refused bodies ran


def test_after_the_fuzz_the_engine_serves_and_holds_no_page(server, fuzz_key):
    wait_idle(server)
    response = requests.post(server.base_url + "/v1/completions", headers=auth(fuzz_key),
                             json={"model": "tiny-llama", "prompt": "still here",
                                   "max_tokens": 5, "ignore_eos": True}, timeout=60)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 5
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    assert 'ember_http_responses_total{code="500"}' not in text
