"""Per-key quotas, checked before admission: requests/min, tokens/min, tokens/day (no JAX).

The windows are read from the ledger's own rows, not kept in memory, so replicas sharing one
database agree and a restart forgets nothing:

- requests/min and tokens/min: a sliding 60 s window over rows by admission time;
- tokens/day: the rows admitted since 00:00 UTC (the limit resets at midnight UTC).

A running row counts its estimate (prompt + max_tokens, from admission) or what it has used,
whichever is larger; a final row counts prompt + completion tokens. A rejected request
writes nothing, so it costs nothing and does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from engine.metering import schema
from engine.metering.keys import KeyInfo
from engine.sampling_params import is_int

WINDOW = timedelta(seconds=60)


@dataclass(slots=True, frozen=True)
class QuotaDecision:
    """Whether a request may be admitted now.

    Attributes:
      allowed: admit it, or answer 429 (403 for a revoked key).
      reason: why not ("" when allowed); names the limit and the numbers.
      retry_after: seconds until the request would fit (>= 1) when a limit is exceeded;
        0 when allowed or when waiting cannot help (a revoked key, or a request larger
        than a limit by itself).
      headers: OpenAI's x-ratelimit-* headers, for the limits the key has. Remaining counts
        include this request when it is allowed. The token headers describe tokens/min, or
        tokens/day for a key with only a daily limit.
      too_large: the estimate alone exceeds the key's whole tokens/min or tokens/day limit,
        so waiting never helps: the HTTP layer answers 400, not 429.
    """

    allowed: bool
    reason: str = ""
    retry_after: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    too_large: bool = False


def counted_tokens(table: sa.Table = schema.requests) -> sa.ColumnElement:
    used = table.c.prompt_tokens + table.c.completion_tokens
    return sa.case((sa.and_(table.c.status == schema.RUNNING, table.c.reserved_tokens > used),
                    table.c.reserved_tokens), else_=used)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: 45s, 1m30s, 2h0m5s."""
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class QuotaGate:
    """Quota methods of Ledger (which provides _db, _lock, _now and _insert_request)."""

    _db: sa.Engine

    def check_quota(self, key: KeyInfo, estimated_tokens: int) -> QuotaDecision:
        """Whether `key` may start a request of `estimated_tokens` (prompt + max_tokens) now,
        by the same rules as try_admit.

        Read-only (no row is written): a cheap early answer, before tokenizing a body, from
        an estimate. Admit with try_admit, which checks and inserts in one transaction so
        concurrent requests cannot both take the last slot.
        """
        with self._db.connect() as conn:
            return self._decide(conn, key, estimated_tokens)

    def try_admit(self, request_id: str, key: KeyInfo, model: str,
                  estimated_tokens: int, *, prompt_tokens: int = 0) -> QuotaDecision:
        """check_quota() then admit() atomically: the row is inserted only when allowed.

        Within a process a lock serialises admissions; across processes (replicas) the
        database does, before the window is read (_lock_key): an admission waits for the one
        ahead of it to commit and then counts its row.

        Args:
          prompt_tokens: the prompt's tokens, written with the row (a crash keeps them).

        Raises:
          ValueError: a request_id already in the ledger, or a bad estimate.
        """
        self._ensure_registered()   # its own transaction, before this one
        with self._lock, self._db.begin() as conn:
            decision = self._decide(conn, key, estimated_tokens, revoked=_lock_key(conn, key))
            if decision.allowed:
                self._insert_request(conn, request_id, key, model, estimated_tokens,
                                     prompt_tokens)
        return decision

    def _decide(self, conn: sa.Connection, key: KeyInfo, estimated_tokens: int,
                revoked: bool | None = None) -> QuotaDecision:
        if not is_int(estimated_tokens) or estimated_tokens < 0:
            raise ValueError(f"estimated_tokens={estimated_tokens!r}: expected an integer >= 0")
        if key.revoked if revoked is None else revoked:
            return QuotaDecision(False, f"key {key.name!r} is revoked")
        now = self._now()
        table = schema.requests
        recent = []   # (created_at, tokens), oldest first
        if key.rpm is not None or key.tpm is not None:
            recent = conn.execute(
                sa.select(table.c.created_at, counted_tokens())
                .where(table.c.key_id == key.id, table.c.created_at > now - WINDOW)
                .order_by(table.c.created_at)).all()
        requests = _window_limit("requests/min", key.rpm, [(t, 1) for t, _ in recent], 1, now)
        per_minute = _window_limit("tokens/min", key.tpm, recent, estimated_tokens, now)
        per_day = _Limit("tokens/day", None)
        if key.tokens_per_day is not None:
            day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
            used_today = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(counted_tokens()), 0))
                .where(table.c.key_id == key.id, table.c.created_at >= day_start)).scalar()
            per_day = _day_limit(key.tokens_per_day, int(used_today), estimated_tokens,
                                 (day_start + timedelta(days=1) - now).total_seconds())
        return _combine(requests, per_minute, per_day, key)


