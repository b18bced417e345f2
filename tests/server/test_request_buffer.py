"""RequestBuffer decides when the bytes of a connection make a whole request (no server)."""

import pytest

from engine.serving.request_buffer import (BODY_TOO_LARGE, HEAD_LIMIT, HEAD_TOO_LARGE, READY, WAIT,
                                           RequestBuffer)

BODY_LIMIT, DRAIN_LIMIT = 100, 1000
POST = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"

# (case id, the bytes as they arrive (one element per recv), the state after each)
CASES = [
    ("get-in-one", [b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"], [READY]),
    ("head-split", [b"GET /health HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"], [WAIT, WAIT, READY]),
    ("blank-lines-first", [b"\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"], [WAIT, READY]),
    ("body-in-parts", [POST % 5, b"ab", b"cde"], [WAIT, WAIT, READY]),
    ("pipelined", [POST % 2 + b"hiGET / HTTP/1.1\r\n"], [READY]),
    ("body-over-limit-drained", [POST % 500, b"x" * 499, b"x"], [WAIT, WAIT, BODY_TOO_LARGE]),
    ("body-over-drain-limit", [POST % 5000], [BODY_TOO_LARGE]),
    ("chunked-is-the-apps", [b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"],
     [READY]),
    ("bad-length-is-gunicorns", [b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n"], [READY]),
    ("body-over-limit-awaiting-continue",
     [b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n"],
     [BODY_TOO_LARGE]),
    ("endless-head", [b"GET / HTTP/1.1\r\nX: " + b"a" * HEAD_LIMIT], [HEAD_TOO_LARGE]),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_state_after_each_chunk(case):
    _, chunks, states = case
    buffer = RequestBuffer(0.0, BODY_LIMIT, DRAIN_LIMIT)
    seen = []
    for chunk in chunks:
        buffer.feed(chunk)
        seen.append(buffer.state())
    assert seen == states


def test_byte_by_byte_head_waits_until_its_last_byte():
    request = POST % 3 + b"abc"
    buffer = RequestBuffer(0.0, BODY_LIMIT, DRAIN_LIMIT)
    for index, byte in enumerate(request):
        assert buffer.state() == WAIT, index
        buffer.feed(bytes([byte]))
    assert buffer.state() == READY and bytes(buffer.data) == request


def test_a_body_over_the_limit_is_thrown_away_as_it_arrives():
    buffer = RequestBuffer(0.0, BODY_LIMIT, DRAIN_LIMIT, POST % 900)
    for _ in range(8):
        buffer.feed(b"y" * 100)
    assert buffer.state() == WAIT and buffer.held == len(POST % 900)
    buffer.feed(b"y" * 100)
    assert buffer.state() == BODY_TOO_LARGE


def test_expect_continue_is_answered_once_and_removed_from_the_head():
    head = (b"POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 4\r\n\r\n")
    buffer = RequestBuffer(0.0, BODY_LIMIT, DRAIN_LIMIT, head)
    assert buffer.state() == WAIT and buffer.wants_continue()
    buffer.drop_expect()
    assert not buffer.wants_continue()
    buffer.feed(b"{}  ")
    assert buffer.state() == READY
    assert bytes(buffer.data) == (b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 4"
                                  b"\r\n\r\n{}  ")
