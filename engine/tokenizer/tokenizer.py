"""Tokenizer: text <-> token ids, special tokens and chat templates of a model directory (no JAX).

Everything runs through one `tokenizers.Tokenizer` (the HF Rust tokenizer), so ids and text match
transformers 5's AutoTokenizer for the same directory:

- `tokenizer.json` is loaded as is, except that for tokenizer_class LlamaTokenizer(Fast) the text
  handling is rebuilt from the config as transformers 5 does (no normalizer, Metaspace "▁" prefix
  at the start of the text only), which changes hub Llama-2 files that prepend "▁" everywhere.
- transformers 5 saves a sentencepiece model as that tokenizer.json (a BPE with byte fallback); a
  directory with only `tokenizer.model` is converted the same way here from the proto.
- special tokens named in the config are added when tokenizer.json lacks them. BOS / EOS come
  from tokenizer.json's post-processor; `add_bos_token` / `add_eos_token` (default False) count
  only for a bare tokenizer.model, as in transformers 5.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from engine.sampling_params import check_unicode
from engine.tokenizer.chat_template import (load_chat_templates, render_chat_template,
                                            select_chat_template, validate_messages)
from engine.tokenizer.detokenizer import IncrementalDetokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
# Named special tokens, in transformers' order; each is also a chat template variable.
_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token")

_LONG_TEXT = 1 << 16   # characters; encode_batch is ~1.6x slower, worth it only past this


class Tokenizer:
    """One model's tokenizer. Build it with `Tokenizer.from_pretrained(model_dir)`."""

    def __init__(self, backend: tokenizers.Tokenizer, *, model_dir: Path,
                 special_tokens: Mapping[str, str], eos_token_ids: Iterable[int],
                 chat_templates: Mapping[str, str], clean_up_spaces: bool = False):
        self._backend = backend
        self._model_dir = model_dir
        self._special_tokens = dict(special_tokens)  # {"bos_token": "<s>", ...}; template variables
        self._chat_templates = dict(chat_templates)
        self._clean_up_spaces = clean_up_spaces
        self._eos_token_ids = frozenset(eos_token_ids)
        added = backend.get_added_tokens_decoder()
        # decode(skip_special_tokens=True) drops exactly the added tokens flagged special.
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._byte_token_ids = _byte_fallback_ids(backend)
        self._added_ids = frozenset(added)
        self._byte_level = _decoder_has(backend, "ByteLevel")
        # decode() of one token, by (id, skip_special_tokens): each streamed token decodes
        # the one before it as context (IncrementalDetokenizer), each logprob its piece.
        self._pieces: dict[tuple[int, bool], str] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Loads the tokenizer files of a model directory (no network).

        Reads tokenizer.json (else the sentencepiece tokenizer.model), tokenizer_config.json,
        special_tokens_map.json, the chat template files, and the eos_token_id of
        generation_config.json and config.json (an int or a list).

        Raises:
          FileNotFoundError: the directory has neither tokenizer.json nor tokenizer.model.
        """
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # Legacy special_tokens_map.json: transformers reads it only for configs that predate
            # added_tokens_decoder, and lets it win.
            config.update(_read_json(model_dir / "special_tokens_map.json"))
        special_tokens = _special_token_config(config)
        backend = _load_backend(model_dir, config, special_tokens)
        eos_ids = _config_eos_ids(model_dir)
        eos_id = backend.token_to_id(special_tokens.get("eos_token", ""))
        eos_ids |= set() if eos_id is None else {eos_id}
        # transformers skips its space clean-up for BPE, whatever the config says.
        clean_up = (bool(config.get("clean_up_tokenization_spaces"))
                    and not isinstance(backend.model, models.BPE))
        return cls(backend, model_dir=model_dir, special_tokens=special_tokens,
                   eos_token_ids=eos_ids, chat_templates=load_chat_templates(model_dir, config),
                   clean_up_spaces=clean_up)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The HF Rust tokenizer behind this one, for read-only use (structured output reads
        every token's bytes from it)."""
        return self._backend

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS; see `eos_token_ids` for every id that ends generation."""
        return self._token_id("eos_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """EOS of the tokenizer, generation_config.json and config.json together."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens: those decode(skip_special_tokens=True) drops."""
        return self._special_ids

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback tokens <0x00>..<0xFF> (empty unless the decoder joins them)."""
        return self._byte_token_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for in text, even a part of a character (OpenAI's
        logprob `bytes`, which decode() of the token alone cannot give: it shows U+FFFD):
        a byte-level token's bytes, a byte-fallback token's one byte, a sentencepiece
        piece's text with its '▁' as a space, an added token's text."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode("utf-8")
        if token_id in self._byte_token_ids:   # <0xNN>
            return bytes([int(piece[3:5], 16)])
        if self._byte_level and all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Returns the token ids of `text`; add_special_tokens adds BOS / EOS as the config says.

        Raises:
          ValueError: `text` is not a string of valid Unicode (a lone surrogate such as
            "\\ud800" has no UTF-8 encoding; the backend would raise a TypeError).
        """
        if not isinstance(text, str):
            raise ValueError(f"prompt={text!r:.80}: expected a string")
        check_unicode("prompt", text)
        if len(text) > _LONG_TEXT:
            # encode_batch releases the GIL while it runs (encode does not), so a long prompt
            # or /tokenize body does not stall the engine thread and every other request.
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Returns the text of `token_ids`, as transformers' decode gives it."""
        if len(token_ids) == 1:
            key = (int(token_ids[0]), skip_special_tokens)
            text = self._pieces.get(key)
            if text is None:
                text = self._pieces[key] = self._decode(list(token_ids), skip_special_tokens)
            return text
        return self._decode(list(token_ids), skip_special_tokens)

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        text = self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Renders a conversation with the model's chat template, as transformers does.

        Args:
          messages: dicts with a role in system/user/assistant/tool/developer and a string (or
            list of text parts) content.
          add_generation_prompt: end with the header that starts an assistant turn.
          tokenize: return token ids, encoded without adding BOS / EOS (the template writes them).
          tools: JSON-schema tool definitions; picks a template named "tool_use" when there is one.
          **kwargs: more template variables (e.g. enable_thinking=False).

        Returns:
          The prompt text, or its token ids when tokenize=True.

        Raises:
          ValueError: a bad message (naming its index and field), no chat template, or a template
            that rejects the conversation through raise_exception.
        """
        checked = validate_messages(messages)
        template = select_chat_template(self._chat_templates, tools, self._model_dir)
        text = render_chat_template(template, checked, add_generation_prompt=add_generation_prompt,
                                    tools=tools, variables={**self._special_tokens, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)


def _load_backend(model_dir: Path, config: Mapping[str, Any],
                  special_tokens: Mapping[str, str]) -> tokenizers.Tokenizer:
    if (model_dir / "tokenizer.json").is_file():
        text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
        backend = tokenizers.Tokenizer.from_str(text)
        # transformers 5 rebuilds a Llama tokenizer's text handling from the config, whatever
        # the file says (hub Llama-2 files prepend "▁" with a normalizer, even after <s>),
        # unless the file is byte-level (Llama 3 style), which it then loads as it is.
        if config.get("tokenizer_class") in _LLAMA_CLASSES and '"ByteLevel"' not in text:
            _use_llama_pipeline(backend, config, add_prefix_default=True)
        _add_missing_tokens(backend, config, special_tokens)
        # BOS / EOS come from the file's post-processor: transformers 5 ignores the config's
        # add_bos_token / add_eos_token whenever tokenizer.json exists.
        return backend
    if (model_dir / "tokenizer.model").is_file():
        backend = _backend_from_sentencepiece(model_dir / "tokenizer.model", config)
        _add_missing_tokens(backend, config, special_tokens)
        _add_bos_eos(backend, config, special_tokens)
        return backend
    raise FileNotFoundError(
        f"{model_dir}: expected tokenizer.json or tokenizer.model, found neither")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    # Configs write a token as a string or as a serialized AddedToken {"content": ..., ...}.
    return value.get("content") if isinstance(value, Mapping) else value


def _special_token_config(config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens (plus model-specific ones such as image_token), by name."""
    named = dict(config)
    names = list(NAMED_SPECIAL_TOKENS)
    if isinstance(named.get("extra_special_tokens"), Mapping):
        names += list(named["extra_special_tokens"])
        named.update(named["extra_special_tokens"])
    return {name: _token_content(named[name]) for name in names if _token_content(named.get(name))}


