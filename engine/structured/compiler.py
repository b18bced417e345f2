"""GrammarCompiler: StructuredOutput -> per-sequence Matchers for one tokenizer (no JAX).

Built on llguidance (the choice and its numbers: docs/structured_output.md). Compiling a
grammar for the vocabulary is sub-millisecond and the lexer states are built lazily as
masks are asked for; a compiled grammar is kept in an LRU cache keyed by the constraint's
(kind, text), and every sequence gets a deep copy of it, which shares the lexer states that
earlier sequences built (a copy costs microseconds).

One compiler per (tokenizer, vocab_size): `compiler_for` keeps them, so the server's HTTP
threads (validating requests) and the engine thread (making matchers) share the cache.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.structured.bitmask import bitmask_width
from engine.structured.matcher import Matcher, fill_bitmasks
from engine.structured.spec import StructuredOutput, StructuredOutputError, library_message

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

DEFAULT_CACHE_SIZE = 256


class CompiledGrammar:
    """A grammar compiled for one vocabulary; `matcher()` starts a sequence on it."""

    __slots__ = ("spec", "_pristine", "_width", "_eos_token_ids", "_lock")

    def __init__(self, spec: StructuredOutput, pristine: Any, width: int,
                 eos_token_ids: frozenset[int]):
        self.spec = spec
        self._pristine = pristine    # an llguidance.LLMatcher that never consumes a token
        self._width = width
        self._eos_token_ids = eos_token_ids
        self._lock = threading.Lock()

    def matcher(self) -> Matcher:
        with self._lock:   # copied from any thread; the copy belongs to its caller
            return Matcher(self._pristine.deep_copy(), self._width, self._eos_token_ids)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and one model vocabulary.

    Args:
      tokenizer_json: the `tokenizers.Tokenizer` serialized (its to_str()).
      vocab_size: the model's vocabulary (its logits' width), at least the tokenizer's; ids
        the tokenizer does not know are never allowed.
      eos_token_ids: the ids that end a sequence; a finished grammar allows only these.
      cache_size: compiled grammars kept, least recently used dropped first.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Iterable[int], *,
                 cache_size: int = DEFAULT_CACHE_SIZE):
        import llguidance   # here, not at import: see engine/structured/spec.py
        if cache_size < 1:
            raise ValueError(f"cache_size={cache_size}: expected >= 1")
        eos = sorted(int(t) for t in eos_token_ids) or None   # None: llguidance's guess
        self._llguidance = llguidance
        try:
            self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                     eos_token=eos)
        except Exception as error:  # noqa: BLE001 - e.g. a model vocabulary below the tokenizer's
            raise ValueError(f"vocab_size={vocab_size}: llguidance cannot read this tokenizer "
                             f"for it: {error}") from None
        self.vocab_size = vocab_size
        self.bitmask_width = bitmask_width(vocab_size)
        self.eos_token_ids = frozenset(self._tokenizer.eos_tokens)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int, **kwargs) -> GrammarCompiler:
        """A compiler for Ember's Tokenizer (its backend and EOS ids)."""
        return cls(tokenizer.backend.to_str(), vocab_size, tokenizer.eos_token_ids, **kwargs)

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache when it was compiled before.

        Raises:
          StructuredOutputError: the grammar does not hold for this vocabulary (e.g. it
            names a special token the tokenizer lacks), with the library's message.
        """
        key = (spec.kind, spec.text)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        # Compiled outside the lock: llguidance drops the GIL while it builds a grammar.
        pristine = self._llguidance.LLMatcher(self._tokenizer, spec.grammar, log_level=0)
        if pristine.is_error():
            raise StructuredOutputError(spec.kind, spec.text,
                                        library_message(pristine.get_error()))
        compiled = CompiledGrammar(spec, pristine, self.bitmask_width, self.eos_token_ids)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> Matcher:
        """A new matcher at the start of `spec`'s grammar (compiled or from the cache)."""
        return self.compile(spec).matcher()

    def fill_bitmasks(self, rows: Sequence[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        """Fills `bitmask[row]` from each (matcher, row) at once, on the host's cores: one
        call per step for every constrained sequence (llguidance's LLExecutor, without the
        GIL). Rows not named are left as they are.

        Args:
          rows: (matcher, row index) pairs, each row at most once.
          bitmask: u32[S, ceil(V/32)], C-contiguous; S above every row index.
        """
        if (bitmask.dtype != np.uint32 or bitmask.ndim != 2
                or bitmask.shape[1] != self.bitmask_width or not bitmask.flags.c_contiguous):
            raise ValueError(f"bitmask: {bitmask.dtype}{list(bitmask.shape)}: expected a "
                             f"contiguous uint32[S, {self.bitmask_width}]")
        fill_bitmasks(rows, bitmask)

    @property
    def num_cached(self) -> int:
        return len(self._cache)


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> GrammarCompiler:
    """The one GrammarCompiler of (tokenizer, vocab_size), built on first use (about 0.3 s
    for a 49k vocabulary: llguidance reads every token's bytes) and dropped with the
    tokenizer."""
    with _compilers_lock:
        by_size = _compilers.setdefault(tokenizer, {})
        if vocab_size not in by_size:
            by_size[vocab_size] = GrammarCompiler.from_tokenizer(tokenizer, vocab_size)
        return by_size[vocab_size]
