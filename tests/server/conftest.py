"""Fixtures for the server tests: a real `ember serve` subprocess on a tiny model, its ledger,
and keys. One server is shared by the whole session (tests that kill or restart a server start
their own); its XLA compilation cache is shared too, so only the first start compiles."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.hf_models import build_hf_model
from tests.postgres import postgres  # noqa: F401 - a fixture (test_replicas.py)

ROOT = Path(__file__).resolve().parents[2]
ENGINE_ARGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--max-model-len", "256",
               "--num-pages", "256"]
MAX_MODEL_LEN = 256
VOCAB_SIZE = 320
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m engine.cli serve ...` in its own process group, on a free loopback port."""

    def __init__(self, model_dir: Path, home: Path, db_path: Path, *extra: str):
        self.model_dir, self.home, self.db_path, self.extra = model_dir, home, db_path, extra
        self.db_url = f"sqlite:///{db_path}"
        self.proc: subprocess.Popen | None = None
        self.log_path = home / f"server-{next(_names)}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ServerProcess:
        self.port = free_port()
        # EMBER_HOME is inherited: its XLA cache is shared with earlier runs (restarts are fast).
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "engine.cli", "serve", "--model", str(self.model_dir),
                   "--served-model-name", "tiny-llama", "--port", str(self.port),
                   "--db", self.db_url, *ENGINE_ARGS, *self.extra]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 180.0) -> list[int]:
        """Polls /health until 200; returns the status codes seen (None: no connection)."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                code = requests.get(self.base_url + "/health", timeout=5).status_code
            except requests.ConnectionError:
                code = None
            seen.append(code)
            if code == 200:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    # ------------------------------------------------------------------ ledger, read directly
    def rows(self, where: str = "1=1", params: tuple = ()) -> list[dict]:
        with sqlite3.connect(self.db_path, timeout=30) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(
                f"SELECT * FROM requests WHERE {where}", params)]

    def row(self, request_id: str) -> dict:
        (row,) = self.rows("id = ?", (request_id,))
        return row

    def create_key(self, name: str | None = None, **limits) -> tuple[str, str]:
        """A new key (name, plaintext) in the server's ledger."""
        from engine.metering import Ledger

        name = name or f"key-{next(_names)}-{os.getpid()}"
        with Ledger(self.db_url) as ledger:
            return name, ledger.create_key(name, **limits)[1]

    def metric(self, name: str) -> float:
        text = requests.get(self.base_url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory) -> Path:
    return build_hf_model("llama", tmp_path_factory.mktemp("server_model") / "tiny-llama")


@pytest.fixture(scope="session")
def ember_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ember_home")


@pytest.fixture(scope="session")
def new_server(server_model_dir, ember_home, tmp_path_factory):
    """Makes (unstarted) servers with their own ledger; stops them all at the end."""
    servers = []

    def make(*extra: str) -> ServerProcess:
        db = tmp_path_factory.mktemp("ledger") / "ledger.db"
        servers.append(ServerProcess(server_model_dir, ember_home, db, *extra))
        return servers[-1]

    yield make
    for server in servers:
        if server.proc is not None:
            server.stop()


@pytest.fixture(scope="session")
def server(new_server) -> ServerProcess:
    """The shared server (auth on, default limits)."""
    return new_server().start()


@pytest.fixture(scope="session")
def api_key(server) -> str:
    return server.create_key("shared")[1]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def openai_client(server: ServerProcess, key: str):
    import openai
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0,
                         timeout=120)


# ---------------------------------------------------------------- replicas on PostgreSQL
class ReplicaProcess(ServerProcess):
    """A server whose ledger is a PostgreSQL database that other replicas share."""

    def __init__(self, model_dir: Path, home: Path, db_url: str, *extra: str):
        super().__init__(model_dir, home, home / "unused.db", *extra)
        self.db_path, self.db_url = None, db_url

    def query(self, sql: str, params: tuple = ()) -> list[dict]:
        """Runs `sql` on the shared ledger; `?` placeholders, as rows() takes them."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.db_url.replace("+psycopg", ""), row_factory=dict_row) as db:
            return db.execute(sql.replace("?", "%s"), params).fetchall()

    def rows(self, where: str = "1=1", params: tuple = ()) -> list[dict]:
        return self.query(f"SELECT * FROM requests WHERE {where}", params)


@pytest.fixture(scope="session")
def new_replica(server_model_dir, ember_home, postgres):
    """Makes (unstarted) servers on a PostgreSQL ledger; stops them all at the end, before
    the PostgreSQL server."""
    replicas = []

    def make(db_url: str, *extra: str) -> ReplicaProcess:
        replicas.append(ReplicaProcess(server_model_dir, ember_home, db_url, *extra))
        return replicas[-1]

    yield make
    for replica in replicas:
        if replica.proc is not None:
            replica.stop()
