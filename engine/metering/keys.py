"""API keys: shown once at creation, stored only as a SHA-256 hash (no JAX).

A key is "ember-" + 32 random bytes (url-safe base64), so a plain SHA-256 is enough: there is
nothing to brute-force, and the hash is an indexed lookup. The display prefix ("ember-" + 6
characters, 36 of the 256 bits) is not a secret. No function here logs or returns a stored key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from engine.metering import schema
from engine.sampling_params import is_int

KEY_PREFIX = "ember-"
DISPLAY_PREFIX_LEN = len(KEY_PREFIX) + 6
ANONYMOUS = "anonymous"   # the account --no-auth requests are billed to
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(slots=True, frozen=True)
class KeyInfo:
    """What the ledger knows about a key; never the key itself.

    Limits are None when unlimited: rpm (requests per minute), tpm (tokens per minute),
    tokens_per_day (per UTC day).
    """

    id: int
    name: str
    prefix: str
    admin: bool
    revoked: bool
    rpm: int | None
    tpm: int | None
    tokens_per_day: int | None
    created_at: datetime   # naive UTC


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _key_info(row) -> KeyInfo:
    return KeyInfo(id=row.id, name=row.name, prefix=row.prefix, admin=bool(row.admin),
                   revoked=bool(row.revoked), rpm=row.rpm, tpm=row.tpm,
                   tokens_per_day=row.tokens_per_day, created_at=row.created_at)


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"{name}={value!r}: expected an integer >= 1 or None (unlimited)")


class KeyStore:
    """Key methods of Ledger (which provides _db, _lock and _now)."""

    _db: sa.Engine

    def create_key(self, name: str, *, tokens_per_day: int | None = None, rpm: int | None = None,
                   tpm: int | None = None, admin: bool = False) -> tuple[KeyInfo, str]:
        """Creates a key.

        Args:
          name: unique, 1-64 of letters, digits, '.', '_', '-' (starting with a letter/digit).
          tokens_per_day, rpm, tpm: limits; None is unlimited.
          admin: may read every key's usage.

        Returns:
          (KeyInfo, the plaintext key): the only time the plaintext exists outside the caller.

        Raises:
          ValueError: a bad or taken name, or a bad limit.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"name={name!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if name == ANONYMOUS:
            raise ValueError(f"name={name!r}: reserved for unauthenticated (--no-auth) use")
        for limit_name, value in (("tokens_per_day", tokens_per_day), ("rpm", rpm), ("tpm", tpm)):
            _check_limit(limit_name, value)
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            info = self._insert_key(name, plaintext, admin=bool(admin), rpm=rpm, tpm=tpm,
                                    tokens_per_day=tokens_per_day)
        except IntegrityError as error:
            raise ValueError(f"name={name!r}: a key with this name already exists") from error
        return info, plaintext

    def _insert_key(self, name: str, plaintext: str, *, prefix: str | None = None,
                    **fields) -> KeyInfo:
        values = dict(name=name, prefix=prefix or plaintext[:DISPLAY_PREFIX_LEN],
                      key_hash=hash_key(plaintext), revoked=False, created_at=self._now(), **fields)
        with self._db.begin() as conn:
            key_id = conn.execute(schema.keys.insert().values(**values)).inserted_primary_key[0]
        values.pop("key_hash")
        return KeyInfo(id=key_id, **values)

    def authenticate(self, plaintext: str) -> KeyInfo | None:
        """The key's info (check .revoked: 403) or None for an unknown key (401)."""
        if not isinstance(plaintext, str) or not plaintext:
            return None
        digest = hash_key(plaintext)
        with self._db.connect() as conn:
            row = conn.execute(sa.select(schema.keys)
                               .where(schema.keys.c.key_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return _key_info(row)

    def get_key(self, name_or_id: str | int) -> KeyInfo | None:
        """A key by name, or by id (an int, or a string of digits no key is named)."""
        table = schema.keys
        with self._db.connect() as conn:
            if isinstance(name_or_id, str):
                row = conn.execute(sa.select(table).where(table.c.name == name_or_id)).first()
                if row is not None or not name_or_id.isdigit():
                    return None if row is None else _key_info(row)
                name_or_id = int(name_or_id)
            if not is_int(name_or_id):
                raise ValueError(f"name_or_id={name_or_id!r}: expected a key name or id")
            row = conn.execute(sa.select(table).where(table.c.id == name_or_id)).first()
        return None if row is None else _key_info(row)

    def list_keys(self) -> list[KeyInfo]:
        """Every key, the anonymous account included, oldest first."""
        with self._db.connect() as conn:
            rows = conn.execute(sa.select(schema.keys).order_by(schema.keys.c.id)).all()
        return [_key_info(row) for row in rows]

    def revoke_key(self, name_or_id: str | int) -> KeyInfo:
        """Revokes a key (idempotent); its usage stays in the ledger.

        Raises:
          ValueError: no such key, or the reserved anonymous key (--no-auth bills it).
        """
        info = self.get_key(name_or_id)
        if info is None:
            raise ValueError(f"key={name_or_id!r}: no such key")
        if info.name == ANONYMOUS:
            raise ValueError(f"key={name_or_id!r}: the reserved {ANONYMOUS!r} key cannot be "
                             "revoked (--no-auth requests are billed to it; stop serving "
                             "with --no-auth instead)")
        if not info.revoked:
            with self._db.begin() as conn:
                conn.execute(schema.keys.update().where(schema.keys.c.id == info.id)
                             .values(revoked=True, revoked_at=self._now()))
        return self.get_key(info.id)

    def anonymous_key(self) -> KeyInfo:
        """The account --no-auth requests are billed to: no quotas, created on first use.

        Its stored hash is of a random secret thrown away, so no key authenticates as it.
        Revoked by an earlier version (which allowed it), it is restored.
        """
        info = self.get_key(ANONYMOUS)
        if info is not None and info.revoked:
            with self._db.begin() as conn:
                conn.execute(schema.keys.update().where(schema.keys.c.id == info.id)
                             .values(revoked=False, revoked_at=None))
            info = self.get_key(info.id)
        if info is not None:
            return info
        try:
            return self._insert_key(ANONYMOUS, KEY_PREFIX + secrets.token_urlsafe(32), prefix="-",
                                    admin=False, rpm=None, tpm=None, tokens_per_day=None)
        except IntegrityError:   # another thread or replica created it first
            return self.get_key(ANONYMOUS)
