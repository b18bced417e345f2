"""IncrementalDetokenizer: turns a stream of generated token ids into final text pieces (no JAX).

Decoding a token alone is wrong in two ways: sentencepiece-style decoders strip the leading space
of the first token of a text ("▁world" alone is "world"), and one character may be split over
several tokens (byte fallback, byte-level BPE). So each step decodes a short window: the tokens of
the last emitted piece (`prefix_offset:read_offset`, for context) and the new ones
(`read_offset:`). The new piece is what the window's text adds to the context's text. A piece is
held back while the window's text ends in U+FFFD (an unfinished character) or ends in a
byte-fallback token (a later invalid byte turns the whole byte run into U+FFFD), so what is
emitted never changes. The window stays a few tokens long, so a step costs O(1), not O(length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # engine.tokenizer re-exports this class, so no import back at run time
    from engine.tokenizer import Tokenizer

# Prompt tokens decoded as context for the first output tokens.
PROMPT_CONTEXT_TOKENS = 6
# Consumed ids are dropped once this many pile up, keeping memory bounded too.
_TRIM_AFTER = 256


class IncrementalDetokenizer:
    """Streams one sequence's output text.

    Without `prompt_token_ids`, the pieces join to exactly `tokenizer.decode(output_ids,
    skip_special_tokens)`. With them, the pieces are what the output adds to the prompt's text,
    `decode(prompt + output)[len(decode(prompt)):]`: the same, except that a sentencepiece
    tokenizer keeps the space that starts the first output token ("▁Paris" -> " Paris") instead
    of stripping it as it does at the start of a text. Use that for completions that continue the
    prompt.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = self._kept(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]
        # Context, then output ids; skipped special tokens are left out.
        self._token_ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (the join of the pieces)."""
        return "".join(self._pieces)

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Takes the next generated ids and returns the text they finalise (often "")."""
        kept = self._kept(new_token_ids)
        if not kept:
            return ""
        self._token_ids += kept
        if kept[-1] in self._tokenizer.byte_token_ids:
            return ""
        return self._emit(final=False)

    def finish(self) -> str:
        """Flushes the held-back tail (e.g. an unfinished character, as U+FFFD) at the end."""
        return self._emit(final=True)

    def _kept(self, token_ids: Sequence[int]) -> list[int]:
        # Skipped special tokens leave the window too, so they cannot become its first token,
        # whose leading space a sentencepiece decoder would then strip.
        if not self._skip_special_tokens:
            return list(token_ids)
        special = self._tokenizer.all_special_ids
        return [token_id for token_id in token_ids if token_id not in special]

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._token_ids):
            return ""
        ids, skip = self._token_ids, self._skip_special_tokens
        context_text = self._tokenizer.decode(ids[self._prefix_offset:self._read_offset], skip)
        window_text = self._tokenizer.decode(ids[self._prefix_offset:], skip)
        if not final and window_text.endswith("\ufffd"):
            return ""
        piece = window_text[len(context_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        if self._prefix_offset > _TRIM_AFTER:
            del self._token_ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._pieces.append(piece)
        return piece
