"""What the engine hands back to users and the server (no JAX)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class Logprob:
    """One token's log probability, its rank in the distribution (1 = most likely) and text."""

    logprob: float
    rank: int
    decoded_token: str


# Per position: {token_id: Logprob}; the chosen (or actual) token first, then the top ones.
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True, frozen=True)
class Usage:
    """Token counts as billed: cached prompt tokens are a part of prompt_tokens."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Prefix(Sequence):
    """The first `length` items of a list that only grows: a running request's token ids or
    logprobs, as one step's RequestOutput saw them, without a copy.

    The engine appends to those lists every step; a copy in every step's output would cost
    each streaming request O(length) a step, O(length^2) over a long generation. Reads past
    `length` (later tokens) are never seen: it reads as a list of what the step had.
    """

    __slots__ = ("_items", "_length")

    def __init__(self, items: list, length: int):
        self._items, self._length = items, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            return self._items[start:stop:step]     # a list: only the slice is copied
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a prefix of {self._length}")
        return self._items[index]

    def __iter__(self):
        return itertools.islice(self._items, self._length)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (list, tuple, Prefix)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request: the text and tokens generated so far.

    In a running request's output token_ids and logprobs are read-only Prefix views of the
    engine's lists (list-like: len, index, slice, iterate, ==); once the sample has finished
    they are plain lists.
    """

    index: int
    text: str = ""
    token_ids: list[int] | Prefix = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | Prefix | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" once finished
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's state after a step: the prompt, each sample's output, and usage.

    prompt_logprobs, when asked for, has one entry per prompt token; the first is None
    (nothing predicts the first token).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_token_ids),
                     completion_tokens=sum(len(o.token_ids) for o in self.outputs),
                     cached_tokens=self.num_cached_tokens)
