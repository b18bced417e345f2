"""ember batch against hostile lines: each bad line gets the 4xx body the server gives, nothing
a line holds stops the run (every line answered, on every rerun), and the CLI's key comes
from EMBER_API_KEY with no empty output left by an early failure."""

import sqlite3

import pytest

from engine import LLM
from engine.batch.job import open_batch, run_batch
from engine.cli import main
from engine.metering import Ledger
from tests.engine.batch.test_batch import CLI_ENGINE, ENGINE, MODEL, read_output, write_lines
from tests.hf_models import build_hf_model

OK = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 3, "temperature": 0}


def line(custom_id, url="/v1/completions", **fields):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {**OK, **fields}}


def raw_line(custom_id, body_json):
    """A line whose body is given as JSON text (escapes kept as written)."""
    return ('{"custom_id": "%s", "method": "POST", "url": "/v1/completions", "body": %s}'
            % (custom_id, body_json))


DEEP = "[" * 900 + "]" * 900
# (the line, its custom_id in the output, status, error code, error param)
HOSTILE = [
    (line("top-k", top_k=2 ** 31), "top-k", 400, "invalid_value", "top_k"),
    (line("seed", seed=2 ** 64), "seed", 400, "invalid_value", "seed"),
    (line("rep", repetition_penalty=1e-300), "rep", 400, "invalid_value", "repetition_penalty"),
    (line("top-p", top_p=1e-50), "top-p", 400, "invalid_value", "top_p"),
    (line("stop-id", stop_token_ids=[2 ** 31]), "stop-id", 400, "invalid_value",
     "stop_token_ids"),
    (line("min-tokens", min_tokens=9), "min-tokens", 400, "invalid_value", "min_tokens"),
    (line("n", n=2 ** 31), "n", 400, "invalid_value", "n"),
    (raw_line("prompt", '{"prompt": "a\\ud800"}'), "prompt", 400, "invalid_encoding", "prompt"),
    (raw_line("chat", '{"messages": [{"role": "user", "content": "\\udfff"}]}'), "chat", 400,
     "invalid_encoding", "messages[0].content"),
    (raw_line("stop", '{"prompt": "x", "stop": ["a", "\\ud800"]}'), "stop", 400,
     "invalid_encoding", "stop[1]"),
    (raw_line("\\ud800", '{"prompt": "x"}'), "line-11", 400, "invalid_encoding", "custom_id"),
    ('{"custom_id": "url", "method": "POST", "url": "/v1/\\ud800", "body": {}}', "url", 400,
     "invalid_encoding", "url"),
    (raw_line("nan", '{"prompt": "x", "temperature": NaN}'), "line-13", 400, "invalid_json",
     None),
    (raw_line("deep", '{"prompt": "x", "max_tokens": 2, "junk": %s}' % DEEP), "deep", 200,
     None, None),
    (line("ok"), "ok", 200, None, None),
    ({"custom_id": "chat-ok", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 3}}, "chat-ok", 200, None, None),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_hf_model("llama", tmp_path_factory.mktemp("hostile") / MODEL)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, **ENGINE)


def test_hostile_lines_get_their_error_lines_and_every_run_finishes(llm, tmp_path):
    input_path = write_lines(tmp_path / "in.jsonl", [case[0] for case in HOSTILE])
    for rerun in (False, True):
        files = open_batch(input_path, tmp_path / "out.jsonl")
        summary = run_batch(llm.engine, files, model_name=MODEL, progress=False)
        files.close()
        expected_ok = sum(case[2] == 200 for case in HOSTILE)
        assert (summary.succeeded, summary.failed, summary.skipped) == (
            (0, 0, len(HOSTILE)) if rerun else (expected_ok, len(HOSTILE) - expected_ok, 0))
    output = read_output(tmp_path / "out.jsonl")    # each line whole, UTF-8, JSON, once
    assert sorted(output) == sorted(case[1] for case in HOSTILE)
    for _, custom_id, status, code, param in HOSTILE:
        response = output[custom_id]["response"]
        assert response["status_code"] == status, (custom_id, response)
        if status != 200:
            error = response["body"]["error"]
            assert (error["code"], error["param"]) == (code, param), (custom_id, error)
        else:
            assert response["body"]["usage"]["completion_tokens"] > 0


