"""Tokenizers (Hugging Face tokenizer.json or SentencePiece), incremental detokenization and
chat templates rendered as transformers renders them. No JAX."""

from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