def _add_missing_tokens(backend: tokenizers.Tokenizer, config: Mapping[str, Any],
                        special_tokens: Mapping[str, str]) -> None:
    """Adds the config's added and special tokens that tokenizer.json does not list yet."""
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    added = config.get("added_tokens_decoder", {})
    for token in (added[key] for key in sorted(added, key=int)):
        if token["content"] not in present:
            fields = {key: token[key] for key in _ADDED_TOKEN_FIELDS if key in token}
            backend.add_tokens([AddedToken(token["content"], **fields)])
            present.add(token["content"])
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extras, Mapping):
        extras = list(extras.values())
    for content in [*special_tokens.values(), *map(_token_content, extras)]:
        if content not in present:
            backend.add_special_tokens([AddedToken(content, special=True)])
            present.add(content)


def _add_bos_eos(backend: tokenizers.Tokenizer, config: Mapping[str, Any],
                 special_tokens: Mapping[str, str]) -> None:
    """Adds BOS / EOS around encoded text as add_bos_token / add_eos_token say (default off)."""
    bos = special_tokens.get("bos_token") if config.get("add_bos_token") else None
    eos = special_tokens.get("eos_token") if config.get("add_eos_token") else None

    def around(sequence: str, type_id: int) -> list[str]:
        return [f"{token}:{type_id}" for token in (bos, sequence, eos) if token is not None]

    backend.post_processor = processors.TemplateProcessing(
        single=around("$A", 0), pair=around("$A", 0) + around("$B", 1),
        special_tokens=[(token, backend.token_to_id(token)) for token in {bos, eos} - {None}])


