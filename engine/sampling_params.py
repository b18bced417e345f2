"""SamplingParams: what a caller asks of one request's generation (no JAX)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {expected}")


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to sample one request, with vLLM's names and defaults.

    Semantics (applied on device in this order): repetition / presence / frequency penalties
    on the logits; temperature (0 means greedy); top-k, top-p and min-p masks on the tempered
    distribution; a draw keyed by fold_in(PRNGKey(seed), output_position).

    Attributes:
      n: samples per prompt; they share the prompt's KV pages.
      max_tokens: most tokens to generate; None means up to the model's context length.
      temperature: 0 for greedy, else divides the logits.
      top_k: keep the k most likely tokens; 0 or -1 keeps all.
      top_p: keep the smallest set of tokens whose probability reaches top_p; 1 keeps all.
      min_p: drop tokens less likely than min_p times the most likely one; 0 keeps all.
      presence_penalty, frequency_penalty: OpenAI's additive penalties over generated tokens.
      repetition_penalty: multiplicative penalty (>1 discourages) over prompt and output tokens.
      seed: makes the draws reproducible whatever else shares the batch.
      stop: strings that end generation; they are cut from the text.
      stop_token_ids: token ids that end generation (besides EOS unless ignore_eos).
      logprobs: number of top logprobs per output token (0 gives only the chosen token's).
      prompt_logprobs: number of top logprobs per prompt token (0 gives only the actual token's).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 0),
               "max_tokens", self.max_tokens, "an integer >= 0 or None")
        _check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
               "an integer >= 0")
        _check(_is_num(self.temperature) and 0.0 <= self.temperature, "temperature",
               self.temperature, "a number >= 0")
        _check(is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k,
               "an integer >= 1, or 0 / -1 to disable")
        _check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p,
               "a number in (0, 1]")
        _check(_is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", self.min_p,
               "a number in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2.0 <= value <= 2.0, name, value, "a number in [-2, 2]")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a number > 0")
        _check(self.seed is None or is_int(self.seed), "seed", self.seed, "an integer or None")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "non-empty strings")
        _check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS), name,
                   value, f"an integer in [0, {MAX_TOP_LOGPROBS}] or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON and Python both let True pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
