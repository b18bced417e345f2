"""The default-model builder, on a shrunken corpus and recipe so the suite stays fast.

The full build (about five minutes) is `python scripts/build_default_model.py`; these tests
run the same code path with a ~20k-parameter model, a few dozen files and a 3 s budget.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from engine.default_model import build as default_model
from engine.default_model.build import (HF_SUBDIR, MODEL_SUBDIR, BuildRecipe, build_default_model,
                                        default_model_root, ensure_default_model, is_complete,
                                        load_report)
from engine.default_model.training import BOS_ID, Corpus, load_corpus, train_tokenizer

TINY = BuildRecipe(train_seconds=3, vocab_size=512, hidden_size=32, intermediate_size=64,
                   num_layers=1, num_heads=2, max_position_embeddings=128, seq_len=32,
                   batch_size=4, eval_windows=8)


@pytest.fixture(scope="module")
def small_corpus() -> Corpus:
    corpus = load_corpus()
    return Corpus(corpus.source, corpus.train_texts[:60], corpus.held_out_texts[:3],
                  corpus.held_out_names[:3])


@pytest.fixture(scope="module")
def built_root(small_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ember_home") / "default-model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(default_model, "load_corpus", lambda: small_corpus)
        build_default_model(root, TINY, progress=False)
    return root


def test_default_model_root_follows_ember_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert default_model_root() == tmp_path / "default-model"
    monkeypatch.delenv("EMBER_HOME")
    assert default_model_root() == Path("~/.cache/ember/default-model").expanduser()


def test_tokenizer_round_trips_code_exactly(small_corpus):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=train_tokenizer(small_corpus, 512, 0))
    code = ("class A:\n    def f(self, x):\n\t\treturn {'é': x ** 10}  # ☃ \n\n\n"
            "        pass\r\n")
    for text in [code] + small_corpus.held_out_texts:
        assert processor.decode(processor.encode(text)) == text
    pieces = {processor.id_to_piece(index) for index in range(processor.get_piece_size())}
    assert "▁▁▁▁" in pieces  # indentation is one token, not four


def test_build_is_complete_loadable_and_reported(built_root):
    from models.checkpoint import load_model

    assert is_complete(built_root)
    assert not list(built_root.parent.glob(".default-model.*"))  # no staging dirs left
    model = load_model(built_root / MODEL_SUBDIR)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16), dtype=np.int32)
    tokens[:, 0] = BOS_ID
    assert model.forward_dense(tokens).shape == (2, 16, TINY.vocab_size)
    report = load_report(built_root / MODEL_SUBDIR)
    assert report["params"] == TINY.model_config().num_parameters
    assert report["uniform_baseline_loss"] == pytest.approx(math.log(TINY.vocab_size), abs=1e-4)
    assert report["held_out_loss"] < report["uniform_baseline_loss"]
    assert report["tokens_seen"] == report["steps"] * TINY.batch_size * TINY.seq_len > 0


def test_ensure_reuses_a_complete_build(built_root):
    report_file = built_root / MODEL_SUBDIR / "training_report.json"
    before = report_file.stat().st_mtime_ns
    assert ensure_default_model(progress=False, root=built_root) == built_root / MODEL_SUBDIR
    assert report_file.stat().st_mtime_ns == before


def test_failed_build_leaves_nothing(small_corpus, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "load_corpus", lambda: small_corpus)
    monkeypatch.setattr(default_model, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_default_model(tmp_path / "default-model", TINY, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["default-model.lock"]


def test_build_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a default-model build"):
        build_default_model(tmp_path, TINY, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_transformers_reads_the_hf_directory_as_we_do(built_root, small_corpus):
    transformers = pytest.importorskip("transformers")
    import sentencepiece as spm

    hf_dir = built_root / HF_SUBDIR
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    processor = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    text = small_corpus.held_out_texts[0][:3000]
    assert tokenizer(text)["input_ids"] == [BOS_ID] + processor.encode(text)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "sort a list"}],
                                         tokenize=False, add_generation_prompt=True)
    assert chat == "<s># user:\nsort a list\n# assistant:\n"
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
