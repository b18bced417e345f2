"""Builds Ember's default model (see engine/default_model/build.py), then checks and samples it.

    python scripts/build_default_model.py [--out DIR] [--train-seconds N] [--force]

DIR defaults to $EMBER_HOME/default-model (~/.cache/ember/default-model). An existing
complete model is kept unless --force is given. After the build this script prints the
training report, a greedy continuation, and, when transformers is installed, whether
transformers loads hf/ with the same logits and encodes text as the raw SentencePiece model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from engine.default_model.build import (HF_SUBDIR, MODEL_SUBDIR, BuildRecipe,  # noqa: E402
                                        build_default_model, default_model_root, is_complete,
                                        load_report)
from engine.default_model.training import BOS_ID, EOS_ID, load_corpus  # noqa: E402

SAMPLE_PROMPTS = ("import os\nimport sys\n\n\ndef main(", "class Stack:\n    def __init__(self):\n")
LOGITS_TOLERANCE = 1e-4


def greedy_continuation(model, processor, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy decoding with forward_dense over one fixed-size buffer (a single compile)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    prompt_ids = [BOS_ID] + processor.encode(prompt)
    tokens = np.zeros((1, len(prompt_ids) + max_new_tokens), np.int32)  # i32[1, total]
    tokens[0, :len(prompt_ids)] = prompt_ids
    forward = nnx.jit(lambda model, tokens: model.forward_dense(tokens))
    end = len(prompt_ids)
    while end < tokens.shape[1]:
        logits = forward(model, jnp.asarray(tokens))  # f32[1, total, V]; causal: padding unseen
        next_id = int(jnp.argmax(logits[0, end - 1]))
        if next_id == EOS_ID:
            break
        tokens[0, end] = next_id
        end += 1
    return processor.decode(tokens[0, len(prompt_ids):end].tolist())


def check_tokenizer(hf_dir: Path, processor, texts: list[str]) -> None:
    """transformers' AutoTokenizer on hf/ must encode exactly as the raw SentencePiece model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    # split_special_tokens: text that spells "<s>" is text, as SentencePiece treats it.
    mismatched = [index for index, text in enumerate(texts)
                  if tokenizer(text, split_special_tokens=True)["input_ids"]
                  != [BOS_ID] + processor.encode(text)]
    verdict = "OK" if not mismatched else f"MISMATCH on held-out files {mismatched}"
    print(f"transformers AutoTokenizer vs sentencepiece on {len(texts)} held-out files: "
          f"{verdict}")


def check_logits(hf_dir: Path, model, processor, text: str) -> None:
    """transformers' LlamaForCausalLM on hf/ must give our logits (orbax model) within 1e-4."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    ids = [BOS_ID] + processor.encode(text)[:255]
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits.numpy()  # f32[1, L, V]
    actual = np.asarray(model.forward_dense(np.asarray([ids], np.int32)))  # f32[1, L, V]
    difference = float(np.abs(actual - expected).max())
    verdict = "OK" if difference <= LOGITS_TOLERANCE else "MISMATCH"
    print(f"transformers LlamaForCausalLM vs Ember logits on {len(ids)} tokens: max |diff| "
          f"{difference:.2e} (tolerance {LOGITS_TOLERANCE:.0e}): {verdict}")


def check_and_sample(root: Path) -> None:
    import sentencepiece as spm

    from models.checkpoint import load_model

    model = load_model(root / MODEL_SUBDIR)
    processor = spm.SentencePieceProcessor(model_file=str(root / MODEL_SUBDIR / "tokenizer.model"))
    for prompt in SAMPLE_PROMPTS:
        print(f"greedy sample:\n{prompt}{greedy_continuation(model, processor, prompt)}\n---")
    try:
        import transformers  # a test dependency only
    except ImportError:
        print("transformers not installed: skipping the Hugging Face load checks")
        return
    transformers.logging.set_verbosity_error()  # long files exceed model_max_length: expected
    transformers.logging.disable_progress_bar()
    held_out_texts = load_corpus().held_out_texts
    check_tokenizer(root / HF_SUBDIR, processor, held_out_texts)
    check_logits(root / HF_SUBDIR, model, processor, held_out_texts[0])


def print_report(report: dict) -> None:
    print(f"params {report['params']:,}; {report['steps']} steps in {report['seconds']} s, "
          f"{report['tokens_seen']:,} tokens ({report['tokens_per_second']:,} tok/s on "
          f"{report['machine_cores']} cores, {report['backend']})")
    print(f"held-out loss {report['held_out_loss']:.3f} vs uniform baseline "
          f"{report['uniform_baseline_loss']:.3f} (train loss {report['train_loss']:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="model root (default: $EMBER_HOME/default-model)")
    parser.add_argument("--train-seconds", type=float, default=BuildRecipe().train_seconds,
                        help="wall-clock training budget (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the greedy sample and the transformers checks")
    args = parser.parse_args(argv)
    root = (args.out or default_model_root()).absolute()
    started = time.monotonic()
    if is_complete(root) and not args.force:
        print(f"default model already built at {root} (use --force to rebuild)")
    else:
        build_default_model(root, BuildRecipe(train_seconds=args.train_seconds), force=args.force)
    print_report(load_report(root / MODEL_SUBDIR))
    if not args.no_checks:
        check_and_sample(root)
    print(f"model: {root / MODEL_SUBDIR} (orbax), {root / HF_SUBDIR} (safetensors); "
          f"{time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
