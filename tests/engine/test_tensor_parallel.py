"""Tensor parallelism: the multi-device checks (tests/engine/multi_device_checks.py) in a child
process with 8 fake CPU devices, and on this session's one device the errors a user meets
before anything loads."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, EngineConfig
from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_eight_device_checks_pass_in_a_child_process():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=8").strip()}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/engine/multi_device_checks.py",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert re.search(r"\b\d+ passed", result.stdout), report
    assert not re.search(r"skipped|deselected", result.stdout), report


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_tensor_parallel_size_is_a_positive_integer(size):
    with pytest.raises(ValueError, match=f"tensor_parallel_size={size!r}: expected a positive"):
        EngineConfig(tensor_parallel_size=size)


def test_heads_that_do_not_split_are_refused(hf_model_dirs):
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of "
                                         "tensor_parallel_size=3"):
        LLM(hf_model_dirs["llama"], tensor_parallel_size=3)


def test_more_devices_than_exist_are_refused(hf_model_dirs):
    with pytest.raises(ValueError, match="tensor_parallel_size=4 but only 1 cpu devices"):
        LLM(hf_model_dirs["llama"], tensor_parallel_size=4)


@pytest.mark.parametrize("command", [["generate", "hello"], ["batch", "IN", "OUT", "--db", "DB"]])
def test_the_cli_flag_reaches_the_engine(command, hf_model_dirs, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("")
    paths = {"IN": tmp_path / "in.jsonl", "OUT": tmp_path / "out.jsonl",
             "DB": f"sqlite:///{tmp_path / 'ledger.db'}"}
    argv = [str(paths.get(a, a)) for a in command]
    assert main([*argv, "--model", str(hf_model_dirs["llama"]),
                 "--tensor-parallel-size", "2"]) == 2
    assert "tensor_parallel_size=2 but only 1 cpu devices" in capsys.readouterr().err


def test_serve_checks_the_flag_before_starting(hf_model_dirs, capsys):
    assert main(["serve", "--model", str(hf_model_dirs["llama"]), "--port", "0",
                 "--tensor-parallel-size", "0"]) == 2
    assert "tensor_parallel_size=0: expected a positive integer" in capsys.readouterr().err
