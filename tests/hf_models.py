"""Tiny random-weight Hugging Face models for parity tests, built locally and cached per run."""

from __future__ import annotations

import math
from pathlib import Path

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Each architecture's own features switched on, so a parity test exercises them.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                   rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)),
}


def spread_weights(model, seed: int = 0) -> None:
    """Re-initialises weights with a realistic spread (not the 0.02 default), so greedy
    text varies from token to token and small numeric errors show up."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                base = 0.0 if "Gemma" in type(model).__name__ else 1.0
                param.copy_(base + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            elif "embed" in name:
                # Tied to the head, unit-scale rows would make every greedy step repeat
                # its input token.
                tied = model.config.tie_word_embeddings
                param.copy_(noise / math.sqrt(param.shape[1]) if tied else noise)
            else:
                param.copy_(1.5 * noise / math.sqrt(param.shape[1]))


def build_hf_model(kind: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Builds, spreads and save_pretrained()s one tiny model; returns its directory."""
    import torch
    import transformers

    config_name, model_name, extra = ARCHITECTURES[kind]
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    spread_weights(model, seed)
    model.save_pretrained(out_dir)
    save_byte_tokenizer(out_dir)
    return out_dir


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def save_byte_tokenizer(out_dir: Path) -> None:
    """A byte-level tokenizer.json (specials at 0-2, the 256 bytes at 3-258, no merges), so
    any text round-trips and every id fits the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def load_hf_model(model_dir: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                              attn_implementation="eager")
    return model.eval()
