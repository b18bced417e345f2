"""The server's life: 503 while warming and when overloaded, a clean SIGTERM (in-flight
streams end, every ledger row final), SIGINT and SIGTERM with a stream nobody reads (its row
final and aborted when the server is gone, billed what was sent), a kill -9 mid-stream
(after a restart every admitted request has exactly one row, interrupted), and one-line CLI
errors."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import requests

from tests.server.conftest import ROOT, auth
from tests.server.hostile import unread_stream

STREAM = {"model": "tiny-llama", "prompt": "Go on and on.", "max_tokens": 230,
          "ignore_eos": True, "stream": True}


def stream_in_background(server, key: str, count: int, body: dict = STREAM):
    """Starts `count` streaming requests; returns their shared state, filled as they run."""
    state = {"ids": {}, "chunks": {}, "last": {}, "errors": {}}

    def run(index: int) -> None:
        try:
            with requests.post(server.base_url + "/v1/completions", json=body,
                               headers=auth(key), stream=True, timeout=120) as response:
                state["ids"][index] = response.headers.get("X-Request-Id")
                for line in response.iter_lines():
                    if line:
                        state["chunks"][index] = state["chunks"].get(index, 0) + 1
                        state["last"][index] = line
        except requests.RequestException as error:
            state["errors"][index] = error

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    state["threads"] = threads
    return state


def key_rows(server, name: str) -> list[dict]:
    return server.rows("key_id = (SELECT id FROM keys WHERE name = ?)", (name,))


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_warming_overload_and_sigterm(new_server):
    server = new_server("--max-queue", "2", "--shutdown-timeout", "20").start(wait=False)
    seen = server.wait_healthy()
    assert 503 in seen and seen[-1] == 200, seen
    # Warmed up, the worker froze its heap (gunicorn_app.frozen_after), before serving.
    assert re.search(r"the engine's heap is frozen: \d{5,} objects", server.logs())
    name, key = server.create_key()
    running = stream_in_background(server, key, 2)
    wait_for(lambda: len(running["chunks"]) == 2, what="two streams")
    overloaded = requests.post(server.base_url + "/v1/completions", headers=auth(key),
                               json={**STREAM, "stream": False}, timeout=60)
    assert overloaded.status_code == 503 and overloaded.json()["error"]["code"] == "unavailable"
    assert len(key_rows(server, name)) == 2             # the refused request costs nothing
    server.proc.send_signal(signal.SIGTERM)
    for thread in running["threads"]:
        thread.join(60)
    assert not running["errors"]
    assert all(last == b"data: [DONE]" for last in running["last"].values())
    assert server.proc.wait(60) == 0
    rows = key_rows(server, name)
    assert len(rows) == 2 and {row["status"] for row in rows} <= {"completed", "aborted"}


def received_tokens(sock) -> int:
    """The tokens of the whole SSE events a socket holds, read to its end (logprobs: one
    entry per token)."""
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    tokens = 0
    for event in data.split(b"\n\n"):
        line = event.rpartition(b"data: ")[2]
        if line.startswith(b"{") and line.endswith(b"}"):
            tokens += sum(len(choice["logprobs"]["tokens"])
                          for choice in json.loads(line)["choices"])
    return tokens


def test_a_shutdown_bills_a_stream_nobody_reads_what_it_was_sent(new_server):
    # SIGINT (quick): the worker's close() finalized such a row "completed", billing every
    # token generated. SIGTERM: gunicorn waited the whole graceful timeout for the stuck
    # write and the arbiter killed the worker then, so the row stayed running. A short
    # shutdown timeout for both: the arbiter waits that long for the worker stuck writing.
    for sig in (signal.SIGINT, signal.SIGTERM):
        server = new_server("--send-buffer-bytes", "16384", "--shutdown-timeout", "6").start()
        name, key = server.create_key()
        sock = unread_stream(server, key, {**STREAM, "n": 8, "logprobs": 1})
        wait_for(lambda: key_rows(server, name), what="the stream's row")
        time.sleep(2)   # the engine runs on; the stream waits on its full buffers
        server.proc.send_signal(sig)
        server.proc.wait(60)
        rows = key_rows(server, name)   # with no restart: the worker finalized it
        received = received_tokens(sock)
        sock.close()
        assert len(rows) == 1 and rows[0]["status"] == "aborted", (sig, rows)
        assert rows[0]["completion_tokens"] <= received < 8 * STREAM["max_tokens"], (
            sig, rows[0]["completion_tokens"], received)


def test_kill_9_mid_stream_leaves_every_admitted_request_one_interrupted_row(new_server):
    server = new_server().start()
    name, key = server.create_key()
    streams = stream_in_background(server, key, 20)
    wait_for(lambda: len(key_rows(server, name)) == 20 and len(streams["chunks"]) >= 4,
             what="20 admitted requests")
    server.signal(signal.SIGKILL)                     # master and worker, no goodbye
    server.proc.wait(30)
    for thread in streams["threads"]:
        thread.join(30)
    assert any(row["status"] == "running" for row in key_rows(server, name))   # left open
    server.log.close()
    server.start()                                    # same ledger, a new process
    rows = key_rows(server, name)
    assert len(rows) == 20 and len({row["id"] for row in rows}) == 20
    interrupted = [row for row in rows if row["status"] == "interrupted"]
    assert interrupted and all(row["status"] in ("interrupted", "completed") for row in rows)
    started = {request_id for request_id in streams["ids"].values() if request_id}
    assert started <= {row["id"] for row in rows}
    response = requests.post(server.base_url + "/v1/completions", headers=auth(key),
                             json={**STREAM, "stream": False, "max_tokens": 4}, timeout=60)
    assert response.status_code == 200
    assert server.metric("ember_kv_page_usage_ratio") == 0
    assert len(key_rows(server, name)) == 21
    server.stop()
    assert all(row["status"] != "running" for row in key_rows(server, name))


# A child process: freezing the test runner's own heap would pin its garbage for good.
FROZEN_AFTER_CHECK = """
import gc, weakref
from engine.serving.gunicorn_app import frozen_after

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a

def build():
    global dead
    dead = weakref.ref(cycle())   # garbage left by building, unreachable at once
    engine = cycle()
    engine.parts = [cycle() for _ in range(1000)]
    return engine

gc.disable()   # no collection but frozen_after's own
engine = frozen_after(build)()
assert dead() is None, "garbage of the build was frozen instead of freed"
assert gc.get_freeze_count() > 2000, gc.get_freeze_count()
assert not any(o is engine or o is engine.parts for o in gc.get_objects())
later = weakref.ref(cycle())   # what comes after is still collected
gc.collect()
assert later() is None
print("ok")
"""


def test_frozen_after_frees_the_build_garbage_and_freezes_what_lives():
    result = subprocess.run([sys.executable, "-c", FROZEN_AFTER_CHECK], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_serve_rejects_bad_arguments_in_one_line(tmp_path):
    for args, expected in ((["--model", str(tmp_path / "missing")], "no such file"),
                           (["--model", str(tmp_path)], "config.json"),
                           (["--max-sequences-per-key", "0"], "--max-sequences-per-key=0"),
                           (["--db", "not a url"], "ledger url"),
                           (["--max-num-seqs", "0"], "max_num_seqs=0")):
        result = subprocess.run([sys.executable, "-m", "engine.cli", "serve", *args],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