def _config_eos_ids(model_dir: Path) -> set[int]:
    eos_ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        value = _read_json(model_dir / name).get("eos_token_id")
        eos_ids.update([value] if isinstance(value, int) else value or [])
    return eos_ids


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet: the character standing for each byte in its vocabulary
    (GPT-2's scheme: printable Latin-1 bytes stand for themselves, the other 68 bytes, in
    order, for the characters from U+0100 on), mapped back to the byte."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [byte for byte in range(256) if byte not in kept]
    return {**{chr(byte): byte for byte in kept},
            **{chr(0x100 + index): byte for index, byte in enumerate(moved)}}


_BYTE_OF_CHAR = _byte_level_chars()


def _decoder_has(backend: tokenizers.Tokenizer, kind: str) -> bool:
    """Whether the backend's decoder is, or holds, a decoder of type `kind`."""
    decoder = backend.decoder
    return decoder is not None and f'"{kind}"'.encode() in decoder.__getstate__()


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    if not _decoder_has(backend, "ByteFallback"):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return frozenset(i for i in ids if i is not None)


def _clean_up_spaces(text: str) -> str:
    # transformers' clean_up_tokenization, for WordPiece-era configs that ask for it.
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                           (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                           (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


# sentencepiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _backend_from_sentencepiece(path: Path, config: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Builds the tokenizer transformers 5 makes of a Llama-style `tokenizer.model`.

    BPE models become a tokenizers BPE (merges ranked by the merged piece's id, i.e. its score)
    with byte fallback; unigram models keep their piece scores. Text handling is Llama's (see
    `_use_llama_pipeline`): transformers ignores the sentencepiece normalizer (Llama's is identity).
    """
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, which orbax requires too

    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]
    vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
    byte_fallback = any(kind == _BYTE for _, _, kind in pieces)
    unk = next((piece for piece, _, kind in pieces if kind == _UNKNOWN), None)
    model_type = proto.trainer_spec.model_type
    if model_type == proto.trainer_spec.BPE:
        model = models.BPE(vocab, _sentencepiece_merges(pieces, vocab), unk_token=unk,
                           fuse_unk=True, byte_fallback=byte_fallback)
    elif model_type == proto.trainer_spec.UNIGRAM:
        scored = [(piece, score) for piece, score, _ in pieces]
        model = models.Unigram(scored, vocab.get(unk), byte_fallback)
    else:
        raise ValueError(f"{path}: sentencepiece model_type={model_type}: expected BPE or UNIGRAM")
    backend = tokenizers.Tokenizer(model)
    _use_llama_pipeline(backend, config, add_prefix_default=proto.normalizer_spec.add_dummy_prefix)
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                for piece, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)])
    backend.add_tokens([AddedToken(piece, special=False, normalized=False)
                        for piece, _, kind in pieces if kind == _USER_DEFINED])
    return backend


def _use_llama_pipeline(backend: tokenizers.Tokenizer, config: Mapping[str, Any],
                        add_prefix_default: bool) -> None:
    """Sets transformers 5's LlamaTokenizer text handling: no normalizer; the "▁" prefix added by
    a Metaspace pre-tokenizer to the start of the text only (to every chunk between added tokens
    with legacy=true; nowhere with add_prefix_space=false); a decoder that strips it again."""
    add_prefix = config.get("add_prefix_space")
    if add_prefix is None:
        add_prefix = add_prefix_default
    scheme = ("always" if config.get("legacy") else "first") if add_prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    strip_prefix = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    backend.decoder = decoders.Sequence(steps + strip_prefix)


def _sentencepiece_merges(pieces: Sequence[tuple[str, float, int]],
                          vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    # sentencepiece BPE merges the pair whose result scores highest; pieces are stored best
    # first, so ranking merges by the result's id (then by split point) reproduces its order.
    merges = []
    for piece, _, kind in pieces:
        if kind in (_NORMAL, _USER_DEFINED):
            merges += [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                       if piece[:cut] in vocab and piece[cut:] in vocab]
    return merges
