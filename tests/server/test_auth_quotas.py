"""API keys and quotas against a real server: 401 / 403, usage isolation between keys, and
429 with Retry-After for rpm, tpm and daily limits, with nothing billed for a rejection."""

import os
import subprocess
import sys

import pytest
import requests

from tests.server.conftest import ROOT, auth

BODY = {"model": "tiny-llama", "prompt": "0123456789", "max_tokens": 20, "ignore_eos": True}


def cli(server, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "engine.cli", *args, "--db", server.db_url],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def complete(server, key: str | None, body: dict = BODY) -> requests.Response:
    headers = auth(key) if key is not None else {}
    return requests.post(server.base_url + "/v1/completions", json=body, headers=headers,
                         timeout=60)


def key_rows(server, name: str) -> list[dict]:
    return server.rows("key_id = (SELECT id FROM keys WHERE name = ?)", (name,))


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "type" in error
    return error


def test_missing_or_unknown_key_is_401(server):
    assert_error(complete(server, None), 401, "invalid_api_key")
    assert_error(complete(server, "ember-not-a-real-key"), 401, "invalid_api_key")
    response = requests.post(server.base_url + "/v1/completions", json=BODY,
                             headers={"Authorization": "Basic abc"}, timeout=30)
    assert_error(response, 401, "invalid_api_key")
    assert_error(requests.get(server.base_url + "/v1/models", timeout=30), 401, "invalid_api_key")


def test_key_created_and_revoked_with_the_cli(server):
    key = cli(server, "keys", "create", "--name", "cli-key")
    assert complete(server, key).status_code == 200
    cli(server, "keys", "revoke", "cli-key")
    error = assert_error(complete(server, key), 403, "key_revoked")
    assert key not in error["message"]
    assert len(key_rows(server, "cli-key")) == 1


def test_a_key_reads_only_its_own_usage(server):
    name_a, key_a = server.create_key()
    name_b, key_b = server.create_key()
    admin_name, admin_key = server.create_key(admin=True)
    assert complete(server, key_a).status_code == 200
    assert complete(server, key_b).status_code == 200
    assert complete(server, key_b).status_code == 200
    usage_url = server.base_url + "/v1/usage"
    own = requests.get(usage_url, headers=auth(key_a), timeout=30).json()["data"]
    assert own[0]["requests"] == 1
    other = requests.get(usage_url, params={"key": name_b}, headers=auth(key_a), timeout=30)
    assert_error(other, 403, "forbidden")
    by_admin = requests.get(usage_url, params={"key": name_b}, headers=auth(admin_key),
                            timeout=30).json()["data"]
    assert by_admin[0]["requests"] == 2
    rows = key_rows(server, name_b)
    assert by_admin[0]["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert_error(requests.get(server.base_url + "/admin/stats", headers=auth(key_a)), 403,
                 "admin_only")
    assert requests.get(server.base_url + "/admin/stats", headers=auth(admin_key)).ok


@pytest.mark.parametrize("limits, allowed", [
    (dict(rpm=2), 2),
    (dict(tpm=60), 2),              # each request reserves 10 prompt + 20 output tokens
    (dict(tokens_per_day=70), 2),
])
def test_quota_exceeded_is_429_with_retry_after_and_costs_nothing(server, limits, allowed):
    name, key = server.create_key(**limits)
    for _ in range(allowed):
        response = complete(server, key)
        assert response.status_code == 200, response.text
        assert any(h.startswith("x-ratelimit-limit-") for h in map(str.lower, response.headers))
    rejected = complete(server, key)
    error = assert_error(rejected, 429, "rate_limit_exceeded")
    assert int(rejected.headers["Retry-After"]) >= 1
    assert name in error["message"]
    rows = key_rows(server, name)
    assert len(rows) == allowed and all(r["status"] == "completed" for r in rows)
    # Streaming requests are refused the same way, before any event.
    streamed = complete(server, key, {**BODY, "stream": True})
    assert streamed.status_code == 429 and len(key_rows(server, name)) == allowed
