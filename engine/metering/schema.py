"""The ledger's tables and how a database is opened (SQLAlchemy Core; no JAX).

Times are stored as naive UTC datetimes: SQLite keeps no zone, and one convention for every
backend keeps window and day comparisons plain.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from engine.config import default_cache_dir

SQLITE_BUSY_TIMEOUT_S = 30
RUNNING = "running"
FINAL_STATUSES = ("completed", "aborted", "error", "interrupted")
DEFAULT_PRICE_MODEL = "*"   # the prices row used by models without their own

metadata = sa.MetaData()

keys = sa.Table(
    "keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),         # shown in lists; not secret
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),   # SHA-256 hex
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("rpm", sa.Integer),
    sa.Column("tpm", sa.Integer),
    sa.Column("tokens_per_day", sa.Integer),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("revoked_at", sa.DateTime),
)

requests = sa.Table(
    "requests", metadata,
    sa.Column("id", sa.String(128), primary_key=True),           # the request id
    sa.Column("key_id", sa.Integer, sa.ForeignKey("keys.id"), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("instance", sa.String(128), nullable=False),       # the replica that admitted it
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cached_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("completion_tokens", sa.Integer, nullable=False, default=0),
    # Tokens the quota counts while the request runs: prompt + max_tokens at admission.
    sa.Column("reserved_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("cost", sa.Float, nullable=False, default=0.0),     # USD
    sa.Index("ix_requests_key_created", "key_id", "created_at"),
    sa.Index("ix_requests_status_instance", "status", "instance"),
)

# One row per live Ledger that admits requests (a server process): its lease, renewed by a
# heartbeat. A start-up marks interrupted only the running rows of instances that are gone.
instances = sa.Table(
    "instances", metadata,
    sa.Column("name", sa.String(128), primary_key=True),         # requests.instance
    sa.Column("host", sa.String(256), nullable=False),           # hostname + pid namespace
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("pid_start", sa.BigInteger),       # the process's start (clock ticks after boot)
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime, nullable=False),
)

prices = sa.Table(
    "prices", metadata,
    sa.Column("model", sa.String(256), primary_key=True),
    # USD per million tokens.
    sa.Column("input", sa.Float, nullable=False),
    sa.Column("cached_input", sa.Float, nullable=False),
    sa.Column("output", sa.Float, nullable=False),
)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def to_utc_naive(moment: datetime) -> datetime:
    """A datetime as the ledger stores it; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def default_url() -> str:
    home = default_cache_dir()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'ledger.db'}"


def open_database(url: str | None) -> sa.Engine:
    """An Engine (connection pool) on the ledger at `url`, its tables created if missing.

    Raises:
      ValueError: `url` is not a SQLAlchemy URL.
      OSError: the database cannot be opened (the message never shows a password).
    """
    url = url or default_url()
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ValueError(f"ledger url={url!r}: expected a SQLAlchemy URL such as "
                         "sqlite:///path/to/ledger.db or postgresql://host/db") from error
    shown = parsed.render_as_string(hide_password=True)
    options: dict = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        # Many server threads share the pool; the busy timeout queues writers behind each other.
        options["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        if parsed.database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool   # one in-memory database for every thread
    try:
        engine = sa.create_engine(parsed, **options)
    except ArgumentError as error:
        raise ValueError(f"ledger url={shown!r}: {error}") from error
    except ImportError as error:
        raise ValueError(f"ledger url={shown!r}: its database driver is not installed "
                         f"({error})") from error
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        # Also migrates a ledger of an earlier version: tables it lacks are created.
        metadata.create_all(engine)
    except SQLAlchemyError as error:
        engine.dispose()
        reason = getattr(error, "orig", None) or error
        raise OSError(f"cannot open the ledger at {shown}: {reason}") from error
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (auth, quota checks) run while a writer commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL survives a process crash (what the ledger must survive); only a power
    # loss can drop the newest commits. It cuts admit + finalize from ~5 ms to ~1 ms.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
