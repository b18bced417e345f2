"""Tokenizers rebuilt from GGUF metadata equal transformers' GGUF tokenizer for the same file.

Each file is written by the test (gguf-py's GGUFWriter) from a tokenizer trained here: a
byte-level BPE under each pre-tokenizer kind Ember supports, a Llama-style sentencepiece BPE
with byte fallback, and Gemma's variant without a dummy prefix. The real SmolLM2 file is checked
too when it is present. Our side is `Tokenizer.from_pretrained` of the directory that
`write_tokenizer_files` writes, as `ember convert` will leave it.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.tokenizer import Tokenizer
from engine.tokenizer.gguf_tokenizer import write_tokenizer_files
from tests.engine.tokenizer.test_tokenizer import (CHATML_TEMPLATE, CONVERSATIONS, LLAMA2_TEMPLATE,
                                                   TEXT_PIECES, _corpus, _random_text)
from tests.gguf_files import add_gpt2_tokenizer, add_sentencepiece_tokenizer, write_gguf

transformers = pytest.importorskip("transformers")

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Text a tokenizer gets wrong first: multi-byte UTF-8, code, runs of spaces and newlines,
# digits, contractions and special tokens inside text.
FIXED_TEXTS = [
    "", "Hello world", " Hello  world  ", "2024 has 365 days; π≈3.14159 and 1234567",
    "naïve café — 東京 😀🚀 مرحبا 👩‍💻", "def f(x):\n\treturn x**2  # comment\n\n\n    pass",
    "don't I'LL we've THEY'RE", "a\r\nb\n\n\n\nc   \t  d", "   leading", "trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<s>[INST] hi [/INST]</s>", "<think>x</think>",
    "１２３ full width", "x" * 80,
]


# Conversations every template here renders (SmolLM2's and Llama 2's want string contents and
# Llama 2's alternating turns ending with the user).
STRING_CONVERSATIONS = [c for c in CONVERSATIONS if c[-1]["role"] == "user"
                        and all(isinstance(message["content"], str) for message in c)]


def _gguf_pair(tmp_path: Path, add_tokenizer, arch: str = "llama"):
    """(ours from the written directory, transformers' from the GGUF file)."""
    path = write_gguf(tmp_path / "tokenizer.gguf", add_tokenizer, arch)
    write_tokenizer_files(path, tmp_path / "converted")
    ours = Tokenizer.from_pretrained(tmp_path / "converted")
    # The file alone in its directory: transformers also reads tokenizer_config.json beside it.
    return ours, transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)


def assert_same_tokenizer(ours, ref, conversations=CONVERSATIONS) -> None:
    rng = random.Random(5)
    texts = FIXED_TEXTS + [_random_text(rng) for _ in range(200)]
    for text in texts:
        for add_special in (True, False):
            expected = ref.encode(text, add_special_tokens=add_special)
            assert ours.encode(text, add_special) == expected, f"{text=} {add_special=}"
        ids = ref.encode(text)
        for skip in (True, False):
            expected = ref.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip) == expected, f"{text=} {skip=}"
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == len(ref)
    if ref.chat_template is not None:
        for messages in conversations:
            expected = ref.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
            assert ours.apply_chat_template(messages) == expected


@pytest.fixture(scope="module")
def byte_level_vocab():
    """(tokens, merges, token types) of a byte-level BPE trained here, `<think>` user-defined."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=BYTE_LEVEL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(random.Random(1)) + TEXT_PIECES * 20, trainer)
    backend.add_tokens(["<think>", "</think>"])
    vocab = backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(merge) for merge in _merges_of(backend)]
    types = [3 if token in BYTE_LEVEL_SPECIALS else 4 if token.endswith("think>") else 1
             for token in tokens]
    return tokens, merges, types


def _merges_of(backend: tokenizers.Tokenizer) -> list[tuple[str, str]]:
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


@pytest.mark.parametrize("pre, add_bos", [("gpt-2", False), ("smollm", False),
                                          ("llama-bpe", True), ("qwen2", False)])
def test_byte_level_bpe_matches_transformers(tmp_path, byte_level_vocab, pre, add_bos):
    tokens, merges, types = byte_level_vocab

    def add(writer):
        add_gpt2_tokenizer(writer, tokens, merges, types, pre=pre, bos=0, eos=2, pad=0,
                           add_bos=add_bos, chat_template=CHATML_TEMPLATE)

    ours, ref = _gguf_pair(tmp_path, add)
    if pre == "smollm":
        _split_digits_first(ref)
    assert_same_tokenizer(ours, ref)
    assert ours.encode("hi")[:1] == ([0] if add_bos else ours.encode("hi", False)[:1])


def _split_digits_first(ref) -> None:
    """SmolLM2's own tokenizer.json (and llama.cpp's "smollm" splitter) cut digits out one by
    one before GPT-2's pattern runs; transformers' GGUF reader runs GPT-2's pattern alone, so
    "\n\n2024" gives it "\n", "\n", "2024" instead of "\n\n", "2", "0", "2", "4". The
    reference gets SmolLM2's splitter back."""
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def test_smollm_splits_digits_one_by_one(tmp_path, byte_level_vocab):
    tokens, merges, types = byte_level_vocab
    path = write_gguf(tmp_path / "t.gguf", lambda writer: add_gpt2_tokenizer(
        writer, tokens, merges, types, pre="smollm", bos=0, eos=2))
    write_tokenizer_files(path, tmp_path / "out")
    ours = Tokenizer.from_pretrained(tmp_path / "out")
    assert {"Ġ2024", "ĊĊ"} <= set(tokens), "the vocabulary could merge these: GPT-2's split would"
    pieces = [ours.decode([i]) for i in ours.encode("in 2024\n\n7", False)]
    assert pieces[-7:] == [" ", "2", "0", "2", "4", "\n\n", "7"]


