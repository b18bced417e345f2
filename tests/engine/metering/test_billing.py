"""Billing details: batched progress writes, prices per model and their CLI, the quota check
before admission (check_quota, too_large), and the reserved anonymous key."""

import random
import threading
import time

import pytest

from engine import cli
from engine.metering import Ledger, schema
from engine.metering.progress import FLUSH_INTERVAL_S, ProgressWriter


@pytest.fixture
def rng():
    return random.Random(20250311)


def _row(ledger, request_id):
    with ledger._db.connect() as conn:
        return conn.execute(schema.requests.select().where(
            schema.requests.c.id == request_id)).one()


# Progress


def test_progress_of_many_streams_is_coalesced_into_few_transactions():
    written, batches = {}, []

    def write(batch):
        time.sleep(0.002)   # a commit
        batches.append(len(batch))
        written.update(batch)

    writer = ProgressWriter(write)
    newest = {}

    def stream(index):
        local = random.Random(index)
        for count in range(1, 201):
            counts = {"prompt_tokens": index, "cached_tokens": 0, "completion_tokens": count}
            newest[f"req-{index}"] = counts
            ticket = writer.record(f"req-{index}", counts)
            if local.random() < 0.05:
                assert writer.written(ticket, timeout=5)

    started = time.monotonic()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    seconds = time.monotonic() - started
    assert written == newest                       # every stream's newest counts, none lost
    assert len(batches) <= seconds / FLUSH_INTERVAL_S + 2
    assert sum(batches) < 64 * 200 / 4             # coalesced, not one write per record


def test_recorded_progress_reaches_the_row_and_never_reopens_a_final_one(ledger):
    key, _ = ledger.create_key("team-a")
    ledger.try_admit("req-1", key, "llama", 400, prompt_tokens=37)
    assert _row(ledger, "req-1").prompt_tokens == 37     # at admission
    ticket = ledger.record_progress("req-1", 37, 16, 5)
    assert ledger.progress_written(ticket, timeout=5)
    row = _row(ledger, "req-1")
    assert (row.status, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
        "running", 37, 16, 5)
    assert ledger.finalize("req-1", "aborted", 37, 16, 9)
    assert ledger.progress_written(ledger.record_progress("req-1", 37, 16, 30), timeout=5)
    assert _row(ledger, "req-1").completion_tokens == 9
    with pytest.raises(ValueError, match="cached_tokens="):
        ledger.record_progress("req-1", 3, 4, 0)
    ledger.close()
    with pytest.raises(RuntimeError, match="closed"):
        ledger.record_progress("req-1", 37, 16, 31)


# Quotas before admission


@pytest.mark.parametrize("limits, used, estimate, allowed, too_large", [
    ({"tpm": 1000}, 0, 1000, True, False),
    ({"tpm": 1000}, 600, 500, False, False),      # waiting helps: 429
    ({"tpm": 1000}, 0, 1001, False, True),        # never fits: 400
    ({"tokens_per_day": 5000}, 4000, 2000, False, False),
    ({"tokens_per_day": 5000}, 0, 5001, False, True),
    ({"rpm": 1}, 1, 1, False, False),
    ({"rpm": 2, "tpm": 100}, 1, 101, False, True),
    ({}, 10**6, 10**9, True, False),
])
def test_check_quota_matches_try_admit_and_writes_nothing(ledger, limits, used, estimate,
                                                          allowed, too_large):
    key, _ = ledger.create_key("team-a", **limits)
    if used:
        ledger.try_admit("earlier", key, "llama", used)
    checked = ledger.check_quota(key, estimate)
    assert (checked.allowed, checked.too_large) == (allowed, too_large)
    assert ledger.usage(key.id)[0].requests == (1 if used else 0)   # nothing written
    admitted = ledger.try_admit("now", key, "llama", estimate)
    assert (admitted.allowed, admitted.too_large, admitted.reason) == (
        allowed, too_large, checked.reason)
    assert (checked.retry_after == 0) == (too_large or allowed)


def test_a_revoked_key_is_refused_but_not_too_large(ledger):
    key, _ = ledger.create_key("team-a", tpm=10)
    ledger.revoke_key("team-a")
    decision = ledger.check_quota(ledger.get_key("team-a"), 10**6)
    assert not decision.allowed and not decision.too_large and "revoked" in decision.reason


# The anonymous key


def test_the_anonymous_key_cannot_be_revoked(ledger):
    anonymous = ledger.anonymous_key()
    for name_or_id in ("anonymous", anonymous.id, str(anonymous.id)):
        with pytest.raises(ValueError, match="'anonymous' key cannot be revoked"):
            ledger.revoke_key(name_or_id)
    assert not ledger.anonymous_key().revoked
    assert ledger.try_admit("req-1", ledger.anonymous_key(), "llama", 10).allowed


def test_an_anonymous_key_revoked_by_an_older_version_is_restored(ledger):
    anonymous = ledger.anonymous_key()
    with ledger._db.begin() as conn:   # what the previous version let `keys revoke` do
        conn.execute(schema.keys.update().where(schema.keys.c.id == anonymous.id)
                     .values(revoked=True, revoked_at=schema.utc_now()))
    restored = ledger.anonymous_key()
    assert restored.id == anonymous.id and not restored.revoked


# Prices


def _ember(db_url, *argv):
    args = cli.build_parser().parse_args([*argv, "--db", db_url])
    return {"prices": cli._prices, "usage": cli._usage, "keys": cli._keys}[args.command](args)


def test_prices_set_per_model_are_listed_and_cost_usage(tmp_path, capsys, rng):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _ember(url, "prices", "set", "llama", "--input", "0.6", "--cached-input", "0.15",
           "--output", "2.4")
    _ember(url, "prices", "set", "*", "--input", "1", "--output", "3")
    _ember(url, "prices", "set", "llama", "--input", "0.5", "--cached-input", "0.1",
           "--output", "2")                          # a second set replaces the first
    capsys.readouterr()
    _ember(url, "prices", "list")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "input", "cached_input", "output"]
    assert [line.split() for line in lines[1:]] == [["*", "1", "1", "3"],
                                                    ["llama", "0.5", "0.1", "2"]]
    expected = 0.0
    with Ledger(url) as ledger:
        key, _ = ledger.create_key("team-a")
        for i, (model, price) in enumerate([("llama", (0.5, 0.1, 2)), ("qwen", (1, 1, 3))] * 3):
            prompt = rng.randrange(10, 5000)
            cached, completion = rng.randrange(0, prompt), rng.randrange(1, 900)
            ledger.admit(f"req-{i}", key, model)
            ledger.finalize(f"req-{i}", "completed", prompt, cached, completion)
            expected += ((prompt - cached) * price[0] + cached * price[1]
                         + completion * price[2]) / 1e6
    _ember(url, "usage", "--csv")
    header, row = (line.split(",") for line in capsys.readouterr().out.splitlines())
    assert float(row[header.index("cost_usd")]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("flags, named", [
    (["--input", "-1", "--output", "1"], "--input=-1.0"),
    (["--input", "1", "--output", "nan"], "--output=nan"),
    (["--input", "1", "--cached-input", "inf", "--output", "1"], "--cached-input=inf"),
])
def test_bad_prices_are_refused_naming_the_flag(tmp_path, flags, named):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with pytest.raises(ValueError, match=named):
        _ember(url, "prices", "set", "llama", *flags)
    with Ledger(url) as ledger:
        assert ledger.list_prices() == {}
