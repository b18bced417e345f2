"""Ember's default model: a few-million-parameter Llama built locally, never downloaded.

`ensure_default_model()` returns its directory, building it the first time (about five
minutes on two CPU cores): a SentencePiece tokenizer and a small Llama trained on the Python
standard library's own source files, which every machine with Python already has.

Layout under `default_model_root()` ($EMBER_HOME/default-model, EMBER_HOME defaulting to
~/.cache/ember):

  hf/     a Hugging Face directory: config.json, model.safetensors, generation_config.json,
          tokenizer.model, tokenizer_config.json, special_tokens_map.json,
          training_report.json. transformers loads it as LlamaForCausalLM.
  model/  the same config and tokenizer files plus `orbax/`: what Ember loads
          (`models.load_model`). `ensure_default_model` returns this one.

A build runs under a lock file (one builder at a time), in a staging directory that is
renamed into place only when complete, so a killed build never leaves a half model.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from engine.config import default_cache_dir
from engine.default_model.training import (BOS_ID, EOS_ID, BuildRecipe, Corpus, load_corpus, train,
                                           train_tokenizer)

HF_SUBDIR = "hf"
MODEL_SUBDIR = "model"
REPORT_FILE = "training_report.json"
# Each message as a Python comment block, so a prompt stays in the model's (code) domain.
CHAT_TEMPLATE = (r"{{ bos_token }}{% for message in messages %}{{ '# ' + message['role'] + "
                 r"':\n' + message['content'] + '\n' }}{% endfor %}"
                 r"{% if add_generation_prompt %}{{ '# assistant:\n' }}{% endif %}")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def default_model_root() -> Path:
    """$EMBER_HOME/default-model (EMBER_HOME defaults to ~/.cache/ember), read on each call."""
    return default_cache_dir() / "default-model"


def is_complete(root: Path) -> bool:
    """A root is complete once renamed into place; these files are checked as a guard."""
    model_dir = root / MODEL_SUBDIR
    return (model_dir / "orbax").is_dir() and (model_dir / "config.json").is_file()


def ensure_default_model(progress: bool = True, root: str | os.PathLike | None = None,
                         force: bool = False) -> Path:
    """Returns the default model's orbax directory, building it first if it is missing.

    Args:
      progress: print build progress (tokenizer, training loss and tokens/s, saving).
      root: where the model lives; defaults to `default_model_root()`.
      force: rebuild it even if it is there (`ember build-default-model --force`).
    Returns:
      `root/model`, loadable with `models.load_model`.
    """
    root = Path(root) if root is not None else default_model_root()
    if force or not is_complete(root):
        build_default_model(root, force=force, progress=progress)
    return root / MODEL_SUBDIR


def build_default_model(root: str | os.PathLike, recipe: BuildRecipe | None = None,
                        force: bool = False, progress: bool = True) -> Path:
    """Builds the default model into `root` (hf/ and model/), unless it is already there.

    Args:
      root: the directory to create; replaced as a whole when `force` is set.
      recipe: sizes and training budget; `BuildRecipe()` when None.
      force: rebuild even if a complete model is present.
      progress: print progress.
    Returns:
      `root/model`.
    """
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if is_complete(root) and not force:  # another process built it while we waited
            return root / MODEL_SUBDIR
        if root.exists() and not is_complete(root) and not _is_empty_dir(root):
            raise FileExistsError(f"root={str(root)!r} exists and is not a default-model build: "
                                  "expected a missing or empty directory, to be replaced whole")
        for stale in root.parent.glob(f".{root.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock
        staging = root.parent / f".{root.name}.building-{os.getpid()}"
        recipe = recipe or BuildRecipe()
        say = _printer(progress)
        say(f"Building Ember's default model at {root} (once; about "
            f"{recipe.train_seconds / 60 + 0.5:.0f} min, trained on the Python standard library)")
        try:
            _build_into(staging, recipe, say)
            _replace_dir(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless the build failed
    return root / MODEL_SUBDIR


@contextmanager
def _build_lock(root: Path):
    with open(root.parent / f"{root.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _replace_dir(staging: Path, root: Path) -> None:
    retired = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        root.rename(retired)
    staging.rename(root)
    shutil.rmtree(retired, ignore_errors=True)


def _printer(progress: bool):
    return (lambda message: print(message, flush=True)) if progress else (lambda message: None)


def _build_into(out: Path, recipe: BuildRecipe, say) -> None:
    from models.checkpoint import convert_to_orbax

    started = time.monotonic()
    corpus = load_corpus()
    say(f"  corpus: {len(corpus.train_texts)} train files, {len(corpus.held_out_texts)} held-out "
        f"files from {corpus.source}")
    tokenizer_model = train_tokenizer(corpus, recipe.vocab_size, recipe.seed)
    train_ids, held_out_ids = corpus.token_streams(tokenizer_model)
    say(f"  tokenizer: {recipe.vocab_size} pieces, {len(train_ids):,} train tokens, "
        f"{len(held_out_ids):,} held-out tokens ({time.monotonic() - started:.0f} s)")
    model, result = train(recipe, train_ids, held_out_ids, say)
    report = _report(recipe, corpus, model, result, len(train_ids), len(held_out_ids))
    say(f"  held-out loss {result.held_out_loss:.3f} nats/token vs uniform baseline "
        f"ln({recipe.vocab_size}) = {report['uniform_baseline_loss']:.3f}; train loss "
        f"{result.train_loss:.3f}")
    hf_dir = out / HF_SUBDIR
    save_hf_dir(model, recipe, tokenizer_model, hf_dir)
    report["build_seconds"] = round(time.monotonic() - started, 1)
    (hf_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    convert_to_orbax(hf_dir, out / MODEL_SUBDIR)
    shutil.copy2(hf_dir / REPORT_FILE, out / MODEL_SUBDIR / REPORT_FILE)
    say(f"  saved {hf_dir.name}/ (safetensors) and {MODEL_SUBDIR}/ (orbax) in "
        f"{time.monotonic() - started:.0f} s")


def hf_config(recipe: BuildRecipe) -> dict:
    """The Hugging Face config.json of the default model."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": recipe.vocab_size, "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_layers, "num_attention_heads": recipe.num_heads,
        "num_key_value_heads": recipe.num_heads,
        "head_dim": recipe.hidden_size // recipe.num_heads, "hidden_act": "silu",
        "max_position_embeddings": recipe.max_position_embeddings, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "initializer_range": 0.02, "torch_dtype": "float32", "use_cache": True,
    }


