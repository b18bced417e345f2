"""One ledger row per request: admitted as running, its counts kept up to date while it runs,
finalised exactly once, priced (no JAX).

Exactly once rests on one statement: UPDATE ... WHERE id = :id AND status = 'running'. The
database serialises concurrent updates of a row, so one caller sees rowcount 1 and every other
sees 0, whatever the number of threads or replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from engine.metering import schema
from engine.metering.keys import KeyInfo
from engine.metering.progress import ProgressWriter
from engine.sampling_params import is_int, is_number

_COUNT_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens")


@dataclass(slots=True, frozen=True)
class Price:
    """USD per million tokens. Cached prompt tokens are priced at cached_input, not input."""

    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        return ((prompt_tokens - cached_tokens) * self.input + cached_tokens * self.cached_input
                + completion_tokens * self.output) / 1_000_000


FREE = Price(0.0, 0.0, 0.0)   # models with no price row and no "*" row


def _check_counts(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    counts = dict(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                  completion_tokens=completion_tokens)
    for name, value in counts.items():
        if not is_int(value) or value < 0:
            raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    if cached_tokens > prompt_tokens:
        raise ValueError(f"cached_tokens={cached_tokens}: expected <= "
                         f"prompt_tokens={prompt_tokens} (cached tokens are part of the prompt)")
    return counts


class RequestLog:
    """Request-row methods of Ledger (which provides _db, _lock, _now, instance, _progress
    and _ensure_registered)."""

    _db: sa.Engine
    instance: str
    _progress: ProgressWriter

    def set_price(self, model: str, input: float, cached_input: float, output: float) -> None:
        """Sets a model's price, USD per million tokens; model "*" applies to unpriced models.

        Applies to requests finalised from now on; finalised costs never change.
        """
        if not isinstance(model, str) or not model:
            raise ValueError(f"model={model!r}: expected a model name or '*'")
        values = dict(input=input, cached_input=cached_input, output=output)
        for name, value in values.items():
            if not is_number(value) or not value >= 0:
                raise ValueError(f"{name}={value!r}: expected a price >= 0 (USD per 1M tokens)")
        values = {name: float(value) for name, value in values.items()}
        with self._lock, self._db.begin() as conn:
            updated = conn.execute(schema.prices.update()
                                   .where(schema.prices.c.model == model).values(**values))
            if updated.rowcount == 0:
                conn.execute(schema.prices.insert().values(model=model, **values))

    def price(self, model: str) -> Price:
        """The model's price, else the "*" price, else free."""
        table = schema.prices
        with self._db.connect() as conn:
            rows = conn.execute(sa.select(table).where(
                table.c.model.in_([model, schema.DEFAULT_PRICE_MODEL]))).all()
        by_model = {row.model: Price(row.input, row.cached_input, row.output) for row in rows}
        return by_model.get(model) or by_model.get(schema.DEFAULT_PRICE_MODEL) or FREE

    def list_prices(self) -> dict[str, Price]:
        """Every price row by model ("*" included), sorted by model."""
        with self._db.connect() as conn:
            rows = conn.execute(sa.select(schema.prices).order_by(schema.prices.c.model)).all()
        return {row.model: Price(row.input, row.cached_input, row.output) for row in rows}

    def admit(self, request_id: str, key: KeyInfo, model: str, *,
              estimated_tokens: int = 0, prompt_tokens: int = 0) -> None:
        """Inserts the request's row as running. Quotas are not checked: see try_admit.

        Args:
          request_id: unique over the ledger's life.
          key: the caller (anonymous_key() in --no-auth mode).
          model: the served model name (prices are looked up by it).
          estimated_tokens: prompt tokens + max_tokens; what the quotas count until it ends.
          prompt_tokens: the prompt's tokens, billed from admission on (a crash keeps them).

        Raises:
          ValueError: a request_id already in the ledger or a bad estimate.
          PermissionError: a revoked key.
        """
        self._ensure_registered()
        with self._db.begin() as conn:
            self._insert_request(conn, request_id, key, model, estimated_tokens, prompt_tokens)

    def _insert_request(self, conn: sa.Connection, request_id: str, key: KeyInfo, model: str,
                        estimated_tokens: int, prompt_tokens: int = 0) -> None:
        if key.revoked:
            raise PermissionError(f"key {key.name!r} is revoked")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r}: expected a non-empty string")
        for name, value in (("estimated_tokens", estimated_tokens),
                            ("prompt_tokens", prompt_tokens)):
            if not is_int(value) or value < 0:
                raise ValueError(f"{name}={value!r}: expected an integer >= 0")
        try:   # the error leaves the caller's transaction to roll back: it writes nothing more
            conn.execute(schema.requests.insert().values(
                id=request_id, key_id=key.id, model=model, instance=self.instance,
                status=schema.RUNNING, prompt_tokens=prompt_tokens, cached_tokens=0,
                completion_tokens=0, reserved_tokens=estimated_tokens, created_at=self._now(),
                cost=0.0))
        except IntegrityError as error:
            raise ValueError(f"request_id={request_id!r}: already in the ledger") from error

    def update_progress(self, request_id: str, prompt_tokens: int, cached_tokens: int,
                        completion_tokens: int) -> bool:
        """Writes counts so far now (kept if the process dies); False once the row is final.
        Running requests use record_progress, which batches."""
        counts = _check_counts(prompt_tokens, cached_tokens, completion_tokens)
        table = schema.requests
        with self._db.begin() as conn:
            result = conn.execute(table.update().where(
                table.c.id == request_id, table.c.status == schema.RUNNING).values(**counts))
        return result.rowcount == 1

    def record_progress(self, request_id: str, prompt_tokens: int, cached_tokens: int,
                        completion_tokens: int) -> int:
        """Queues counts so far for the ledger's writer thread, which writes every running
        request's newest counts in one transaction (see progress.py); a final row keeps its own.

        Returns:
          A ticket for progress_written().

        Raises:
          ValueError: bad counts.  RuntimeError: the ledger is closed.
        """
        counts = _check_counts(prompt_tokens, cached_tokens, completion_tokens)
        return self._progress.record(request_id, counts)

    def progress_written(self, ticket: int, timeout: float = 0.0) -> bool:
        """Whether record_progress's `ticket` is in the database, waiting up to `timeout` s."""
        return self._progress.written(ticket, timeout)

    def _write_progress(self, batch: dict[str, dict]) -> None:
        table = schema.requests
        statement = table.update().where(
            table.c.id == sa.bindparam("request_id"), table.c.status == schema.RUNNING).values(
                {name: sa.bindparam(f"new_{name}") for name in _COUNT_FIELDS})
        rows = [{"request_id": request_id, **{f"new_{k}": v for k, v in counts.items()}}
                for request_id, counts in batch.items()]
        with self._db.begin() as conn:
            conn.execute(statement, rows)

    def finalize(self, request_id: str, status: str, prompt_tokens: int, cached_tokens: int,
                 completion_tokens: int) -> bool:
        """Sets the final counts, status, finished_at and cost, once.

        Args:
          status: "completed", "aborted" (client gone: billed for what was emitted), "error"
            or "interrupted".
          prompt_tokens, cached_tokens, completion_tokens: the final RequestOutput.usage (what
            the response reports); cached_tokens is a part of prompt_tokens.

        Returns:
          True if this call finalised the row; False if it was already final (nothing changed).

        Raises:
          ValueError: a bad status or counts.  KeyError: no row for request_id.
        """
        if status not in schema.FINAL_STATUSES:
            raise ValueError(f"status={status!r}: expected one of {schema.FINAL_STATUSES}")
        counts = _check_counts(prompt_tokens, cached_tokens, completion_tokens)
        table = schema.requests
        with self._db.connect() as conn:
            model = conn.execute(sa.select(table.c.model).where(table.c.id == request_id)).scalar()
        if model is None:
            raise KeyError(f"request_id={request_id!r}: not in the ledger (never admitted)")
        self._progress.discard(request_id)
        cost = self.price(model).cost(**counts)
        with self._db.begin() as conn:
            result = conn.execute(table.update().where(
                table.c.id == request_id, table.c.status == schema.RUNNING).values(
                    status=status, finished_at=self._now(), cost=cost, **counts))
        return result.rowcount == 1

    def record_finished(self, key: KeyInfo, model: str,
                        usages: Sequence[tuple[str, int, int, int]], *,
                        status: str = "completed", discount: float = 0.0) -> list[str]:
        """Admits and finalises, in one transaction, requests that ran outside the server
        (`ember batch`), each billed exactly once: an id already final is skipped (a resumed
        batch handing in again what it billed before), a running one is finalised, a new one
        is inserted final. No quota is checked. One transaction per call keeps billing off
        the batch's critical path (admit + finalize cost ~1 ms per request on SQLite).

        Args:
          usages: (request_id, prompt_tokens, cached_tokens, completion_tokens) per request.
          discount: the fraction taken off the price, in [0, 1] (0.5: the batch price is half).

        Returns:
          The request ids this call billed, in the order given.

        Raises:
          ValueError: a bad status, discount, id or counts.  PermissionError: a revoked key.
        """
        if status not in schema.FINAL_STATUSES:
            raise ValueError(f"status={status!r}: expected one of {schema.FINAL_STATUSES}")
        if not is_number(discount) or not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount={discount!r}: expected a fraction in [0, 1]")
        if key.revoked:
            raise PermissionError(f"key {key.name!r} is revoked")
        counts = {}
        for request_id, *usage in usages:
            if not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id={request_id!r}: expected a non-empty string")
            counts[request_id] = _check_counts(*usage)
        price, now, table = self.price(model), self._now(), schema.requests

        def final(request_id: str) -> dict:
            cost = price.cost(**counts[request_id]) * (1.0 - discount)
            return dict(status=status, finished_at=now, cost=cost, **counts[request_id])

        ids = list(counts)
        with self._lock, self._db.begin() as conn:
            found = {}
            for start in range(0, len(ids), 500):   # under every backend's bound-parameter limit
                found.update(conn.execute(sa.select(table.c.id, table.c.status).where(
                    table.c.id.in_(ids[start:start + 500]))).all())
            new = [dict(id=i, key_id=key.id, model=model, instance=self.instance,
                        reserved_tokens=0, created_at=now, **final(i))
                   for i in ids if i not in found]
            if new:
                conn.execute(table.insert(), new)
            billed = {row["id"] for row in new}
            for request_id in (i for i in ids if found.get(i) == schema.RUNNING):
                if conn.execute(table.update().where(
                        table.c.id == request_id, table.c.status == schema.RUNNING).values(
                            **final(request_id))).rowcount == 1:
                    billed.add(request_id)
        return [i for i in ids if i in billed]

    def final_ids(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these requests have a final row (read only)."""
        table, ids, final = schema.requests, list(request_ids), set()
        with self._db.connect() as conn:
            for start in range(0, len(ids), 500):   # under every backend's bound-parameter limit
                final.update(conn.execute(sa.select(table.c.id).where(
                    table.c.id.in_(ids[start:start + 500]),
                    table.c.status.in_(schema.FINAL_STATUSES))).scalars())
        return final

    def _mark_row_interrupted(self, row) -> int:
        """Marks one running row (id, model and its counts) interrupted, priced on its counts;
        1 if this call did it."""
        table = schema.requests
        cost = self.price(row.model).cost(row.prompt_tokens, row.cached_tokens,
                                          row.completion_tokens)
        with self._db.begin() as conn:
            # Counts are in the same WHERE-running statement, so a progress write cannot slip
            # between the read and the mark unpriced.
            return conn.execute(table.update().where(
                table.c.id == row.id, table.c.status == schema.RUNNING,
                *(table.c[name] == getattr(row, name) for name in _COUNT_FIELDS)).values(
                    status="interrupted", finished_at=self._now(), cost=cost)).rowcount
