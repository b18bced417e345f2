"""SamplingParams: what a caller asks of one request's generation (no JAX)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from engine.structured.spec import StructuredOutput

MAX_TOP_LOGPROBS = 20
INT32_MAX = 2 ** 31 - 1
# Below this a positive temperature is raised to it, as vLLM does: logits / T would overflow
# float32 into inf, and the row's draw and logprob would come from NaN arithmetic.
MIN_TEMPERATURE = 1e-2


class InvalidParamError(ValueError):
    """A field out of its range: `name`, `value` and what was `expected`, also in the message."""

    def __init__(self, name: str, value: object, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"{name}={shown}: expected {expected}")
        self.name, self.value, self.expected = name, value, expected


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidParamError(name, value, expected)


@dataclass(slots=True, frozen=True)
class NumberRange:
    """The values a numeric field may take: within what the runner packs it into (int32 for
    integers, float32 for floats) and what its sampling step computes without inf or NaN.

    A float is checked as given and as float32 rounds it (against bounds rounded alike), so a
    bound that excludes `low` (low_open) also excludes numbers that round to it (1e-300 ->
    0.0 in float32), and a number that overflows float32 is out.
    """

    low: float
    high: float
    integer: bool = False
    low_open: bool = False

    def expected(self) -> str:
        if self.integer:
            return f"an integer in [{self.low}, {self.high}]"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def contains(self, value: object) -> bool:
        if self.integer:
            return is_int(value) and self.low <= value <= self.high
        if not is_number(value) or not math.isfinite(value):
            return False
        packed = to_float32(value)
        if packed is None:
            return False
        # As given, and as packed against the bounds packed the same way (0.01 packs below
        # 0.01, and stays within [0.01, ...] then).
        return all((low < v if self.low_open else low <= v) and v <= high for v, low, high in (
            (value, self.low, self.high),
            (packed, to_float32(self.low), to_float32(self.high))))

    def check(self, name: str, value: object) -> None:
        """Raises InvalidParamError naming the field unless `value` is in the range."""
        _check(self.contains(value), name, value, self.expected())


# The one definition of each numeric field's bounds: SamplingParams checks them, and the
# OpenAI parsing (engine/openai/api.py) reads its fields with them (OpenAI's narrower
# temperature range aside).
RANGES = {
    "n": NumberRange(1, INT32_MAX, integer=True),
    "max_tokens": NumberRange(0, INT32_MAX, integer=True),
    "min_tokens": NumberRange(0, INT32_MAX, integer=True),
    "temperature": NumberRange(0.0, 1e4),
    "top_k": NumberRange(-1, INT32_MAX, integer=True),                # i32 in the runner
    "top_p": NumberRange(0.0, 1.0, low_open=True),
    "min_p": NumberRange(0.0, 1.0),
    "presence_penalty": NumberRange(-2.0, 2.0),
    "frequency_penalty": NumberRange(-2.0, 2.0),
    "repetition_penalty": NumberRange(0.01, 100.0),                   # divides logits
    "seed": NumberRange(-2 ** 63, 2 ** 64 - 1, integer=True),         # OpenAI's int64 / u64
    "stop_token_ids": NumberRange(0, INT32_MAX, integer=True),
    "logprobs": NumberRange(0, MAX_TOP_LOGPROBS, integer=True),
    "prompt_logprobs": NumberRange(0, MAX_TOP_LOGPROBS, integer=True),
}


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to sample one request, with vLLM's names and defaults.

    Semantics (applied on device in this order): repetition / presence / frequency penalties
    on the logits; temperature (0 means greedy); top-k, top-p and min-p masks on the tempered
    distribution; a draw keyed by fold_in(PRNGKey(seed), output_position).

    Attributes:
      n: samples per prompt; they share the prompt's KV pages.
      max_tokens: most tokens to generate; None means up to the model's context length.
      temperature: 0 for greedy, else divides the logits (a positive value below
        MIN_TEMPERATURE is raised to it, as vLLM does).
      top_k: keep the k most likely tokens; 0 or -1 keeps all.
      top_p: keep the smallest set of tokens whose probability reaches top_p; 1 keeps all.
      min_p: drop tokens less likely than min_p times the most likely one; 0 keeps all.
      presence_penalty, frequency_penalty: OpenAI's additive penalties over generated tokens.
      repetition_penalty: multiplicative penalty (>1 discourages) over prompt and output tokens.
      seed: makes the draws reproducible whatever else shares the batch; every 64-bit value
        is its own (taken mod 2**64, so -1 and 2**64 - 1 are one seed).
      stop: strings that end generation; they are cut from the text.
      stop_token_ids: token ids that end generation (besides EOS unless ignore_eos).
      logprobs: number of top logprobs per output token (0 gives only the chosen token's).
      prompt_logprobs: number of top logprobs per prompt token (0 gives only the actual token's).
      structured_output: what the output must match (a JSON schema, a regex, a grammar, one
        of some strings; engine/structured); None leaves it free. The draw only ever picks
        a token the grammar allows, and a complete match allows only EOS.

    Each numeric field must lie in its RANGES entry (what the runner packs without overflow);
    a value outside raises InvalidParamError (a ValueError) naming the field.
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
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name, expected in (("stop", "a string or a list of strings"),
                               ("stop_token_ids", "a list of token ids")):
            value = getattr(self, name)
            _check(value is None or isinstance(value, (list, tuple)), name, value, expected)
            object.__setattr__(self, name, tuple(value or ()))
        for name, bounds in RANGES.items():
            value = getattr(self, name)
            if name == "stop_token_ids":
                for index, token in enumerate(value):
                    bounds.check(f"stop_token_ids[{index}]", token)
            elif value is not None or name not in _OPTIONAL:
                bounds.check(name, value)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParamError("min_tokens", self.min_tokens,
                                    f"at most max_tokens={self.max_tokens}")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        for index, stop in enumerate(self.stop):
            _check(isinstance(stop, str) and stop != "", f"stop[{index}]", stop,
                   "a non-empty string")
            check_unicode(f"stop[{index}]", stop)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name),
                   "True or False")
        _check(self.structured_output is None
               or isinstance(self.structured_output, StructuredOutput), "structured_output",
               self.structured_output, "a StructuredOutput or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


_OPTIONAL = ("max_tokens", "seed", "logprobs", "prompt_logprobs")   # None allowed


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON and Python both let True pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def to_float32(value: float) -> float | None:
    """`value` as the runner's float32 arrays hold it; None when it overflows float32."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return None


def check_unicode(name: str, text: str) -> None:
    """Raises InvalidParamError naming the field when `text` is not valid Unicode: a lone
    surrogate such as "\\ud800" (JSON's escapes can make one) cannot be encoded as UTF-8, so
    no tokenizer, template or response can carry it."""
    index = lone_surrogate_at(text)
    if index is not None:
        raise InvalidParamError(name, text, f"valid Unicode text: a lone surrogate "
                                f"{text[index]!r} at index {index}")


def lone_surrogate_at(text: str) -> int | None:
    """The index of the first lone surrogate in `text`; None when it is valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None
