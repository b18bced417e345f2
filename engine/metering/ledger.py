"""Ledger: the record of who used what, one object over keys, requests, quotas and usage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from engine.metering import schema
from engine.metering.instances import InstanceRegistry, default_instance_name
from engine.metering.keys import KeyStore
from engine.metering.progress import ProgressWriter
from engine.metering.quotas import QuotaGate
from engine.metering.request_log import RequestLog
from engine.metering.usage import UsageReport


class Ledger(KeyStore, RequestLog, QuotaGate, UsageReport, InstanceRegistry):
    """The metering ledger, safe to share between threads (one Engine, one connection pool).

    Args:
      url: any SQLAlchemy URL; None is sqlite:///$EMBER_HOME/ledger.db (EMBER_HOME defaults
        to ~/.cache/ember). SQLite runs in WAL mode with a busy timeout; replicas share one
        PostgreSQL URL.
      instance: the name its rows are admitted under. None (the default) is unique to this
        Ledger: host, pid and start time. A stable name (`--instance`) lets a restarted
        replica claim its predecessor's open rows at once; two live Ledgers never share one.
        mark_interrupted() touches only rows of instances that are gone (instances.py).
      clock: returns the current time (aware, or naive UTC); tests move it forward. Leases
        are timed by it too.

    Raises:
      ValueError: a malformed URL.  OSError: the database cannot be opened.
    """

    def __init__(self, url: str | None = None, *, instance: str | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        if instance is None:
            instance = default_instance_name()
        if not isinstance(instance, str) or not 0 < len(instance) <= 128:
            raise ValueError(f"instance={instance!r}: expected a replica name of 1-128 "
                             "characters, or None for a unique one")
        self.instance = instance
        self._clock = clock
        self._lock = threading.Lock()   # admissions in this process: check + insert as one
        self._db = schema.open_database(url)
        self.url = self._db.url.render_as_string(hide_password=True)
        self._progress = ProgressWriter(self._write_progress)
        self._init_registry()

    def _now(self) -> datetime:
        return schema.utc_now() if self._clock is None else schema.to_utc_naive(self._clock())

    def close(self) -> None:
        """Writes pending progress, ends this instance's lease and closes the connections."""
        self._progress.close()
        self._release()
        self._db.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
