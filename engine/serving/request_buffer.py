"""RequestBuffer: one HTTP/1.1 request's bytes as they arrive, until they make a whole request.

`ember serve`'s worker (engine/serving/gunicorn_app.py: EmberWorker) reads each connection
without blocking into one of these and hands the connection to an HTTP thread only once it
holds a whole request: a head, and a body of its Content-Length. So a client that sends its
request byte by byte, or a head and part of a body (slowloris), holds no thread while it does;
it holds a socket and at most HEAD_LIMIT + body_limit bytes, until its read timeout.

A body larger than body_limit is read to its end (up to drain_limit) and thrown away as it
arrives, so that its client can be told why (400) instead of seeing its connection reset.

Only what decides completeness is parsed here; the request itself is parsed (and validated)
by gunicorn from the same bytes. No JAX, no web framework.
"""

from __future__ import annotations

HEAD_LIMIT = 64 * 1024   # a head that has not ended by here is refused (431)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
WAIT, READY = "wait", "ready"
HEAD_TOO_LARGE, BODY_TOO_LARGE = "head_too_large", "body_too_large"


class RequestBuffer:
    """The bytes of one request received so far (and whatever a client pipelined after it).

    Args:
      started: when the request's first byte was awaited (time.monotonic()); the read
        timeout counts from here.
      body_limit: the largest body kept; a larger one is thrown away as it arrives.
      drain_limit: a body declared larger than this is not even waited for.
      data: bytes already received (a kept-alive connection's read-ahead).
    """

    def __init__(self, started: float, body_limit: int, drain_limit: int, data: bytes = b""):
        self.started, self.body_limit, self.drain_limit = started, body_limit, drain_limit
        self.data = bytearray()
        self.continue_sent = False
        self._head_end: int | None = None      # offset of the blank line, once received
        self._length: int | None = None        # the body's Content-Length (None: not known)
        self._discarded: int | None = None     # body bytes thrown away (None: kept)
        self._scanned = 0                      # the head's end is not before this offset
        self.feed(data)

    @property
    def held(self) -> int:
        return len(self.data)

    def feed(self, chunk: bytes) -> None:
        """Adds received bytes (keeping at most the head of a body that is too large)."""
        if self._discarded is not None:
            self._discarded += len(chunk)
            return
        self.data += chunk
        if self._head_end is None:
            self._find_head()
        if self._head_end is not None and self._length is not None \
                and self._length > self.body_limit:
            body_start = self._head_end + 4
            self._discarded = len(self.data) - body_start
            del self.data[body_start:]

    def state(self) -> str:
        """READY: a whole head, with the whole body when its Content-Length is known (a
        chunked or malformed one is for gunicorn and the app to refuse unread); WAIT: more
        bytes are needed; HEAD_TOO_LARGE: no end of head within HEAD_LIMIT bytes;
        BODY_TOO_LARGE: a body over body_limit, received (and thrown away), over
        drain_limit, or not sent yet because the client awaits `100 Continue`."""
        if self._head_end is None:
            return HEAD_TOO_LARGE if len(self.data) > HEAD_LIMIT else WAIT
        if self._length is None:
            return READY
        if self._discarded is not None:   # refused at once when the client awaits our word
            done = (self._discarded >= self._length or self._length > self.drain_limit
                    or self.wants_continue())
            return BODY_TOO_LARGE if done else WAIT
        return READY if len(self.data) >= self._head_end + 4 + self._length else WAIT

    def wants_continue(self) -> bool:
        """The head asks for `100 Continue` before the client sends its body."""
        return (self._head_end is not None and not self.continue_sent
                and self._header(b"expect") == b"100-continue")

    def drop_expect(self) -> None:
        """Removes the Expect header once this side has answered it (gunicorn, which would
        answer it again when the request reaches the app, then does not)."""
        lines = bytes(self.data[:self._head_end]).split(b"\r\n")
        kept = [line for line in lines
                if line.partition(b":")[0].strip().lower() != b"expect"]
        self.data[:self._head_end] = b"\r\n".join(kept)
        self._head_end -= sum(len(line) + 2 for line in lines) - sum(
            len(line) + 2 for line in kept)
        self.continue_sent = True

    def _find_head(self) -> None:
        # Empty lines before a request line are allowed (RFC 9112, section 2.2). Each search
        # starts where the last one stopped: a client sending a byte at a time costs little.
        start = self._scanned or len(self.data) - len(self.data.lstrip(b"\r\n"))
        end = self.data.find(b"\r\n\r\n", start)
        if end < 0:
            self._scanned = max(start, len(self.data) - 3)
            return
        self._head_end = end
        if self._header(b"transfer-encoding") is None:
            value = self._header(b"content-length")
            if value is None:
                self._length = 0
            elif value.isdigit() and len(value) <= 18:   # else gunicorn refuses it
                self._length = int(value)

    def _header(self, name: bytes) -> bytes | None:
        """The value of header `name` (lower case), None when absent; the first one wins
        (gunicorn refuses a request that repeats Content-Length)."""
        for line in bytes(self.data[:self._head_end]).split(b"\r\n")[1:]:
            field, colon, value = line.partition(b":")
            if colon and field.strip().lower() == name:
                return value.strip().lower()
        return None
