"""Tokenizers from GGUF metadata: the tokenizer llama.cpp's converter folded into a GGUF file,
written back out as tokenizer.json + tokenizer_config.json for `Tokenizer.from_pretrained`.

A GGUF file stores the vocabulary under `tokenizer.ggml.*`; `tokenizer.ggml.model` names its kind:
- "gpt2": byte-level BPE. The tokens are spelled in the byte alphabet and the merges are listed;
  `tokenizer.ggml.pre` names how text is split before merging (`_SPLITS`: llama.cpp's own
  table in llama-vocab.cpp, written with the patterns of the original tokenizer.json files).
- "llama": sentencepiece BPE with byte fallback and scores, no merges. The merges are rebuilt
  from the vocabulary and the text handling is transformers' LlamaTokenizer, both as
  tokenizer.py does for a bare tokenizer.model.

Token types: control tokens become special added tokens, user-defined ones plain added tokens.
The metadata is read with llama.cpp's gguf package directly: engine.tokenizer sits below models
(pyproject.toml's import rules), so models/gguf.py's reader is out of reach here. No JAX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

# One way to do a thing: the sentencepiece rules of the tokenizer.model path.
from engine.tokenizer.tokenizer import (_BYTE, _CONTROL, _NORMAL, _UNKNOWN, _USER_DEFINED,
                                        _add_bos_eos, _sentencepiece_merges, _use_llama_pipeline)

__all__ = ["SUPPORTED_PRE_TOKENIZERS", "tokenizer_from_gguf", "write_tokenizer_files"]

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split pattern, digits one by one first). None is GPT-2's pattern, which
# ByteLevel applies itself. "default" (and a file without the key) is GPT-2's, as transformers
# reads it; llama.cpp's own default differs slightly.
_SPLITS: dict[str, tuple[str | None, bool]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "olmo", "mpt", "phi-2", "jina-es", "jina-de",
                     "roberta-bpe"), (None, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), (None, True)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"),
                    (_LLAMA3_SPLIT, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2_SPLIT, False)),
}
SUPPORTED_PRE_TOKENIZERS = tuple(_SPLITS)
# Llama 3's splitter: llama.cpp (and the hub's tokenizer.json) take a word found whole in the
# vocabulary as one token, without merging.
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3")
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def tokenizer_from_gguf(gguf_path: str | os.PathLike) -> tuple[tokenizers.Tokenizer, dict]:
    """The tokenizer a GGUF file describes: its backend and its tokenizer_config.json.

    Raises:
      ValueError naming the file and key: not a GGUF file, no tokenizer in it, or a tokenizer
        kind or pre-tokenizer this module does not build.
    """
    path = Path(gguf_path)
    metadata = _read_metadata(path)
    kind = _required(metadata, "tokenizer.ggml.model", path)
    tokens = _required(metadata, "tokenizer.ggml.tokens", path)
    types = metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if metadata.get("general.architecture") in ("gemma", "gemma2", "gemma3"):
        # Gemma files spell its whitespace-run tokens with real spaces; the vocabulary (and so
        # the rebuilt merges) needs them as "▁".
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    backend = _backend(kind, metadata, tokens, types, path)
    # Added tokens only name ids the vocabulary has: the model's embedding has no others.
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, types) if kind == _USER_DEFINED])
    special_tokens = {name: tokens[metadata[f"tokenizer.ggml.{key}"]]
                      for name, key in _SPECIAL_IDS.items()
                      if 0 <= metadata.get(f"tokenizer.ggml.{key}", -1) < len(tokens)}
    # llama.cpp adds BOS for sentencepiece vocabularies and Llama 3's unless the file says not.
    add_bos_default = kind == "llama" or metadata.get("tokenizer.ggml.pre") in _IGNORE_MERGES
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",   # tokenizer.json as written, no rebuild
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **special_tokens,
    }
    _add_bos_eos(backend, config, special_tokens)
    if (templates := _chat_templates(metadata)) is not None:
        config["chat_template"] = templates
    return backend, config


def write_tokenizer_files(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Writes tokenizer.json and tokenizer_config.json of a GGUF file's tokenizer to out_dir."""
    backend, config = tokenizer_from_gguf(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as error:
        raise ValueError(f"{path}: not a readable GGUF file, or truncated ({error})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key == "general.architecture" or key.startswith("tokenizer."):
            is_array = field.types and field.types[0].name == "ARRAY"
            metadata[key] = field.contents(slice(None)) if is_array else field.contents()
    return metadata


def _required(metadata: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise ValueError(f"{path}: metadata key {key!r} is missing: the file has no tokenizer")
    return metadata[key]


def _backend(kind: str, metadata: Mapping[str, Any], tokens: list[str], types: list[int],
             path: Path) -> tokenizers.Tokenizer:
    if kind == "gpt2":
        return _byte_level_bpe(metadata, tokens, metadata.get("tokenizer.ggml.pre", "default"),
                               path)
    if kind == "llama":
        return _sentencepiece_bpe(tokens, metadata.get("tokenizer.ggml.scores"), types,
                                  bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
    raise ValueError(f"{path}: tokenizer.ggml.model={kind!r} is not supported: expected "
                     f"'gpt2' (byte-level BPE) or 'llama' (sentencepiece)")


def _first_ids(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)   # a repeated token keeps its first id
    return vocab


def _byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str], pre: str,
                    path: Path) -> tokenizers.Tokenizer:
    if pre not in _SPLITS:
        raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported: expected one "
                         f"of {SUPPORTED_PRE_TOKENIZERS}")
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(models.BPE(_first_ids(tokens), merges, fuse_unk=False,
                                              ignore_merges=pre in _IGNORE_MERGES))
    pattern, split_digits = _SPLITS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if pattern is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, types: list[int],
                       add_prefix: bool) -> tokenizers.Tokenizer:
    pieces = list(zip(tokens, scores or [0.0] * len(tokens), types))
    vocab = _first_ids(tokens)
    unk = next((token for token, kind in zip(tokens, types) if kind == _UNKNOWN), None)
    backend = tokenizers.Tokenizer(models.BPE(
        vocab, _sentencepiece_merges(pieces, vocab), unk_token=unk, fuse_unk=True,
        byte_fallback=_BYTE in types))
    _use_llama_pipeline(backend, {"add_prefix_space": add_prefix}, add_prefix_default=True)
    if unk is not None:
        backend.add_special_tokens([AddedToken(unk, special=True, normalized=False)])
    return backend


def _chat_templates(metadata: Mapping[str, Any]) -> str | list[dict[str, str]] | None:
    """tokenizer.chat_template, plus named ones (tokenizer.chat_template.tool_use, ...)."""
    default = metadata.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = [{"name": key.removeprefix(prefix), "template": value}
             for key, value in metadata.items() if key.startswith(prefix)]
    if not named:
        return default
    return ([{"name": "default", "template": default}] if default else []) + named
