"""Ledger instances: a start-up marks interrupted only the running rows of instances that are
gone (killed, or their lease lapsed), never a live one's, and migrates an older ledger.

On SQLite and on a real PostgreSQL server (conftest.py). Crashed servers are real processes
here: a child admits rows and records progress, then is killed with SIGKILL (or stopped with
SIGSTOP, so its lease lapses while its pid lives)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.metering import Ledger, instances, schema

REPO = Path(__file__).resolve().parents[3]

_CHILD = textwrap.dedent("""
    import sys, time
    from engine.metering import Ledger, instances
    url, instance, count = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
    instances.HEARTBEAT_S = float(sys.argv[4])
    ledger = Ledger(url, instance=instance)
    key = ledger.get_key("team-a")
    for i in range(count):
        ledger.try_admit(f"{ledger.instance}/{i}", key, "llama", 500, prompt_tokens=10 + i)
        ticket = ledger.record_progress(f"{ledger.instance}/{i}", 10 + i, i, 3 * i + 1)
    assert ledger.progress_written(ticket, 10)
    print(ledger.instance, flush=True)
    time.sleep(600)
""")


class Child:
    """A server stand-in in its own process: admits `count` rows under `instance`."""

    def __init__(self, db_url: str, instance: str | None, count: int,
                 heartbeat_s: float = instances.HEARTBEAT_S):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, db_url, instance or "", str(count),
             str(heartbeat_s)], cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
        self.instance = self.proc.stdout.readline().strip()
        assert self.instance, "the child ledger failed to start"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def db_url(empty_db_url):
    with Ledger(empty_db_url) as ledger:
        ledger.create_key("team-a")
        ledger.set_price("*", 1.0, 0.5, 3.0)
    return empty_db_url


@pytest.fixture
def children():
    started = []
    yield lambda *args: started.append(Child(*args)) or started[-1]
    for child in started:
        child.close()


def _rows(db_url, instance):
    with Ledger(db_url) as ledger, ledger._db.connect() as conn:
        table = schema.requests
        return {row.id: row for row in conn.execute(
            sa.select(table).where(table.c.instance == instance))}


def _expected_cost(i: int) -> float:
    prompt, cached, completion = 10 + i, i, 3 * i + 1
    return ((prompt - cached) * 1.0 + cached * 0.5 + completion * 3.0) / 1e6


def test_default_instance_names_are_unique_and_say_host_and_pid(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as first, Ledger(url) as second:
        assert first.instance != second.instance
        host, pid = socket.gethostname()[:64], str(os.getpid())
        assert first.instance.split(":")[:2] == [host, pid]
    for bad in ("", "x" * 129, 7):
        with pytest.raises(ValueError, match="instance="):
            Ledger(url, instance=bad)


def test_a_live_server_rows_are_spared_and_a_killed_one_rows_are_marked(db_url, children):
    alive, killed = children(db_url, None, 2), children(db_url, None, 3)
    with Ledger(db_url) as starting:   # a second server on the same database starts
        assert starting.mark_interrupted() == 0
        killed.kill()
        assert starting.mark_interrupted() == 3
        assert starting.mark_interrupted() == 0
    for i, row in enumerate(sorted(_rows(db_url, killed.instance).values(), key=lambda r: r.id)):
        assert (row.status, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
            "interrupted", 10 + i, i, 3 * i + 1)
        assert row.cost == pytest.approx(_expected_cost(i))
    assert {row.status for row in _rows(db_url, alive.instance).values()} == {"running"}


def test_a_hung_server_rows_are_marked_once_its_lease_lapses(db_url, children):
    hung = children(db_url, None, 2)
    hung.kill(signal.SIGSTOP)                  # its pid lives; its heartbeat stops
    later = datetime.now(UTC) + timedelta(seconds=instances.LEASE_S + 5)
    with Ledger(db_url) as now:
        assert now.mark_interrupted() == 0
    with Ledger(db_url, clock=lambda: later) as after_the_lease:
        assert after_the_lease.mark_interrupted() == 2
    assert {row.status for row in _rows(db_url, hung.instance).values()} == {"interrupted"}


def test_a_restart_under_a_stable_name_marks_its_predecessor_rows(db_url, children):
    crashed = children(db_url, "replica-1", 3)
    other = children(db_url, "replica-2", 1)
    crashed.kill()
    with Ledger(db_url, instance="replica-1") as restarted:
        assert restarted.mark_interrupted() == 3
        key = restarted.get_key("team-a")
        assert restarted.try_admit("replica-1/new", key, "llama", 10).allowed
        assert restarted.mark_interrupted() == 0       # its own new row is live
    statuses = {rid: row.status for rid, row in _rows(db_url, "replica-1").items()}
    assert statuses.pop("replica-1/new") == "running"
    assert set(statuses.values()) == {"interrupted"}
    assert {row.status for row in _rows(db_url, other.instance).values()} == {"running"}


def test_a_stable_name_held_by_a_live_server_is_refused(db_url, children, monkeypatch):
    monkeypatch.setattr(instances, "LEASE_S", 1.0)   # waits ~1.2 s for the lease, not ~17 s
    children(db_url, "replica-1", 1, 0.1)
    with Ledger(db_url, instance="replica-1") as second:
        with pytest.raises(ValueError, match="instance='replica-1': in use by pid"):
            second.mark_interrupted()


def test_a_ledger_of_the_previous_version_is_migrated(empty_db_url):
    """The version before leases: no instances table, rows admitted as instance 'default'."""
    url = empty_db_url
    old = sa.MetaData()
    for table in (schema.keys, schema.requests, schema.prices):
        table.to_metadata(old)
    engine = sa.create_engine(url)
    old.create_all(engine)
    now = schema.utc_now()
    with engine.begin() as conn:
        conn.execute(old.tables["keys"].insert().values(
            id=1, name="team-a", prefix="ember-abc", key_hash="0" * 64, created_at=now))
        conn.execute(old.tables["requests"].insert(), [dict(
            id=f"old-{i}", key_id=1, model="llama", instance="default", status="running",
            prompt_tokens=5, cached_tokens=0, completion_tokens=i, reserved_tokens=50,
            created_at=now, cost=0.0) for i in range(2)])
    engine.dispose()
    with Ledger(url) as ledger:
        assert ledger.mark_interrupted() == 2   # their server is gone: it ran the old version
        with ledger._db.connect() as conn:
            assert sa.inspect(conn).has_table("instances")
        assert ledger.usage()[0].completion_tokens == 1
