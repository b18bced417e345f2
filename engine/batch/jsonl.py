"""Batch files (no JAX): the input's lines, and the output file written exactly once.

The output is append-only JSONL under an exclusive lock. Every finished request becomes one
line, handed to the kernel with os.write as soon as the request ends (no user-space buffer),
so a killed process (kill -9 included) loses at most a line being written: a torn last line.
fsync (`sync`) only guards against power loss; it costs ~2.3 ms a call on this disk against
~1 us for a line's write, so the caller runs it once a second, not per line.

On open, `OutputFile` recovers a previous run: it drops a torn last line (no trailing newline,
or not valid JSON) by truncating the file to the last complete line, and lists the finished
lines, so the caller skips their custom_ids.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# The prefix of every line this module's writer produces (json.dumps with default separators,
# keys in this order). Matching it reads a line's custom_id without decoding the whole body;
# other lines are decoded in full.
_LINE_PREFIX = re.compile(rb'\{"id": "[^"\\]*", "custom_id": ("(?:[^"\\]|\\.)*"), '
                          rb'"response": \{"status_code": (\d+), "request_id": "([^"\\]*)"')


@dataclass(slots=True, frozen=True)
class FinishedLine:
    """A line of the output: whose it is, how it ended, and where it lies in the file."""

    custom_id: str
    status_code: int | None     # None when the line has no response (an error line)
    request_id: str | None
    offset: int
    length: int


def read_input_lines(path: str | Path) -> list[tuple[int, bytes]]:
    """(1-based line number, bytes) of every non-blank line of the input file."""
    with open(path, "rb") as file:
        return [(number, line.rstrip(b"\r\n")) for number, line in enumerate(file, 1)
                if line.strip()]


class OutputFile:
    """The output JSONL, locked against a second writer, recovered, then appended to.

    Raises (from the constructor):
      ValueError: another process holds the file, or a line before the last is not JSON
        (not a file this command wrote).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"{self.path}: another `ember batch` is writing this file") from None
        try:
            self.finished = self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    def _recover(self) -> list[FinishedLine]:
        finished: list[FinishedLine] = []
        offset, bad_line, bad_offset = 0, None, 0
        with open(self._fd, "rb", closefd=False) as file:
            for number, line in enumerate(file, 1):
                if bad_line is not None:   # a bad line followed by more lines: not ours
                    raise ValueError(f"{self.path}: line {bad_line} is not a JSON line: "
                                     "expected the output of `ember batch`")
                entry = _finished_line(line, offset) if line.endswith(b"\n") else None
                if entry is None:
                    bad_line, bad_offset = number, offset
                else:
                    finished.append(entry)
                offset += len(line)
        end = offset if bad_line is None else bad_offset
        # Lines are matched by their prefix only; the last one is decoded in full as well.
        if bad_line is None and finished and not _is_json(self._read(finished[-1])):
            end = finished.pop().offset
        if end < offset:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run",
                           self.path, offset - end)
        return finished

    def _read(self, entry: FinishedLine) -> bytes:
        return os.pread(self._fd, entry.length, entry.offset)

    def read_line(self, entry: FinishedLine) -> dict:
        """The decoded JSON of a finished line."""
        return json.loads(self._read(entry))

    def append(self, lines: list[bytes]) -> None:
        """Writes complete lines (each ending in a newline) at the end of the file: in the
        kernel's hands when this returns, so they survive the process being killed."""
        view = memoryview(b"".join(lines))
        while view:
            view = view[os.write(self._fd, view):]

    def sync(self) -> None:
        """fsync: the lines written so far survive a power loss too."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Syncs the file and releases the lock."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _finished_line(line: bytes, offset: int) -> FinishedLine | None:
    """The line's custom_id, status and request id; None if the line is not a JSON object
    with a string custom_id."""
    match = _LINE_PREFIX.match(line)
    if match is not None:
        try:
            custom_id = json.loads(match.group(1))
        except ValueError:
            return None
        return FinishedLine(custom_id, int(match.group(2)), match.group(3).decode(),
                            offset, len(line))
    try:
        decoded = json.loads(line)
    except ValueError:
        return None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("custom_id"), str):
        return None
    response = decoded.get("response") if isinstance(decoded.get("response"), dict) else {}
    status = response.get("status_code")
    return FinishedLine(decoded["custom_id"], status if isinstance(status, int) else None,
                        response.get("request_id"), offset, len(line))


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
