"""What the engine hands back to users and the server (no JAX)."""

from __future__ import annotations

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


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request: the text and tokens generated so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
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
