"""Real vocabularies for the structured-output tests: a GPT-2-style byte-level BPE trained
here on JSON and prose (always), and SmolLM2's 49,152-token vocabulary from the default
model's GGUF (where the default model can be fetched)."""

from __future__ import annotations

import pytest

from engine.tokenizer import Tokenizer
from tests.vocabularies import save_gguf_tokenizer, save_trained_bpe


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory) -> Tokenizer:
    out_dir = tmp_path_factory.mktemp("trained_bpe")
    save_trained_bpe(out_dir)
    return Tokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory, default_gguf) -> Tokenizer:
    out_dir = tmp_path_factory.mktemp("smollm2_tokenizer")
    save_gguf_tokenizer(default_gguf, out_dir)
    return Tokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="session", params=["trained_bpe", "smollm2"])
def vocab_tokenizer(request) -> Tokenizer:
    """Each real vocabulary in turn."""
    name = "trained_tokenizer" if request.param == "trained_bpe" else "smollm2_tokenizer"
    return request.getfixturevalue(name)
