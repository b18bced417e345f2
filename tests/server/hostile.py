"""Helpers of the hostile suite (tests/server/test_hostile.py): the other tenant who watches
each attack, and slow clients."""

from __future__ import annotations

import json
import socket
import threading
import time

import requests

from tests.server.conftest import auth

VICTIM_TOKENS = 200
VICTIM_BODY = {"model": "tiny-llama", "prompt": "the other tenant", "max_tokens": VICTIM_TOKENS,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


class Victim:
    """Another tenant's streaming completion: started before an attack (it has its first
    chunk when start() returns), checked after it: every token arrived, the stream ended
    with [DONE], and its ledger row is completed and bills what was sent."""

    def __init__(self, server, key: str | None):
        self.server, self.key = server, key
        self.events: list[bytes] = []
        self.request_id: str | None = None
        self.error: Exception | None = None
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Victim:
        self._thread.start()
        assert self._first.wait(60), f"the victim's stream did not start: {self.error}"
        return self

    def _run(self) -> None:
        headers = auth(self.key) if self.key else {}
        try:
            with requests.post(self.server.base_url + "/v1/completions", json=VICTIM_BODY,
                               headers=headers, stream=True, timeout=120) as response:
                self.request_id = response.headers.get("X-Request-Id")
                for line in response.iter_lines():
                    if line:
                        self.events.append(line)
                        self._first.set()
        except requests.RequestException as error:
            self.error = error
        finally:
            self._first.set()

    def check(self) -> None:
        self._thread.join(120)
        assert not self._thread.is_alive() and self.error is None, self.error
        assert self.events and self.events[-1] == b"data: [DONE]", self.events[-3:]
        chunks = [json.loads(event[6:]) for event in self.events[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert chunks[-1]["usage"]["completion_tokens"] == VICTIM_TOKENS
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        row = self.server.row(self.request_id)
        assert row["status"] == "completed", row
        assert row["completion_tokens"] == VICTIM_TOKENS and text


def wait_idle(server, timeout: float = 30.0) -> None:
    """Until no KV page is held (every request finished; none leaked)."""
    deadline = time.monotonic() + timeout
    while server.metric("ember_kv_page_usage_ratio") != 0:
        assert time.monotonic() < deadline, "KV pages still held"
        time.sleep(0.05)


class SlowClients:
    """Connections that send a request a byte at a time and never finish it: half of them
    drip their head, half send a whole head and drip a body they never complete."""

    HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 4000\r\n")

    def __init__(self, port: int, count: int):
        self.sockets = []
        for index in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if index % 2:
                sock.sendall(self.HEAD + b"\r\n" + b'{"prompt": "')
            self.sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        position = 0
        while not self._stop.wait(0.1):
            for index, sock in enumerate(self.sockets):
                byte = self.HEAD[position % len(self.HEAD)] if index % 2 == 0 else ord("a")
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    pass   # dropped by the server: what the read timeout is for
            position += 1

    def stop(self) -> None:
        """Stops dripping (so that a closed connection is not reset by a late byte)."""
        self._stop.set()
        self._thread.join(5)

    def answers(self) -> list[bytes]:
        """What the server sent each connection before closing it."""
        self.stop()
        answers = []
        for sock in self.sockets:
            try:
                answers.append(sock.recv(4096))
            except OSError as error:
                answers.append(repr(error).encode())
            sock.close()
        return answers


def unread_stream(server, key: str, body: dict) -> socket.socket:
    """A streaming request whose client never reads (a 4 KB receive buffer, so the
    server's writes soon wait for it)."""
    payload = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(payload)}\r\n\r\n"
                 .encode() + payload)
    return sock