def _lock_key(conn: sa.Connection, key: KeyInfo) -> bool:
    """Makes the other processes' admissions for `key` wait until this transaction ends;
    returns whether the key is revoked, as the database has it now.

    PostgreSQL locks the key's row (SELECT ... FOR NO KEY UPDATE): admissions of this key
    queue behind each other, other keys' do not, and inserts that merely reference the key
    (batch billing's) take KEY SHARE and need not wait. The statements after the lock see
    the rows committed while it waited, at READ COMMITTED (schema.py sets it). SQLite has
    no row locks: the database's write lock is taken instead (schema.lock_for_writing).
    """
    schema.lock_for_writing(conn)
    row = conn.execute(sa.select(schema.keys.c.revoked).where(
        schema.keys.c.id == key.id).with_for_update(key_share=True)).first()
    if row is None:
        raise ValueError(f"key id={key.id}: not in the ledger")
    return bool(row.revoked)


@dataclass(slots=True)
class _Limit:
    name: str
    limit: int | None
    remaining: int = 0          # after this request, if it is admitted
    reset: float = 0.0          # seconds until the limit is back to full
    retry_after: float | None = None   # None: fits now; 0: never fits; > 0: seconds to wait
    reason: str = ""


def _window_limit(name: str, limit: int | None, recent: list, needed: int,
                  now: datetime) -> _Limit:
    if limit is None:
        return _Limit(name, None)
    used = sum(amount for _, amount in recent)
    result = _Limit(name, limit, remaining=max(0, limit - used - needed),
                    reset=WINDOW.total_seconds())
    if used + needed <= limit:
        return result
    result.reason = f"{name}: {used} used in the last 60 s + {needed} requested > limit {limit}"
    result.remaining = max(0, limit - used)
    if recent:   # empty: the request alone is over the limit
        result.reset = (recent[-1][0] + WINDOW - now).total_seconds()
    if needed > limit:
        result.retry_after = 0
        return result
    freed = 0
    for created_at, amount in recent:   # oldest first: when enough of the window has slid out
        freed += amount
        if used - freed + needed <= limit:
            result.retry_after = max(1.0, (created_at + WINDOW - now).total_seconds())
            break
    return result


def _day_limit(limit: int, used: int, needed: int, until_midnight: float) -> _Limit:
    result = _Limit("tokens/day", limit, remaining=max(0, limit - used - needed),
                    reset=until_midnight)
    if used + needed > limit:
        result.reason = f"tokens/day: {used} used today (UTC) + {needed} requested > limit {limit}"
        result.remaining = max(0, limit - used)
        result.retry_after = 0 if needed > limit else max(1.0, until_midnight)
    return result


def _combine(requests: _Limit, per_minute: _Limit, per_day: _Limit,
             key: KeyInfo) -> QuotaDecision:
    headers = {}
    if requests.limit is not None:
        headers.update({"x-ratelimit-limit-requests": str(requests.limit),
                        "x-ratelimit-remaining-requests": str(requests.remaining),
                        "x-ratelimit-reset-requests": format_duration(requests.reset)})
    tokens = per_minute if per_minute.limit is not None else per_day
    if tokens.limit is not None:
        headers.update({"x-ratelimit-limit-tokens": str(tokens.limit),
                        "x-ratelimit-remaining-tokens": str(tokens.remaining),
                        "x-ratelimit-reset-tokens": format_duration(tokens.reset)})
    exceeded = [limit for limit in (requests, per_minute, per_day) if limit.reason]
    if not exceeded:
        return QuotaDecision(True, headers=headers)
    waits = [limit.retry_after for limit in exceeded]
    retry_after = 0 if 0 in waits else math.ceil(max(waits))
    reason = f"rate limit for key {key.name!r}: " + "; ".join(l.reason for l in exceeded)
    if retry_after == 0:
        reason += " (the request alone exceeds the limit; waiting will not help)"
    return QuotaDecision(False, reason, retry_after, headers, too_large=retry_after == 0)
