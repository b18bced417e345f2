"""Ledger: the record of who used what, one object over keys, requests, quotas and usage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from engine.metering import schema
from engine.metering.keys import KeyStore
from engine.metering.quotas import QuotaGate
from engine.metering.request_log import RequestLog
from engine.metering.usage import UsageReport


class Ledger(KeyStore, RequestLog, QuotaGate, UsageReport):
    """The metering ledger, safe to share between threads (one Engine, one connection pool).

    Args:
      url: any SQLAlchemy URL; None is sqlite:///$EMBER_HOME/ledger.db (EMBER_HOME defaults
        to ~/.cache/ember). SQLite runs in WAL mode with a busy timeout; replicas share one
        PostgreSQL URL.
      instance: this replica's stable name; mark_interrupted() only touches rows it admitted.
      clock: returns the current time (aware, or naive UTC); tests move it forward.

    Raises:
      ValueError: a malformed URL.  OSError: the database cannot be opened.
    """

    def __init__(self, url: str | None = None, *, instance: str = "default",
                 clock: Callable[[], datetime] | None = None) -> None:
        if not isinstance(instance, str) or not instance:
            raise ValueError(f"instance={instance!r}: expected a non-empty replica name")
        self.instance = instance
        self._clock = clock
        self._lock = threading.Lock()   # admissions in this process: check + insert as one
        self._db = schema.open_database(url)
        self.url = self._db.url.render_as_string(hide_password=True)

    def _now(self) -> datetime:
        return schema.utc_now() if self._clock is None else schema.to_utc_naive(self._clock())

    def close(self) -> None:
        """Closes the pooled connections."""
        self._db.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