def _train_sentencepiece(directory: Path, **options) -> tuple[list, list, list]:
    """(tokens, scores, types) of a Llama-style sentencepiece BPE with byte fallback."""
    from sentencepiece import sentencepiece_model_pb2

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(0))), model_prefix=str(directory / "sp"),
        model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
        user_defined_symbols=["<think>"], **options)
    proto = sentencepiece_model_pb2.ModelProto.FromString((directory / "sp.model").read_bytes())
    return ([piece.piece for piece in proto.pieces], [piece.score for piece in proto.pieces],
            [int(piece.type) for piece in proto.pieces])


@pytest.fixture(scope="module")
def sentencepiece_vocab(tmp_path_factory):
    return _train_sentencepiece(tmp_path_factory.mktemp("spm"), control_symbols=["<|im_end|>"])


@pytest.fixture(scope="module")
def gemma_vocab(tmp_path_factory):
    """Gemma's layout: no dummy prefix; <pad> <eos> <bos> <unk> <mask> first."""
    return _train_sentencepiece(
        tmp_path_factory.mktemp("gemma_spm"), add_dummy_prefix=False, pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=["<mask>"])


def test_sentencepiece_matches_transformers(tmp_path, sentencepiece_vocab):
    tokens, scores, types = sentencepiece_vocab

    def add(writer):
        add_sentencepiece_tokenizer(writer, tokens, scores, types, bos=1, eos=2, unk=0,
                                    chat_template=LLAMA2_TEMPLATE)

    ours, ref = _gguf_pair(tmp_path, add)
    assert_same_tokenizer(ours, ref, STRING_CONVERSATIONS)
    assert ours.encode("hello")[0] == 1   # llama.cpp's default for sentencepiece: BOS on


def test_gemma_sentencepiece_without_prefix_matches_transformers(tmp_path, gemma_vocab):
    tokens, scores, types = gemma_vocab
    # Gemma files spell whitespace-run tokens with real spaces.
    tokens = [" " * len(t) if t and set(t) == {"▁"} and len(t) > 1 else t for t in tokens]

    def add(writer):
        add_sentencepiece_tokenizer(writer, tokens, scores, types, bos=2, eos=1, unk=3, pad=0,
                                    add_space_prefix=False)

    # transformers reads no "gemma" (v1) GGUF; its Gemma 2 reader shares the tokenizer.
    ours, ref = _gguf_pair(tmp_path, add, arch="gemma2")
    assert_same_tokenizer(ours, ref)
    assert ours.decode(ours.encode("  two spaces", False)) == "  two spaces"


def test_smollm2_gguf_tokenizer_matches_transformers(tmp_path, default_gguf):
    write_tokenizer_files(default_gguf, tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / default_gguf.name).symlink_to(default_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "file", gguf_file=default_gguf.name)
    _split_digits_first(ref)
    assert_same_tokenizer(ours, ref, STRING_CONVERSATIONS)
    assert ours.encode("<|im_start|>user\n2024<|im_end|>", False)[:1] == [1]


@pytest.mark.parametrize("kind, pre, message", [
    ("bert", "default", "tokenizer.ggml.model='bert' is not supported"),
    ("gpt2", "tekken", "tokenizer.ggml.pre='tekken' is not supported"),
])
def test_unsupported_tokenizer_is_named(tmp_path, kind, pre, message):
    def add(writer):
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(["a", "b"])

    path = write_gguf(tmp_path / "bad.gguf", add)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        write_tokenizer_files(path, tmp_path / "out")


def test_file_without_tokenizer_is_named(tmp_path):
    path = write_gguf(tmp_path / "none.gguf", lambda writer: None)
    with pytest.raises(ValueError, match="'tokenizer.ggml.model' is missing"):
        write_tokenizer_files(path, tmp_path / "out")
