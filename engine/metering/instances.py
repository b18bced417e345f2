"""Which ledger instances (server processes) are alive, so that a start-up marks interrupted
only the running rows of instances that are gone (no JAX).

A Ledger that admits requests registers its instance (name, host, pid) in the `instances`
table and renews a lease there from a daemon thread every HEARTBEAT_S. Another instance's
running rows are orphaned, and mark_interrupted() marks them, when its lease is older than
LEASE_S, or it ran on this host and its process is gone, or it has no instance row at all
(rows written by a version without leases, or by a Ledger closed while they ran). Rows under
this Ledger's own name are orphaned when admitted before it registered: a restart under a
stable `--instance` name. Registering a name whose lease another live process holds waits
for that lease to lapse, then fails: two live servers never share a name.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from engine.metering import schema

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0    # how often a live instance renews its lease
LEASE_S = 15.0       # a lease not renewed for this long is an instance gone
_HOSTNAME_CHARS = 64
_ledgers_in_process = itertools.count()


def host_identity() -> str:
    """This host as pids are meaningful on it: the hostname and the pid namespace (containers
    sharing a hostname have their own pids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{namespace}"[:256]


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (pid reuse changes it); None when
    there is no such process, it is a zombie, or /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def process_alive(pid: int, started: int | None) -> bool:
    """Whether the process `pid` of this host, started at `started` (ticks), still runs."""
    if os.path.isdir("/proc/self"):
        now_started = process_start(pid)
        return now_started is not None and (started is None or now_started == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_instance_name() -> str:
    """A name no other process takes: host, pid and start time (UTC, microseconds)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
    number = next(_ledgers_in_process)
    suffix = f":{number}" if number else ""
    return f"{socket.gethostname()[:_HOSTNAME_CHARS]}:{os.getpid()}:{stamp}{suffix}"


class InstanceRegistry:
    """Instance methods of Ledger (which provides _db, _now, instance and
    _mark_row_interrupted)."""

    _db: sa.Engine
    instance: str

    def _init_registry(self) -> None:
        self._host, self._pid = host_identity(), os.getpid()
        self._pid_start = process_start(self._pid)
        self._registered_at: datetime | None = None
        self._register_lock = threading.Lock()
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _alive(self, row, now: datetime) -> bool:
        if row.heartbeat_at < now - timedelta(seconds=LEASE_S):
            return False
        return row.host != self._host or process_alive(row.pid, row.pid_start)

    def _ensure_registered(self) -> None:
        """Registers this instance and starts its heartbeat, once (before its first row)."""
        if self._registered_at is not None:
            return
        with self._register_lock:
            if self._registered_at is None:
                self._register()
                self._heartbeat = threading.Thread(target=self._renew_lease, daemon=True,
                                                   name=f"ledger-lease-{self.instance}")
                self._heartbeat.start()

    def _register(self) -> None:
        deadline, warned = time.monotonic() + LEASE_S + HEARTBEAT_S, False
        while True:
            now = self._now()
            try:
                holder = self._take_name(now)
            except IntegrityError:   # another process inserted the name first: look again
                continue
            if holder is None:
                self._registered_at = now
                return
            host = holder.host.split("|")[0]
            if time.monotonic() > deadline:
                raise ValueError(
                    f"instance={self.instance!r}: in use by pid {holder.pid} on {host} (lease "
                    f"renewed at {holder.heartbeat_at} UTC); give each server its own "
                    "--instance name, or leave it unset")
            if not warned:
                logger.warning("instance %r: waiting for the lease of pid %s on %s to lapse",
                               self.instance, holder.pid, host)
                warned = True
            time.sleep(0.5)

    def _take_name(self, now: datetime):
        """Claims the instance name in one transaction: None when claimed, else the row of
        the live process holding it."""
        table = schema.instances
        mine = dict(host=self._host, pid=self._pid, pid_start=self._pid_start,
                    started_at=now, heartbeat_at=now)
        with self._db.begin() as conn:
            row = conn.execute(sa.select(table).where(table.c.name == self.instance)).first()
            if row is None:
                conn.execute(table.insert().values(name=self.instance, **mine))
                return None
            if self._alive(row, now):
                return row
            # Its holder is gone: take the name over, unless another process just did.
            taken = conn.execute(table.update().where(
                table.c.name == self.instance, table.c.pid == row.pid,
                table.c.heartbeat_at == row.heartbeat_at).values(**mine)).rowcount
        return None if taken else row

    def _renew_lease(self) -> None:
        table = schema.instances
        while not self._stop_heartbeat.wait(HEARTBEAT_S):
            try:
                with self._db.begin() as conn:
                    renewed = conn.execute(table.update().where(
                        table.c.name == self.instance, table.c.pid == self._pid,
                        table.c.host == self._host).values(heartbeat_at=self._now())).rowcount
            except SQLAlchemyError:
                logger.exception("instance %r: the ledger lease could not be renewed",
                                 self.instance)
                continue
            if not renewed:
                logger.error("instance %r: its lease was taken over (it lapsed); its running "
                             "rows may have been marked interrupted", self.instance)
                return

    def _release(self) -> None:
        """Stops the heartbeat and deletes this instance's row (a clean close)."""
        self._stop_heartbeat.set()
        if self._heartbeat is None:
            return
        self._heartbeat.join(timeout=HEARTBEAT_S + 5)
        table = schema.instances
        try:
            with self._db.begin() as conn:
                conn.execute(table.delete().where(table.c.name == self.instance,
                                                  table.c.pid == self._pid,
                                                  table.c.host == self._host))
        except SQLAlchemyError:
            logger.exception("instance %r: its ledger row could not be deleted", self.instance)

    def _orphaned_instances(self, conn: sa.Connection, now: datetime) -> tuple[set, list]:
        """(names whose running rows are all orphaned, their instance rows to delete)."""
        requests, table = schema.requests, schema.instances
        names = set(conn.execute(sa.select(requests.c.instance).distinct()
                                 .where(requests.c.status == schema.RUNNING)).scalars())
        names.discard(self.instance)
        rows = {row.name: row for row in conn.execute(
            sa.select(table).where(table.c.name.in_(names)))} if names else {}
        gone = {name for name in names if name not in rows or not self._alive(rows[name], now)}
        return gone, [rows[name] for name in gone if name in rows]

    def mark_interrupted(self) -> int:
        """At start-up: running rows of instances that are gone become interrupted.

        They keep the counts last recorded (record_progress, update_progress) and are priced
        on them. A live instance's rows are never touched, whatever its name; rows under this
        Ledger's own name are marked only when admitted before it registered (a restart).

        Returns:
          How many rows were marked.
        """
        self._ensure_registered()
        now, table = self._now(), schema.requests
        with self._db.connect() as conn:
            gone, stale = self._orphaned_instances(conn, now)
            mine = sa.and_(table.c.instance == self.instance,
                           table.c.created_at < self._registered_at)
            rows = conn.execute(sa.select(table.c.id, table.c.model, table.c.prompt_tokens,
                                          table.c.cached_tokens, table.c.completion_tokens)
                                .where(table.c.status == schema.RUNNING,
                                       sa.or_(table.c.instance.in_(gone), mine))).all()
        marked = sum(self._mark_row_interrupted(row) for row in rows)
        if stale:
            instances = schema.instances
            with self._db.begin() as conn:
                for row in stale:   # unless another process took the name over meanwhile
                    conn.execute(instances.delete().where(
                        instances.c.name == row.name, instances.c.pid == row.pid,
                        instances.c.heartbeat_at == row.heartbeat_at))
        return marked
