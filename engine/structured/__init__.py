"""Structured output on the host: constraints (spec), their compiled grammars (compiler), each
sequence's grammar state (matcher) and token bitmasks in numpy (bitmask). No JAX: the jitted
step applies the bitmask with `pallas_kernels.token_bitmask.apply_token_bitmask`."""

from engine.structured.bitmask import (allocate_bitmask, allowed_token_ids, apply_bitmask,
                                       bitmask_width)
from engine.structured.compiler import CompiledGrammar, GrammarCompiler, compiler_for
from engine.structured.matcher import Matcher, fill_bitmasks
from engine.structured.spec import KINDS, StructuredOutput, StructuredOutputError

__all__ = ["KINDS", "CompiledGrammar", "GrammarCompiler", "Matcher", "StructuredOutput",
           "StructuredOutputError", "allocate_bitmask", "allowed_token_ids", "apply_bitmask",
           "bitmask_width", "compiler_for", "fill_bitmasks"]
