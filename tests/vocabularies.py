"""Real vocabularies built locally for tests that depend on what tokens exist: a GPT-2-style
byte-level BPE trained on JSON and prose, and the vocabulary of a GGUF file."""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

WORDS = ("the of and name city value items true false null street code color red green "
         "blue tags count user id type object string number array Paris London").split()


def _corpus(seed: int) -> list[str]:
    """JSON documents and sentences, so merges such as '{"', '":', ' "' exist as tokens."""
    rng = random.Random(seed)
    lines = []
    for _ in range(1500):
        doc = {rng.choice(WORDS): rng.choice([rng.randint(-999, 99999), rng.random(),
                                              " ".join(rng.sample(WORDS, 3)), None, True,
                                              [rng.randint(0, 9) for _ in range(3)]])
               for _ in range(rng.randint(1, 5))}
        lines.append(json.dumps(doc, indent=rng.choice([None, 2])))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    return lines


def save_trained_bpe(out_dir, vocab_size: int = 2048, seed: int = 0,
                     chat_template: str | None = None) -> None:
    """A byte-level BPE (every byte a token, merges learned here) with <|endoftext|> and a
    ChatML pair of special tokens, saved as a tokenizer.json directory."""
    from transformers import PreTrainedTokenizerFast
    backend = HfTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", chat_template=chat_template)
    fast.save_pretrained(out_dir)


def save_gguf_tokenizer(gguf_path, out_dir) -> None:
    """The byte-level BPE vocabulary of a "gpt2"-kind GGUF (tokens, merges, control tokens as
    special ones) as a tokenizer.json directory. Only what masks depend on: every token's
    bytes and which are special; the pre-tokenizer is GPT-2's, not necessarily the model's."""
    import gguf
    from transformers import PreTrainedTokenizerFast
    reader = gguf.GGUFReader(gguf_path)
    tokens, merges, types = (reader.fields[f"tokenizer.ggml.{name}"].contents()
                             for name in ("tokens", "merges", "token_type"))
    eos = tokens[reader.fields["tokenizer.ggml.eos_token_id"].contents()]
    backend = HfTokenizer(models.BPE({token: i for i, token in enumerate(tokens)},
                                    [tuple(merge.split(" ", 1)) for merge in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([token for token, kind in zip(tokens, types) if kind == 3])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos).save_pretrained(out_dir)
