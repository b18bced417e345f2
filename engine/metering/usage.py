"""Usage reports from the ledger, and who may read them (no JAX)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from engine.metering import schema
from engine.metering.keys import KeyInfo

GROUP_BY = (None, "model", "day", "key")


@dataclass(slots=True, frozen=True)
class UsageRow:
    """Totals over the requests admitted in a period, for one group.

    group is None when ungrouped, else the model name, the UTC day ("YYYY-MM-DD") or the key
    name. Running requests count what they have recorded so far and cost 0 until final.
    """

    group: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float   # USD


class UsageReport:
    """Usage methods of Ledger (which provides _db and get_key)."""

    _db: sa.Engine

    def usage(self, key_id: int | None = None, start: datetime | None = None,
              end: datetime | None = None, group_by: str | None = None) -> list[UsageRow]:
        """Usage of one key (or all keys when key_id is None), no permission check.

        Args:
          start, end: admission time bounds, start inclusive, end exclusive; naive is UTC.
          group_by: None, "model", "day" (UTC) or "key".

        Returns:
          One row per group, sorted by group; ungrouped, exactly one row (zeros if no requests).
        """
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by={group_by!r}: expected one of {GROUP_BY}")
        table = schema.requests
        group = {None: sa.literal(None),
                 "model": table.c.model,
                 "day": sa.func.date(table.c.created_at),   # SQLite, PostgreSQL and MySQL agree
                 "key": schema.keys.c.name}[group_by].label("group")
        query = (sa.select(
            group,
            sa.func.count().label("requests"),
            *(sa.func.coalesce(sa.func.sum(table.c[name]), 0).label(name)
              for name in ("prompt_tokens", "cached_tokens", "completion_tokens")),
            sa.func.coalesce(sa.func.sum(table.c.cost), 0.0).label("cost"))
            .select_from(table.join(schema.keys, table.c.key_id == schema.keys.c.id)))
        if key_id is not None:
            query = query.where(table.c.key_id == key_id)
        if start is not None:
            query = query.where(table.c.created_at >= schema.to_utc_naive(start))
        if end is not None:
            query = query.where(table.c.created_at < schema.to_utc_naive(end))
        if group_by is not None:
            query = query.group_by(group).order_by(group)
        with self._db.connect() as conn:
            rows = conn.execute(query).all()
        return [UsageRow(group=None if row.group is None else str(row.group),
                         requests=row.requests, prompt_tokens=int(row.prompt_tokens),
                         cached_tokens=int(row.cached_tokens),
                         completion_tokens=int(row.completion_tokens),
                         total_tokens=int(row.prompt_tokens) + int(row.completion_tokens),
                         cost=float(row.cost))
                for row in rows]

    def usage_for(self, caller: KeyInfo, key_name: str | None = None,
                  start: datetime | None = None, end: datetime | None = None,
                  group_by: str | None = None) -> list[UsageRow]:
        """usage() as `caller` may see it: a non-admin key only ever sees its own.

        Args:
          caller: the authenticated key asking.
          key_name: whose usage; None is the caller's own, or every key's for an admin.

        Raises:
          PermissionError: a non-admin caller asks for another key, or the caller is revoked.
          ValueError: no key named key_name (admins only: others get PermissionError first).
        """
        if caller.revoked:
            raise PermissionError(f"key {caller.name!r} is revoked")
        if not caller.admin:
            if key_name is not None and key_name != caller.name:
                raise PermissionError(f"key {caller.name!r} may only read its own usage")
            return self.usage(caller.id, start, end, group_by)
        if key_name is None:
            return self.usage(None, start, end, group_by)
        target = self.get_key(key_name)
        if target is None:
            raise ValueError(f"key={key_name!r}: no such key")
        return self.usage(target.id, start, end, group_by)
