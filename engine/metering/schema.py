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
POSTGRES_POOL_SIZE = 8            # connections kept open per Ledger
POSTGRES_POOL_MAX = 32            # connections open at most per Ledger
POSTGRES_POOL_TIMEOUT_S = 30      # a thread waits this long for a free connection
POSTGRES_CONNECT_TIMEOUT_S = 10   # an unreachable server fails a call, not hangs it
RUNNING = "running"
FINAL_STATUSES = ("completed", "aborted", "error", "interrupted")
DEFAULT_PRICE_MODEL = "*"   # the prices row used by models without their own
_SCHEMA_LOCK_ID = 0x656D6265725F6462   # "ember_db": PostgreSQL's advisory lock on creating tables

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
    if parsed.drivername == "postgresql":
        # The `postgres` extra's driver, whichever SQLAlchemy's default (2.0: psycopg2).
        parsed = parsed.set(drivername="postgresql+psycopg")
    shown = parsed.render_as_string(hide_password=True)
    options: dict = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        # Many server threads share the pool; the busy timeout queues writers behind each other.
        options["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        if parsed.database in (None, "", ":memory:"):
            options["poolclass"] = StaticPool   # one in-memory database for every thread
    elif parsed.get_backend_name() == "postgresql":
        options.update(_postgres_options())
    try:
        engine = sa.create_engine(parsed, **options)
    except ArgumentError as error:
        raise ValueError(f"ledger url={shown!r}: {error}") from error
    except ImportError as error:
        extra = " (pip install 'ember[postgres]')" if parsed.get_backend_name() == (
            "postgresql") else ""
        raise ValueError(f"ledger url={shown!r}: its database driver is not installed "
                         f"({error}){extra}") from error
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        _create_tables(engine)
    except SQLAlchemyError as error:
        engine.dispose()
        reason = getattr(error, "orig", None) or error
        raise OSError(f"cannot open the ledger at {shown}: {reason}") from error
    return engine


def lock_for_writing(conn: sa.Connection) -> None:
    """On SQLite, takes the database's write lock now (BEGIN IMMEDIATE), so that what the
    transaction reads next no other process changes before it commits; other writers wait
    for it (the busy timeout), readers do not (WAL). Must be the transaction's first
    statement: the driver begins transactions only before a write, and then commits this
    one as its own. Other backends lock rows or take advisory locks instead: nothing here.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _create_tables(engine: sa.Engine) -> None:
    """Creates the tables missing (which migrates a ledger of an earlier version), one
    process at a time: replicas starting together on an empty database would otherwise
    both see a table missing and both create it (PostgreSQL: a duplicate key error)."""
    with engine.begin() as conn:
        lock_for_writing(conn)
        if conn.dialect.name == "postgresql":
            # DDL is transactional in PostgreSQL: a second process waits here, then finds
            # the tables the first committed.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
        metadata.create_all(conn)


def _postgres_options() -> dict:
    """Pool and session settings of a PostgreSQL ledger shared by replicas."""
    return {
        # try_admit's key-row lock relies on it: a statement run after the lock is granted
        # sees the rows committed by the transaction that held it. Fixed here so that a
        # server-wide default_transaction_isolation cannot turn waits into serialisation
        # errors.
        "isolation_level": "READ COMMITTED",
        # Each ledger call holds a connection for about a millisecond, so a few connections
        # serve the 64 HTTP threads, the progress writer and the lease heartbeat; a burst
        # opens up to POSTGRES_POOL_MAX and the rest wait their turn (pool_timeout), so N
        # replicas need at most N * POSTGRES_POOL_MAX of max_connections (100 by default).
        "pool_size": POSTGRES_POOL_SIZE,
        "max_overflow": POSTGRES_POOL_MAX - POSTGRES_POOL_SIZE,
        "pool_timeout": POSTGRES_POOL_TIMEOUT_S,
        "pool_recycle": 1800,   # before firewalls and poolers drop idle connections
        "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
    }


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # First, so that the journal-mode switch below also waits for processes opening the
    # same file at the same moment instead of failing with "database is locked".
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    # WAL lets readers (auth, quota checks) run while a writer commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL survives a process crash (what the ledger must survive); only a power
    # loss can drop the newest commits. It cuts admit + finalize from ~5 ms to ~1 ms.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
