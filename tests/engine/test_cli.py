"""`ember` commands given a --model that is not a model directory: one line naming the flag
and what was wrong, exit code 2, nothing loaded and no output file left behind."""

import pytest

from engine.cli import main

CASES = [
    (["generate", "hello"], "no such file or directory", "missing"),
    (["generate", "hello"], "expected a model directory with a config.json, or a .gguf file", "empty"),
    (["serve", "--port", "0"], "no such file or directory", "missing"),
    (["serve", "--port", "0"], "expected a model directory with a config.json, or a .gguf file", "empty"),
    (["batch", "IN", "OUT"], "no such file or directory", "missing"),
]


@pytest.mark.parametrize("command, message, kind", CASES)
def test_a_model_path_that_is_no_model_is_one_line(command, message, kind, tmp_path, capsys):
    model = tmp_path / "model"
    if kind == "empty":
        model.mkdir()
    (tmp_path / "in.jsonl").write_text("")
    argv = [str(tmp_path / "in.jsonl") if a == "IN" else str(tmp_path / "out.jsonl")
            if a == "OUT" else a for a in command]
    assert main([*argv, "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ember {command[0]}: error: --model={str(model)!r}: {message}"]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", [["generate", "hello"], ["convert", "MODEL", "OUT"]])
def test_a_damaged_gguf_is_one_line(command, tmp_path, capsys):
    model = tmp_path / "broken.gguf"
    model.write_bytes(b"GGUF" + bytes(20))   # a header cut short
    argv = [str(model) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a
            for a in command]
    extra = [] if command[0] == "convert" else ["--model", str(model)]
    assert main([*argv, *extra]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ember {command[0]}: error: ") and "broken.gguf" in line
