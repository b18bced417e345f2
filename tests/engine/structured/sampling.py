"""Drawing outputs under a matcher's masks, as a sampler would with random logits."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from engine.structured import GrammarCompiler, allowed_token_ids, compiler_for
from engine.tokenizer import Tokenizer

EXTRA_IDS = 7   # the model's vocabulary is wider than the tokenizer's (padded lm_head)
MAX_STEPS = 300


@dataclass(slots=True, frozen=True)
class Vocab:
    """A compiler for a model vocabulary EXTRA_IDS wider than the tokenizer's, and which
    tokens are whitespace only."""

    tokenizer: Tokenizer
    compiler: GrammarCompiler
    blank: np.ndarray   # bool[V]


def vocab_for(tokenizer: Tokenizer) -> Vocab:
    size = tokenizer.vocab_size + EXTRA_IDS
    blank = [tokenizer.decode([t]).isspace() for t in range(tokenizer.vocab_size)]
    return Vocab(tokenizer, compiler_for(tokenizer, size),
                 np.array(blank + [False] * EXTRA_IDS))


def draw(vocab: Vocab, matcher, rng: random.Random) -> tuple[list[int], bool]:
    """Tokens drawn from what the mask allows until EOS: EOS at once 30% of the times it is
    allowed, whitespace-only tokens 10% of the times they are (so that JSON, whose gaps take
    up to 20 whitespace characters, ends within MAX_STEPS), else uniform. Also checks that
    ids past the tokenizer's are never allowed, and that a token outside the mask is refused
    and leaves the matcher where it was."""
    compiler = vocab.compiler
    row = np.zeros(compiler.bitmask_width, np.uint32)
    tokens = []
    for _ in range(MAX_STEPS):
        matcher.fill_bitmask(row)
        allowed = allowed_token_ids(row, compiler.vocab_size)
        assert len(allowed) and allowed[-1] < vocab.tokenizer.vocab_size
        refused = rng.randrange(compiler.vocab_size)
        if refused not in set(allowed.tolist()):
            assert not matcher.accept(refused)
        eos = [t for t in allowed.tolist() if t in compiler.eos_token_ids]
        solid = allowed[~vocab.blank[allowed]]
        if eos and rng.random() < 0.3:
            token = eos[0]
        else:
            token = int(rng.choice(solid if len(solid) and rng.random() < 0.9 else allowed))
        assert matcher.accept(token)
        if token in compiler.eos_token_ids:
            return tokens, True
        tokens.append(token)
    return tokens, False
