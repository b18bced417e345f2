"""Metering: keys, the ledger's exactly-once billing, quotas, usage and the CLI, on real SQLite
and a real PostgreSQL server (conftest.py's empty_db_url)."""

import csv
import io
import os
import random
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.metering import Ledger
from engine.metering.keys import hash_key

REPO = Path(__file__).resolve().parents[3]


class Clock:
    """A clock the test moves by hand; the ledger reads it for every timestamp."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def rng():
    return random.Random(20250301)


@pytest.fixture
def clock():
    return Clock(datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC))


@pytest.fixture
def db_url(empty_db_url):
    return empty_db_url


@pytest.fixture
def ledger(db_url, clock):
    with Ledger(db_url, clock=clock) as opened:
        yield opened


def _counts(rng):
    prompt = rng.randrange(1, 5000)
    return prompt, rng.randrange(0, prompt + 1), rng.randrange(1, 2000)


def _request_count(ledger, key):
    return ledger.usage(key.id)[0].requests


# Keys


def test_key_authenticates_wrong_key_does_not_and_revoked_is_flagged(ledger):
    info, plaintext = ledger.create_key("team-a", rpm=7, tpm=900, tokens_per_day=50_000)
    other, other_plaintext = ledger.create_key("team-b", admin=True)
    assert plaintext.startswith("ember-") and plaintext.startswith(info.prefix)
    assert ledger.authenticate(plaintext) == info
    assert (info.rpm, info.tpm, info.tokens_per_day, info.admin) == (7, 900, 50_000, False)
    assert ledger.authenticate(other_plaintext).admin
    for wrong in (plaintext[:-1], plaintext + "x", plaintext.upper(), "", "ember-", "Bearer"):
        assert ledger.authenticate(wrong) is None
    assert ledger.revoke_key("team-a").revoked
    revoked = ledger.authenticate(plaintext)
    assert revoked is not None and revoked.revoked and revoked.id == info.id
    assert not ledger.authenticate(other_plaintext).revoked
    assert [key.name for key in ledger.list_keys()] == ["team-a", "team-b"]


def test_key_names_and_limits_are_checked(ledger):
    ledger.create_key("team-a")
    for name in ("team-a", "", "has space", "anonymous", "x" * 65):
        with pytest.raises(ValueError, match="name="):
            ledger.create_key(name)
    for limits in ({"rpm": 0}, {"tpm": -5}, {"tokens_per_day": 1.5}, {"rpm": True}):
        with pytest.raises(ValueError, match=next(iter(limits))):
            ledger.create_key("team-b", **limits)
    with pytest.raises(ValueError, match="no such key"):
        ledger.revoke_key("nobody")


def test_database_never_holds_the_plaintext_key(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:   # files the test can scan
        keys = [ledger.create_key(f"team-{i}")[1] for i in range(5)]
        ledger.authenticate(keys[0])
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("ledger.db*"))
    assert hash_key(keys[0]).encode() in stored   # the scan reads what the ledger wrote
    for plaintext in keys:
        secret = plaintext.removeprefix("ember-")
        assert secret.encode() not in stored and secret[-20:].encode() not in stored


def test_anonymous_account_is_created_once_and_cannot_authenticate(ledger):
    anonymous = ledger.anonymous_key()
    assert ledger.anonymous_key() == anonymous
    assert (anonymous.rpm, anonymous.tpm, anonymous.tokens_per_day) == (None, None, None)
    assert anonymous.prefix == "-" and not anonymous.admin
    assert ledger.check_quota(anonymous, 10**9).allowed


# Requests: admission, exactly-once finalisation, interruption, cost


def test_finalize_bills_once_and_a_second_call_changes_nothing(ledger, clock, rng):
    key, _ = ledger.create_key("team-a")
    ledger.set_price("*", 0.6, 0.15, 2.4)
    ledger.admit("req-1", key, "llama", estimated_tokens=300)
    prompt, cached, completion = _counts(rng)
    clock.advance(3)
    assert ledger.finalize("req-1", "completed", prompt, cached, completion)
    before = ledger.usage(key.id)
    clock.advance(5)
    assert not ledger.finalize("req-1", "error", prompt + 7, 0, completion + 9)
    assert not ledger.update_progress("req-1", 1, 0, 1)
    assert ledger.usage(key.id) == before
    assert before[0].prompt_tokens == prompt and before[0].completion_tokens == completion
    with pytest.raises(KeyError):
        ledger.finalize("never-admitted", "completed", 1, 0, 1)
    with pytest.raises(ValueError, match="already in the ledger"):
        ledger.admit("req-1", key, "llama")


def test_finalize_from_eight_threads_bills_once(ledger, rng):
    key, _ = ledger.create_key("team-a")
    ledger.set_price("*", 1.0, 0.5, 3.0)
    ledger.admit("req-1", key, "llama")
    counts = [_counts(rng) for _ in range(8)]
    barrier, results = threading.Barrier(8), [None] * 8

    def finalize(i):
        barrier.wait()
        results[i] = ledger.finalize("req-1", "completed", *counts[i])

    threads = [threading.Thread(target=finalize, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    prompt, cached, completion = counts[results.index(True)]
    row = ledger.usage(key.id)[0]
    assert (row.requests, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
        1, prompt, cached, completion)
    assert row.cost == pytest.approx(((prompt - cached) * 1.0 + cached * 0.5
                                      + completion * 3.0) / 1e6)


def test_cost_prices_cached_tokens_apart_and_falls_back_to_default(ledger, rng):
    key, _ = ledger.create_key("team-a")
    prices = {"*": (0.5, 0.25, 1.5), "qwen": (3.0, 0.3, 15.0)}
    for model, price in prices.items():
        ledger.set_price(model, *price)
    ledger.set_price("qwen", 2.0, 0.2, 8.0)   # a second set replaces the first
    prices["qwen"] = (2.0, 0.2, 8.0)
    expected = {}
    for i, model in enumerate(["qwen", "llama", "qwen", "mistral"]):
        prompt, cached, completion = _counts(rng)
        ledger.admit(f"req-{i}", key, model)
        ledger.finalize(f"req-{i}", "completed", prompt, cached, completion)
        input_price, cached_price, output_price = prices.get(model, prices["*"])
        expected[model] = expected.get(model, 0.0) + (
            (prompt - cached) * input_price + cached * cached_price
            + completion * output_price) / 1e6
    by_model = {row.group: row.cost for row in ledger.usage(key.id, group_by="model")}
    assert by_model == pytest.approx(expected)
    assert ledger.price("qwen").cached_input < ledger.price("qwen").input


def test_bad_final_status_and_counts_are_refused(ledger):
    key, _ = ledger.create_key("team-a")
    ledger.admit("req-1", key, "llama")
    with pytest.raises(ValueError, match="status="):
        ledger.finalize("req-1", "running", 1, 0, 1)
    with pytest.raises(ValueError, match="cached_tokens="):
        ledger.finalize("req-1", "completed", 5, 6, 1)
    with pytest.raises(ValueError, match="completion_tokens="):
        ledger.finalize("req-1", "completed", 5, 0, -1)
    assert ledger.finalize("req-1", "aborted", 5, 2, 1)


# Quotas


def test_requests_per_minute_limit_slides_and_rejections_insert_nothing(ledger, clock):
    key, _ = ledger.create_key("team-a", rpm=3)
    for i in range(3):
        decision = ledger.try_admit(f"req-{i}", key, "llama", 10)
        assert decision.allowed
        assert decision.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        clock.advance(10)
    rejected = ledger.try_admit("req-3", key, "llama", 10)
    assert not rejected.allowed and "requests/min" in rejected.reason
    assert rejected.retry_after == 30   # the oldest request leaves the window at t=60 s
    assert rejected.headers["x-ratelimit-limit-requests"] == "3"
    assert rejected.headers["x-ratelimit-remaining-requests"] == "0"
    assert _request_count(ledger, key) == 3
    with pytest.raises(KeyError):
        ledger.finalize("req-3", "completed", 1, 0, 1)   # no row was written
    clock.advance(rejected.retry_after)
    assert ledger.try_admit("req-3", key, "llama", 10).allowed


def test_tokens_per_minute_counts_estimates_then_final_counts(ledger, clock):
    key, _ = ledger.create_key("team-a", tpm=1000)
    assert ledger.try_admit("req-0", key, "llama", 600).allowed
    rejected = ledger.check_quota(key, 500)
    assert not rejected.allowed and "tokens/min" in rejected.reason
    assert rejected.retry_after == 60
    assert rejected.headers["x-ratelimit-remaining-tokens"] == "400"
    assert not ledger.try_admit("req-1", key, "llama", 500).allowed
    assert _request_count(ledger, key) == 1
    ledger.finalize("req-0", "completed", 200, 50, 100)   # used 300 of the 600 estimated
    decision = ledger.try_admit("req-1", key, "llama", 500)
    assert decision.allowed and decision.headers["x-ratelimit-remaining-tokens"] == "200"
    too_big = ledger.check_quota(key, 1001)
    assert not too_big.allowed and too_big.retry_after == 0 and "waiting" in too_big.reason


def test_tokens_per_day_resets_at_midnight_utc(ledger, clock):
    key, _ = ledger.create_key("team-a", tokens_per_day=5000)
    assert ledger.try_admit("req-0", key, "llama", 100).allowed
    ledger.finalize("req-0", "completed", 3000, 0, 1500)
    clock.advance(3600)   # the minute window is long gone; the day is not
    rejected = ledger.try_admit("req-1", key, "llama", 600)
    assert not rejected.allowed and "tokens/day" in rejected.reason
    assert rejected.retry_after == 11 * 3600   # 13:00 UTC to midnight
    assert rejected.headers["x-ratelimit-limit-tokens"] == "5000"
    assert _request_count(ledger, key) == 1
    assert ledger.try_admit("req-1", key, "llama", 500).allowed   # exactly fills the day
    clock.advance(rejected.retry_after)
    assert ledger.try_admit("req-2", key, "llama", 600).allowed


def test_concurrent_admissions_never_exceed_the_limit(ledger):
    key, _ = ledger.create_key("team-a", rpm=3)
    barrier, results = threading.Barrier(8), [None] * 8

    def admit(i):
        barrier.wait()
        results[i] = ledger.try_admit(f"req-{i}", key, "llama", 1).allowed

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 3 and _request_count(ledger, key) == 3


def test_revoked_key_is_not_admitted(ledger):
    key, _ = ledger.create_key("team-a")
    ledger.revoke_key("team-a")
    decision = ledger.try_admit("req-0", key, "llama", 1)   # key info from before revocation
    assert not decision.allowed and "revoked" in decision.reason and decision.retry_after == 0
    assert _request_count(ledger, key) == 0


# Usage


def _fill(ledger, clock, rng, key, days):
    """Finalised requests over `days` days, two models; returns expected totals."""
    expected = {}
    for day in range(days):
        for i, model in enumerate(["llama", "qwen", "llama"]):
            request_id = f"{key.name}-{day}-{i}"
            prompt, cached, completion = _counts(rng)
            ledger.admit(request_id, key, model)
            ledger.finalize(request_id, "completed", prompt, cached, completion)
            for group in (model, clock.now.date().isoformat()):
                total = expected.setdefault(group, [0, 0, 0, 0])
                for j, value in enumerate((1, prompt, cached, completion)):
                    total[j] += value
        clock.advance(86400)
    return expected


def test_usage_groups_by_model_and_day(ledger, clock, rng):
    key, _ = ledger.create_key("team-a")
    ledger.set_price("*", 1.0, 0.5, 2.0)
    expected = _fill(ledger, clock, rng, key, days=3)
    for group_by in ("model", "day"):
        rows = ledger.usage(key.id, group_by=group_by)
        assert {row.group: [row.requests, row.prompt_tokens, row.cached_tokens,
                            row.completion_tokens] for row in rows} == {
            group: total for group, total in expected.items()
            if (group in ("llama", "qwen")) == (group_by == "model")}
        assert all(row.total_tokens == row.prompt_tokens + row.completion_tokens for row in rows)
    days = ledger.usage(key.id, start=datetime(2025, 3, 2), end=datetime(2025, 3, 3),
                        group_by="day")
    assert [row.group for row in days] == ["2025-03-02"]
    total = ledger.usage(key.id)
    assert len(total) == 1 and total[0].requests == 9
    assert total[0].cost == pytest.approx(sum(row.cost for row in ledger.usage(
        key.id, group_by="day")))


def test_a_key_reads_only_its_own_usage_and_an_admin_reads_all(ledger, clock, rng):
    team_a, _ = ledger.create_key("team-a")
    team_b, _ = ledger.create_key("team-b")
    admin, _ = ledger.create_key("ops", admin=True)
    _fill(ledger, clock, rng, team_a, days=1)
    _fill(ledger, clock, rng, team_b, days=2)
    with pytest.raises(PermissionError):
        ledger.usage_for(team_a, "team-b")
    with pytest.raises(PermissionError):
        ledger.usage_for(team_a, "ops")
    assert ledger.usage_for(team_a)[0].requests == 3
    assert ledger.usage_for(team_a, "team-a") == ledger.usage_for(team_a)
    assert ledger.usage_for(admin, "team-b")[0].requests == 6
    assert ledger.usage_for(admin)[0].requests == 9
    by_key = {row.group: row.requests for row in ledger.usage_for(admin, group_by="key")}
    assert by_key == {"team-a": 3, "team-b": 6}
    with pytest.raises(ValueError, match="no such key"):
        ledger.usage_for(admin, "team-c")
    ledger.revoke_key("team-a")
    with pytest.raises(PermissionError):
        ledger.usage_for(ledger.get_key("team-a"))


# CLI


def _ember(*args, db_url, home):
    env = dict(os.environ, EMBER_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "engine.cli", *args, "--db", db_url],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_cli_creates_lists_revokes_and_reports_usage(db_url, tmp_path, rng):
    # As a user writes it: a plain postgresql:// URL gets the `postgres` extra's driver.
    cli_url = db_url.replace("postgresql+psycopg://", "postgresql://")

    def ember(*args):
        return _ember(*args, db_url=cli_url, home=tmp_path)

    created = ember("keys", "create", "--name", "team-a", "--rpm", "60", "--tpm", "9000")
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip()
    assert plaintext.startswith("ember-") and "only" in created.stderr
    with Ledger(db_url) as ledger:
        key = ledger.authenticate(plaintext)
        assert key is not None and key.rpm == 60
        prompt, cached, completion = _counts(rng)
        ledger.admit("req-0", key, "llama")
        ledger.finalize("req-0", "completed", prompt, cached, completion)

    listed = ember("keys", "list")
    assert listed.returncode == 0 and "team-a" in listed.stdout and key.prefix in listed.stdout
    assert plaintext not in listed.stdout + listed.stderr
    assert plaintext.removeprefix(key.prefix) not in listed.stdout

    usage = ember("usage", "--key", "team-a", "--group-by", "model", "--csv")
    assert usage.returncode == 0, usage.stderr
    rows = list(csv.DictReader(io.StringIO(usage.stdout)))
    assert len(rows) == 1 and rows[0]["model"] == "llama"
    assert [int(rows[0][name]) for name in ("requests", "prompt_tokens", "cached_tokens",
                                            "completion_tokens", "total_tokens")] == [
        1, prompt, cached, completion, prompt + completion]

    assert ember("keys", "revoke", "team-a").returncode == 0
    assert "yes" in ember("keys", "list").stdout.splitlines()[1]
    for bad in (("keys", "create", "--name", "team-a"), ("usage", "--start", "tuesday"),
                ("usage", "--key", "nobody"), ("keys", "revoke", "nobody")):
        failed = ember(*bad)
        assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, bad