def save_hf_dir(model, recipe: BuildRecipe, tokenizer_model: bytes, hf_dir: Path) -> None:
    """Writes the Hugging Face directory: weights, config and SentencePiece tokenizer files."""
    from models.checkpoint import save_safetensors

    save_safetensors(model, hf_config(recipe), hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(tokenizer_model)
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer", **SPECIAL_TOKENS, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
        "legacy": False, "clean_up_tokenization_spaces": False,
        "model_max_length": recipe.max_position_embeddings, "chat_template": CHAT_TEMPLATE,
    }
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                  "max_length": recipe.max_position_embeddings}
    for name, content in (("tokenizer_config.json", tokenizer_config),
                          ("special_tokens_map.json", SPECIAL_TOKENS),
                          ("generation_config.json", generation)):
        (hf_dir / name).write_text(json.dumps(content, indent=2) + "\n")


def _report(recipe: BuildRecipe, corpus: Corpus, model, result, num_train_tokens: int,
            num_held_out_tokens: int) -> dict:
    return {
        "params": model.config.num_parameters,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "train_loss": round(result.train_loss, 4),
        "held_out_loss": round(result.held_out_loss, 4),
        "uniform_baseline_loss": round(math.log(recipe.vocab_size), 4),
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_seen / result.seconds),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "backend": result.backend,
        "corpus": {"source": corpus.source, "python": platform.python_version(),
                   "train_files": len(corpus.train_texts),
                   "held_out_files": corpus.held_out_names,
                   "train_tokens": num_train_tokens, "held_out_tokens": num_held_out_tokens},
        "recipe": asdict(recipe),
    }


def load_report(model_dir: str | os.PathLike) -> dict:
    """training_report.json of a built default model (its `model/` or `hf/` directory)."""
    return json.loads((Path(model_dir) / REPORT_FILE).read_text())


__all__ = ["BuildRecipe", "build_default_model", "default_model_root",
           "ensure_default_model", "hf_config", "is_complete", "load_report"]