def cli(tmp_path, *extra, model_dir=None):
    arguments = ["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                 "--db", f"sqlite:///{tmp_path / 'ledger.db'}", "--no-progress", *CLI_ENGINE]
    return main(arguments + (["--model", str(model_dir)] if model_dir else []) + list(extra))


@pytest.mark.parametrize("flags,env_key,message", [
    ((), "ember-not-a-key", "EMBER_API_KEY: not a key of this ledger"),
    (("--api-key", "ember-not-a-key"), None, "--api-key: not a key of this ledger"),
    (("--account", "nobody"), "ember-not-a-key", "--account='nobody': no such key"),
])
def test_an_unknown_key_fails_in_one_line_and_leaves_no_output(flags, env_key, message,
                                                                tmp_path, monkeypatch, capsys):
    if env_key is None:
        monkeypatch.delenv("EMBER_API_KEY", raising=False)
    else:
        monkeypatch.setenv("EMBER_API_KEY", env_key)
    write_lines(tmp_path / "in.jsonl", [line("a")])
    assert cli(tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ember batch: error: {message}"), err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_bad_input_file_leaves_no_output(tmp_path, capsys):
    assert cli(tmp_path) == 2     # in.jsonl does not exist
    assert "No such file" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_the_key_in_ember_api_key_is_billed(model_dir, tmp_path, monkeypatch):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        key, secret = ledger.create_key("team-env")
    monkeypatch.setenv("EMBER_API_KEY", secret)
    write_lines(tmp_path / "in.jsonl", [line("a"), line("b", top_k=2 ** 31)])
    assert cli(tmp_path, "--served-model-name", MODEL, model_dir=model_dir) == 0
    output = read_output(tmp_path / "out.jsonl")
    assert output["b"]["response"]["body"]["error"]["param"] == "top_k"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        (usage,) = ledger.usage(key.id)
        anonymous = ledger.usage(ledger.anonymous_key().id)
    usage_a = output["a"]["response"]["body"]["usage"]
    assert (usage.requests, usage.completion_tokens) == (1, usage_a["completion_tokens"])
    assert not anonymous or anonymous[0].requests == 0


def test_a_line_the_engine_fails_is_an_error_line_and_the_others_are_answered(
        llm, tmp_path, monkeypatch):
    from tests.engine.test_failure_isolation import inject_fault

    marker = 317   # in no other line: their prompts are text of a 320-token vocabulary
    lines = [line("a"), line("poisoned", prompt=[5, 6, marker]), line("b", prompt="x = 1")]
    expected = {}
    files = open_batch(write_lines(tmp_path / "clean.jsonl", [lines[0], lines[2]]),
                       tmp_path / "clean-out.jsonl")
    run_batch(llm.engine, files, model_name=MODEL, progress=False)
    files.close()
    for custom_id, answer in read_output(tmp_path / "clean-out.jsonl").items():
        expected[custom_id] = answer["response"]["body"]["choices"]

    failures = inject_fault(monkeypatch, llm.engine.runner, marker, "host")
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        files = open_batch(write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl")
        summary = run_batch(llm.engine, files, model_name=MODEL, ledger=ledger,
                            key=ledger.anonymous_key(), progress=False)
        files.close()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        billed = sorted(row[0] for row in db.execute("SELECT id FROM requests"))
    assert failures and (summary.succeeded, summary.failed) == (2, 1)
    output = read_output(tmp_path / "out.jsonl")
    error = output["poisoned"]["response"]
    assert error["status_code"] == 500
    assert error["body"]["error"]["code"] == "internal_error"
    assert "injected" not in str(error)   # no internals
    for custom_id in ("a", "b"):
        assert output[custom_id]["response"]["body"]["choices"] == expected[custom_id]
    answered = [output[c]["response"]["request_id"] for c in ("a", "b")]
    assert billed == sorted(answered)   # the failed line, like every error line, is unbilled
