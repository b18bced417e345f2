"""Counts of running requests, written in batches by one daemon thread per Ledger (no JAX).

A streaming request records what it has sent after every chunk batch (record_progress); the
writer keeps the newest counts of each request and writes all of them in one transaction,
at once when it is idle and then at most every FLUSH_INTERVAL_S. So 64 streams cost at most
1 / FLUSH_INTERVAL_S transactions a second, not one per token, and a count reaches the
database one commit after it is recorded when the writer is idle, FLUSH_INTERVAL_S plus one
commit at worst. A caller that must not run ahead of the ledger waits for its ticket.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.01   # the writer's shortest period: <= 100 transactions a second
RETRY_S = 0.5             # after a failed write (the batch is kept and written again)

Counts = dict[str, int]   # prompt_tokens, cached_tokens, completion_tokens


class ProgressWriter:
    """Coalesces {request id: newest counts} and hands them to `write` on its own thread.

    Args:
      write: writes one batch in one transaction; raises to have it retried.
      interval_s: the shortest time between the starts of two writes.
    """

    def __init__(self, write: Callable[[dict[str, Counts]], None],
                 interval_s: float = FLUSH_INTERVAL_S):
        self._write, self._interval_s = write, interval_s
        self._pending: dict[str, Counts] = {}
        self._changed = threading.Condition()
        self._recorded = 0    # the newest ticket handed out
        self._written = 0     # every ticket up to this one is in the database
        self._closed = False
        self._thread: threading.Thread | None = None

    def record(self, request_id: str, counts: Counts) -> int:
        """Queues the request's counts (replacing older ones not yet written).

        Returns:
          A ticket: written(ticket) is True once these counts (or newer) are in the database.
        """
        with self._changed:
            if self._closed:
                raise RuntimeError("the ledger is closed: progress cannot be recorded")
            self._recorded += 1
            self._pending[request_id] = counts
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="ledger-progress")
                self._thread.start()
            self._changed.notify_all()
            return self._recorded

    def discard(self, request_id: str) -> None:
        """Drops counts not written yet (the row is being finalised with its own)."""
        with self._changed:
            self._pending.pop(request_id, None)

    def written(self, ticket: int, timeout: float = 0.0) -> bool:
        """Whether the counts of `ticket` are in the database, waiting up to `timeout` s."""
        with self._changed:
            return self._changed.wait_for(lambda: self._written >= ticket, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Writes what is pending, then stops the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return   # closed, and everything written
                batch, ticket, self._pending = self._pending, self._recorded, {}
            started = time.monotonic()
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001 - the thread must live on; the batch is retried
                logger.exception("ledger: %d progress records could not be written; retrying",
                                 len(batch))
                with self._changed:
                    self._pending = {**batch, **self._pending}
                    if self._closed:
                        return
                time.sleep(RETRY_S)
                continue
            with self._changed:
                self._written = ticket
                self._changed.notify_all()
            time.sleep(max(0.0, self._interval_s - (time.monotonic() - started)))
