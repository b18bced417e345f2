"""Billing that survives kill -9: each interrupted row holds the prompt's tokens and, within
generation.UNRECORDED_TOKENS_PER_CHOICE, the completion tokens its client received; a second
server on the same ledger never marks a live server's rows; an aborted stream is billed for
what was sent, not generated.

Clients read raw sockets, so every byte that arrived before the kill is counted; tokens are
counted from each chunk's logprobs (one entry per token), not from the text."""

import json
import re
import signal
import socket
import sqlite3
import threading
import time

import requests

from engine.serving.generation import UNRECORDED_TOKENS_PER_CHOICE
from tests.server.conftest import MAX_MODEL_LEN, ServerProcess, auth

BODY = {"model": "tiny-llama", "prompt": "Count the ways, and then count them again.",
        "max_tokens": 200, "ignore_eos": True, "stream": True, "logprobs": 0}
_EVENT = re.compile(rb"data: (\{.*?\})\n\n")


class RawStream:
    """One streaming completion over a plain socket, read until the server goes away."""

    def __init__(self, server: ServerProcess, key: str, body: dict = BODY):
        payload = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
        self.sock.sendall(b"POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\n"
                          + f"Authorization: Bearer {key}\r\n".encode()
                          + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        self.received = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
        except OSError:
            pass
        finally:
            self.sock.close()

    @property
    def request_id(self) -> str | None:
        found = re.search(rb"X-Request-Id: (\S+)", self.received, re.IGNORECASE)
        return found and found.group(1).decode()

    @property
    def tokens(self) -> int:
        """Completion tokens received in whole events (one logprobs entry per token)."""
        return sum(len(choice["logprobs"]["tokens"])
                   for event in _EVENT.findall(self.received)
                   for choice in json.loads(event).get("choices", ()) if choice["logprobs"])

    @property
    def events(self) -> int:
        """Events received: a cheap lower bound on tokens, for polling."""
        return self.received.count(b"data: ")

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.received


def _prompt_tokens(server: ServerProcess, key: str) -> int:
    response = requests.post(server.base_url + "/tokenize", headers=auth(key), timeout=60,
                             json={"model": "tiny-llama", "prompt": BODY["prompt"]})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def _wait_for(condition, what: str, timeout: float = 60.0, streams=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: " + "; ".join(
            stream.received[:300].decode(errors="replace") for stream in streams)
        time.sleep(0.01)


def _same_ledger(server: ServerProcess) -> ServerProcess:
    return ServerProcess(server.model_dir, server.home, server.db_path, *server.extra)


def _kill_9(server: ServerProcess) -> None:
    server.signal(signal.SIGKILL)
    server.proc.wait(30)
    server.log.close()


def test_kill_9_bills_each_interrupted_stream_within_the_bound_of_what_it_received(new_server):
    # Streams of ~450 tokens: with decode rungs from 1 the tiny model streams fast enough
    # that ~200-token streams often finished before the last kill.
    server = new_server("--max-model-len", "512").start()
    name, key = server.create_key()
    prompt_tokens = _prompt_tokens(server, server.create_key()[1])
    body = {**BODY, "max_tokens": 512 - prompt_tokens}   # as long as they can be
    checked, seen = 0, set()
    # The moments are events into the streams, not seconds: on CPU the tiny model streams
    # ~600 tokens/s each, so ~200 tokens take well under a second (a loaded machine merges
    # tokens into fewer events, and may finish streams before the last moment).
    for moment in (2, 40, 100):
        streams = [RawStream(server, key, body) for _ in range(8)]
        _wait_for(lambda: max(stream.events for stream in streams) >= moment
                  or all(stream.done for stream in streams), "tokens", streams=streams)
        _kill_9(server)
        for stream in streams:
            stream.thread.join(30)
        server.start()                # the same ledger: its start-up marks the dead rows
        rows = {row["id"]: row for row in server.rows(
            "key_id = (SELECT id FROM keys WHERE name = ?)", (name,)) if row["id"] not in seen}
        seen.update(rows)
        assert {row["status"] for row in rows.values()} <= {"completed", "interrupted"}
        assert {row["prompt_tokens"] for row in rows.values()} == {prompt_tokens}
        by_id = {stream.request_id: stream for stream in streams}
        for request_id, row in rows.items():
            if request_id not in by_id:   # admitted, its response not begun: nothing sent
                assert row["completion_tokens"] == 0 and row["status"] == "interrupted"
                continue
            stream = by_id[request_id]
            received = stream.tokens
            if stream.done:           # finished before the kill
                assert (row["status"], row["completion_tokens"]) == ("completed", received)
                continue
            checked += received > 0
            assert row["status"] == "interrupted", row
            assert received - UNRECORDED_TOKENS_PER_CHOICE <= row["completion_tokens"] <= (
                received), (moment, received, row)
    assert checked >= 8, "too few streams were cut by the kill to test the bound"
    server.stop()


def _instances(server: ServerProcess) -> set[str]:
    with sqlite3.connect(server.db_path, timeout=30) as db:
        return {name for (name,) in db.execute("SELECT name FROM instances")}


def _start_while_paused(starting: ServerProcess, paused: ServerProcess) -> None:
    """Starts `starting` while `paused` is stopped mid-stream (alive, its rows running, its
    lease fresh): `starting` marks interrupted at start-up only the rows of servers gone."""
    before = _instances(paused)
    paused.signal(signal.SIGSTOP)
    try:
        starting.start(wait=False)
        deadline, nudge_at = time.monotonic() + 60, time.monotonic() + 5
        while not _instances(paused) - before:
            assert time.monotonic() < deadline, "timed out waiting for the new server's row"
            if time.monotonic() > nudge_at:
                # Stopped inside a write (its progress writer commits every 10 ms), the paused
                # server holds SQLite's write lock: let it finish that write, stop it again.
                paused.signal(signal.SIGCONT)
                time.sleep(0.02)
                paused.signal(signal.SIGSTOP)
                nudge_at = time.monotonic() + 1
            time.sleep(0.01)
        time.sleep(0.5)   # its start-up sweep runs right after it registers
    finally:
        paused.signal(signal.SIGCONT)
    starting.wait_healthy()


def test_a_second_server_on_the_same_ledger_spares_the_live_one_rows(new_server):
    first = new_server().start()
    _, key = first.create_key()
    body = {**BODY, "max_tokens": MAX_MODEL_LEN - 64}
    second = _same_ledger(first)
    try:
        running = [RawStream(first, key, body) for _ in range(3)]
        _wait_for(lambda: all(stream.events > 2 for stream in running), "first tokens")
        _start_while_paused(second, first)
        doomed = [RawStream(second, key, body) for _ in range(3)]
        _wait_for(lambda: all(stream.events > 2 for stream in doomed), "first tokens")
        _kill_9(second)
        still = [RawStream(first, key, body) for _ in range(2)]
        _wait_for(lambda: all(stream.events > 2 for stream in still), "first tokens")
        _start_while_paused(second, first)                 # a restart of the killed one
        for stream in doomed:
            assert second.row(stream.request_id)["status"] == "interrupted"
        for stream in running + still:
            stream.thread.join(120)
            row = first.row(stream.request_id)
            assert stream.done and stream.tokens == body["max_tokens"]
            assert (row["status"], row["completion_tokens"]) == ("completed", stream.tokens)
    finally:
        second.stop()
    first.stop()


def test_a_client_that_leaves_is_billed_exactly_the_tokens_sent(new_server):
    # The server looks at a stream's socket every 0.1 s, and a tiny model decodes a token in
    # well under a millisecond: streams of 4 choices of 448 tokens outlast a look.
    server = new_server("--max-model-len", "512").start()
    _, key = server.create_key()
    aborted = 0
    for _ in range(3):
        stream = RawStream(server, key, {**BODY, "max_tokens": 512 - 64, "n": 4})
        _wait_for(lambda: stream.events >= 3, "3 events")
        # The client says it is leaving (FIN) but reads on: it gets every byte the server
        # wrote, and the server aborts at its next look at the socket (a loaded machine may
        # finish the stream first).
        stream.sock.shutdown(socket.SHUT_WR)
        stream.thread.join(30)
        row = server.row(stream.request_id)
        assert row["status"] == ("completed" if stream.done else "aborted"), row
        assert row["completion_tokens"] == stream.tokens
        aborted += row["status"] == "aborted"
    assert aborted, "every stream finished before the server noticed its client leave"
    server.stop()
