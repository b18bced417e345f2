"""ember batch: a 200-line round trip equal to the engine's own outputs, the server's bodies,
kill -9 and resume (exactly once, no torn line, same contents, billed once), bad lines,
duplicate custom_ids and the ledger's batch billing."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.batch.job import open_batch, run_batch
from engine.batch.lines import default_seed
from engine.cli import main
from engine.metering import Ledger
from tests.hf_models import build_hf_model

ROOT = Path(__file__).resolve().parents[3]
MODEL = "tiny-llama"
ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=128, page_size=16, num_pages=160,
              max_model_len=256, warmup=False)
PRICE = (1.0, 0.25, 4.0)   # USD per million input, cached input, output tokens
WORDS = "def class return import yield lambda for while with async await self None".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_hf_model("llama", tmp_path_factory.mktemp("batch") / MODEL)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, **ENGINE)


def words(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def random_line(rng, index, shared):
    """A random completions or chat request; some share a prefix, some sample."""
    body = {"model": MODEL, "max_tokens": rng.randint(1, 12), "ignore_eos": rng.random() < 0.5,
            "temperature": rng.choice([0.0, 0.0, 0.8])}
    if rng.random() < 0.5:
        body["seed"] = rng.randrange(2 ** 31)
    if rng.random() < 0.3:
        url = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": words(rng, 2, 8)}]
        if rng.random() < 0.3:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
    else:
        url = "/v1/completions"
        prompts = [(shared if rng.random() < 0.5 else "") + words(rng, 1, 10)
                   for _ in range(rng.choice([1, 1, 1, 2]))]
        body["prompt"] = prompts if len(prompts) > 1 else prompts[0]
        body["n"] = rng.choice([1, 1, 2])
        if rng.random() < 0.3:
            body.update(logprobs=rng.randint(0, 2), echo=rng.random() < 0.5)
    return {"custom_id": f"req-{index}", "method": "POST", "url": url, "body": body}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def read_output(path):
    """{custom_id: line}, checking each custom_id appears once and every line is whole."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = [json.loads(line) for line in data.decode().splitlines()]   # a line per \n
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


def without_run_fields(line):
    """The line minus what may differ between runs: created and cached_tokens."""
    line = json.loads(json.dumps(line))
    body = line["response"]["body"]
    body.pop("created", None)
    if body.get("usage"):
        body["usage"].pop("prompt_tokens_details")
    return line


def assert_same_json(expected, got, where="line"):
    """Equal JSON, floats within 1e-5 (logprobs move in the last bits with the batch)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(expected), where
        for name in expected:
            assert_same_json(expected[name], got[name], f"{where}.{name}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for index, (want, have) in enumerate(zip(expected, got)):
            assert_same_json(want, have, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), where
    else:
        assert got == expected, where


def engine_expectation(llm, line):
    """(prompts, SamplingParams) the engine should run for a line, built by hand."""
    body, tokenizer = line["body"], llm.get_tokenizer()
    fields = dict(n=body.get("n", 1), max_tokens=body["max_tokens"],
                  temperature=body["temperature"], ignore_eos=body["ignore_eos"],
                  seed=body.get("seed", default_seed(line["custom_id"])))
    if "messages" in body:
        if body.get("logprobs"):
            fields["logprobs"] = body["top_logprobs"]
        ids = tokenizer.apply_chat_template(body["messages"], tokenize=True)
        return [{"prompt_token_ids": ids}], SamplingParams(**fields)
    if "logprobs" in body:
        fields["logprobs"] = body["logprobs"]
        if body.get("echo"):
            fields["prompt_logprobs"] = body["logprobs"]
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    return prompts, SamplingParams(**fields)


def run_billed(llm, tmp_path, lines):
    """Runs `lines` (in.jsonl -> out.jsonl under tmp_path) through the engine, billed to a new
    key on a ledger (tmp_path/ledger.db) pricing MODEL at PRICE; returns the summary."""
    files = open_batch(write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl")
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.set_price(MODEL, *PRICE)
        key, _ = ledger.create_key("team-a")
        summary = run_batch(llm.engine, files, model_name=MODEL, ledger=ledger, key=key,
                            progress=False)
        files.close()
    return summary


def test_200_lines_round_trip_equal_the_engine_outputs(llm, tmp_path):
    rng = random.Random(11)
    shared = words(rng, 30, 30) + " "
    lines = [random_line(rng, i, shared) for i in range(200)]
    rng.shuffle(lines)
    summary = run_billed(llm, tmp_path, lines)
    rows = {row["id"]: row for row in _ledger_rows(tmp_path / "ledger.db")}
    assert (summary.succeeded, summary.failed, summary.billed) == (200, 0, 200)
    output = read_output(tmp_path / "out.jsonl")
    assert sorted(output) == sorted(line["custom_id"] for line in lines)
    assert llm.engine.stats().prefix_cache_hit_rate > 0

    # The same prompts and params through LLM.generate, all at once (seeded sampling draws
    # the same tokens whatever shares the batch).
    source = {line["custom_id"]: line for line in lines}
    planned = {custom_id: engine_expectation(llm, line) for custom_id, line in source.items()}
    flat = [(custom_id, prompt, params) for custom_id, (prompts, params) in planned.items()
            for prompt in prompts]
    generated = llm.generate([prompt for _, prompt, _ in flat], [p for _, _, p in flat],
                             use_tqdm=False)
    expected = {}
    for (custom_id, _, _), out in zip(flat, generated):
        expected.setdefault(custom_id, []).append(out)
    for custom_id, line in output.items():
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None
        assert response["body"]["id"] == response["request_id"]
        usage = response["body"]["usage"]
        assert_body_matches(response["body"], expected[custom_id], source[custom_id]["body"])
        row = rows[response["request_id"]]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"], cached, usage["completion_tokens"])
        full_price = ((usage["prompt_tokens"] - cached) * PRICE[0] + cached * PRICE[1]
                      + usage["completion_tokens"] * PRICE[2]) / 1e6
        assert row["cost"] == pytest.approx(full_price * 0.5)
        assert row["status"] == "completed" and row["key_name"] == "team-a"


def _ledger_rows(db_path):
    import sqlite3
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(
            "SELECT requests.*, keys.name AS key_name FROM requests "
            "JOIN keys ON keys.id = requests.key_id")]


def assert_body_matches(body, outs, request):
    """The body's choices and usage are the engine's outputs for the same prompts."""
    samples = [(out, sample) for out in outs for sample in out.outputs]
    assert len(body["choices"]) == len(samples)
    for choice, (out, sample) in zip(body["choices"], samples):
        if "message" in choice:
            assert choice["message"]["content"] == sample.text
        else:
            assert choice["text"] == (out.prompt if request.get("echo") else "") + sample.text
        assert choice["finish_reason"] == sample.finish_reason
        if sample.logprobs is not None:
            expected = [entry[token].logprob for token, entry in zip(sample.token_ids,
                                                                    sample.logprobs)]
            if "message" in choice:
                got = [entry["logprob"] for entry in choice["logprobs"]["content"]]
            else:
                got = choice["logprobs"]["token_logprobs"][-len(expected):]
            assert got == pytest.approx(expected, abs=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(o.usage.prompt_tokens for o in outs)
    assert body["usage"]["completion_tokens"] == sum(o.usage.completion_tokens for o in outs)


def test_bodies_equal_what_the_server_answers(llm, model_dir, tmp_path):
    import server
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.serving.service import start_service

    rng = random.Random(12)
    lines = [random_line(rng, i, "shared words " * 4) for i in range(10)]
    bad_bodies = [{"prompt": "x", "temperature": 5}, {"prompt": "x", "model": "other"},
                  {"prompt": "x" * 300, "max_tokens": 8}, {"messages": []},
                  {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
                  {"prompt": [5, 999]}]
    lines += [{"custom_id": f"bad-{i}", "method": "POST",
               "url": "/v1/chat/completions" if "messages" in body else "/v1/completions",
               "body": body} for i, body in enumerate(bad_bodies)]
    for line in lines:   # the server draws a random seed when a body names none
        line["body"].setdefault("seed", default_seed(line["custom_id"]))
    files = open_batch(write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl")
    run_batch(llm.engine, files, model_name=MODEL, progress=False)
    files.close()
    output = read_output(tmp_path / "out.jsonl")

    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        service = start_service(LLMEngine(model_dir, EngineConfig(**ENGINE)), ledger,
                                model_name=MODEL, no_auth=True)
        app = server.create_app(service)
        try:
            while service.engine.state == "warming":
                time.sleep(0.05)
            client = app.test_client()
            for line in lines:
                answer = client.post(line["url"], json=line["body"])
                response = output[line["custom_id"]]["response"]
                assert response["status_code"] == answer.status_code
                expected = answer.get_json()
                if answer.status_code == 200:
                    assert expected["id"] != response["body"]["id"]   # ids differ; all else same
                    expected["id"] = response["body"]["id"]
                    assert_same_json(without_run_fields({"response": {"body": expected}}),
                                     without_run_fields({"response": {"body": response["body"]}}))
                else:
                    assert response["body"] == expected
        finally:
            service.close()


CLI_ENGINE = ["--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--max-model-len", "256",
              "--num-pages", "64"]


def start_cli(model_dir, input_path, output_path, db_path):
    command = [sys.executable, "-m", "engine.cli", "batch", str(input_path), str(output_path),
               "--model", str(model_dir), "--served-model-name", MODEL, "--account", "team-a",
               "--db", f"sqlite:///{db_path}", "--no-progress", *CLI_ENGINE]
    # EMBER_HOME is inherited: the XLA cache is shared, so only the first start compiles.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def new_ledger(db_path):
    with Ledger(f"sqlite:///{db_path}") as ledger:
        ledger.set_price(MODEL, *PRICE)
        ledger.create_key("team-a")


def count_lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def writing_seconds(proc, output_path) -> float:
    """Waits for a whole run; returns how long it wrote lines (its first to its last)."""
    first = last = None
    count = 0
    while proc.poll() is None:
        now, new_count = time.monotonic(), count_lines(output_path)
        if new_count > count:
            first, last, count = first or now, now, new_count
        time.sleep(0.005)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return (last - first) if first is not None else 0.0


def kill_at_random(model_dir, input_path, output_path, db_path, rng, writing):
    """Starts the batch and kill -9s it after a random number of new lines, or a random
    delay after its first new line (a share of `writing`, how long a whole run wrote lines:
    timed from start-up, which a first run's compiles and kernel build lengthen, a faster
    engine's kills would land after the end); returns the line count it died at (None: it
    finished first). Sometimes then leaves a torn line behind, as a write cut short would."""
    before = count_lines(output_path)
    proc = start_cli(model_dir, input_path, output_path, db_path)
    delay = rng.uniform(0.0, 1.0) * writing
    target = before + rng.randint(1, 6)
    by_time = rng.random() < 0.3
    deadline = None
    while proc.poll() is None:
        count = count_lines(output_path)
        if deadline is None and count > before:
            deadline = time.monotonic() + delay
        due = deadline is not None and time.monotonic() >= deadline
        if due if by_time else count >= target:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.005)
    else:
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        return None
    proc.stderr.close()
    died_at = count_lines(output_path)
    data = output_path.read_bytes() if output_path.exists() else b""
    if data and rng.random() < 0.6:   # a torn write: part of a line, no newline
        line = rng.choice(data.splitlines())
        with open(output_path, "ab") as file:
            file.write(line[:rng.randrange(1, len(line))])
    return died_at


def test_kill_9_at_random_moments_then_resume_is_exactly_once(model_dir, tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": words(rng, 2, 12),
                       "max_tokens": rng.randint(48, 96), "ignore_eos": True,
                       "temperature": rng.choice([0.0, 0.9]),
                       **({"seed": rng.randrange(1000)} if rng.random() < 0.5 else {})}}
             for i in range(36)]
    lines.insert(7, '{"custom_id": "broken", "method": "POST", "url": ')
    lines.insert(20, {"custom_id": "too-hot", "method": "POST", "url": "/v1/completions",
                      "body": {"model": MODEL, "prompt": "x", "temperature": 3}})
    input_path = write_lines(tmp_path / "in.jsonl", lines)
    new_ledger(tmp_path / "reference.db")
    reference = start_cli(model_dir, input_path, tmp_path / "reference.jsonl",
                          tmp_path / "reference.db")
    writing = writing_seconds(reference, tmp_path / "reference.jsonl")

    def mid_file(died):
        return died is not None and 0 < died < len(lines)

    output, db, deaths = tmp_path / "killed.jsonl", tmp_path / "killed-0.db", []
    new_ledger(db)
    # At least 4 kills; more (up to 8) until one lands mid-file: output comes in bursts of
    # finished requests, so a kill can miss the middle on a fast or a loaded machine.
    while len(deaths) < 4 or (len(deaths) < 8 and not any(map(mid_file, deaths))):
        deaths.append(kill_at_random(model_dir, input_path, output, db, rng, writing))
        if deaths[-1] is None and not any(map(mid_file, deaths)):
            # The run ended before its kill fired (a timed kill, drawn from the reference
            # run's pace, can outlast a faster run), so the file is whole and no later kill
            # could land in it: start over with a fresh file and ledger.
            output.unlink()
            db = tmp_path / f"killed-{len(deaths)}.db"
            new_ledger(db)
    final = start_cli(model_dir, input_path, output, db)
    assert final.wait() == 0, final.stderr.read().decode()[-2000:]
    assert any(map(mid_file, deaths)), f"{deaths=} {seed=}"

    expected, got = read_output(tmp_path / "reference.jsonl"), read_output(output)
    assert sorted(got) == sorted(expected) and len(got) == len(lines), f"{seed=}"
    for custom_id, line in expected.items():
        assert without_run_fields(got[custom_id]) == without_run_fields(line), f"{seed=}"
    assert got["line-8"]["response"]["body"]["error"]["code"] == "invalid_json"
    # Billed exactly once: one row per successful line, with that line's usage.
    rows = {row["id"]: row for row in _ledger_rows(db)}
    billed = {line["response"]["request_id"]: line["response"]["body"]["usage"]
              for line in got.values() if line["response"]["status_code"] == 200}
    assert sorted(rows) == sorted(billed) and len(billed) == len(lines) - 2
    for request_id, usage in billed.items():
        row = rows[request_id]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"], cached, usage["completion_tokens"])
        assert row["cost"] == pytest.approx(0.5 * ((usage["prompt_tokens"] - cached) * PRICE[0]
                                                   + cached * PRICE[1]
                                                   + usage["completion_tokens"] * PRICE[2]) / 1e6)
    assert sorted(rows) == sorted(r["id"] for r in _ledger_rows(tmp_path / "reference.db"))


def test_malformed_lines_get_error_lines_and_are_not_billed(llm, tmp_path):
    ok = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4}
    lines = ["{not json", "[1, 2]",
             {"method": "POST", "url": "/v1/completions", "body": ok},
             {"custom_id": "", "method": "POST", "url": "/v1/completions", "body": ok},
             {"custom_id": "route", "method": "POST", "url": "/v1/embeddings", "body": ok},
             {"custom_id": "method", "method": "GET", "url": "/v1/completions", "body": ok},
             {"custom_id": "no-body", "method": "POST", "url": "/v1/completions"},
             {"custom_id": "list-body", "method": "POST", "url": "/v1/completions",
              "body": [ok]},
             {"custom_id": "stream", "method": "POST", "url": "/v1/completions",
              "body": {**ok, "stream": True}},
             {"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": ok}]
    files = open_batch(write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl")
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        key = ledger.anonymous_key()
        summary = run_batch(llm.engine, files, model_name=MODEL, ledger=ledger, key=key,
                            progress=False)
        files.close()
        assert ledger.usage(key.id)[0].requests == 1
    assert (summary.succeeded, summary.failed, summary.billed) == (1, 9, 1)
    output = read_output(tmp_path / "out.jsonl")
    errors = {custom_id: (line["response"]["status_code"], line["response"]["body"]["error"])
              for custom_id, line in output.items() if custom_id != "ok"}
    assert {custom_id: (status, error["code"], error["param"])
            for custom_id, (status, error) in errors.items()} == {
        "line-1": (400, "invalid_json", None), "line-2": (400, "invalid_json", None),
        "line-3": (400, "invalid_value", "custom_id"),
        "line-4": (400, "invalid_value", "custom_id"),
        "route": (404, "not_found", None), "method": (405, "method_not_allowed", None),
        "no-body": (400, "invalid_value", "body"), "list-body": (400, "invalid_json", None),
        "stream": (400, "unsupported_parameter", "stream")}
    assert errors["route"][1]["message"] == "no route POST /v1/embeddings"
    assert errors["list-body"][1]["message"] == "body is a JSON list: expected an object"
    assert output["ok"]["response"]["status_code"] == 200


def test_duplicate_custom_id_fails_before_any_work(model_dir, tmp_path, capsys):
    line = {"custom_id": "same", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": "x"}}
    other = {**line, "custom_id": "other"}
    input_path = write_lines(tmp_path / "in.jsonl", [other, line, other, "{bad", line])
    output = tmp_path / "out.jsonl"
    started = time.perf_counter()
    code = main(["batch", str(input_path), str(output), "--model", str(model_dir),
                 "--db", f"sqlite:///{tmp_path / 'ledger.db'}"])
    assert code == 2 and time.perf_counter() - started < 5.0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ember batch: error: custom_id='other' appears on line 1 and line 3: "
                   "expected each custom_id once"]
    assert not output.exists() and not (tmp_path / "ledger.db").exists()


def test_lines_written_but_not_billed_are_billed_on_resume_once(llm, tmp_path):
    rng = random.Random(13)
    lines = [random_line(rng, i, "") for i in range(12)]
    input_path = write_lines(tmp_path / "in.jsonl", lines)
    files = open_batch(input_path, tmp_path / "out.jsonl")
    run_batch(llm.engine, files, model_name=MODEL, progress=False)   # killed before billing
    files.close()
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        key, _ = ledger.create_key("team-a")
        for expected_billed in (12, 0):
            files = open_batch(input_path, tmp_path / "out.jsonl")
            summary = run_batch(llm.engine, files, model_name=MODEL, ledger=ledger, key=key,
                                progress=False)
            files.close()
            assert (summary.skipped, summary.succeeded, summary.billed) == (12, 0,
                                                                             expected_billed)
        output = read_output(tmp_path / "out.jsonl")
        usage = ledger.usage(key.id)[0]
    assert usage.requests == 12
    assert usage.completion_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"]
                                          for line in output.values())


def test_a_resume_killed_while_it_bills_leaves_nothing_unbilled(llm, tmp_path, monkeypatch):
    # 12 lines written, none billed; the resume bills them 5 a transaction and dies after its
    # first. Billing the newest first, the next resume found that chunk billed and stopped:
    # the 7 older lines were never billed.
    rng = random.Random(17)
    input_path = write_lines(tmp_path / "in.jsonl", [random_line(rng, i, "") for i in range(12)])
    files = open_batch(input_path, tmp_path / "out.jsonl")
    run_batch(llm.engine, files, model_name=MODEL, progress=False)   # killed before billing
    files.close()
    monkeypatch.setattr("engine.batch.job.RECONCILE_CHUNK", 5)
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        key, _ = ledger.create_key("team-a")
        bill = ledger.record_finished

        def bill_then_die(*args, **kwargs):
            billed = bill(*args, **kwargs)
            raise KeyboardInterrupt(f"killed after billing {billed}")

        monkeypatch.setattr(ledger, "record_finished", bill_then_die)
        files = open_batch(input_path, tmp_path / "out.jsonl")
        with pytest.raises(KeyboardInterrupt):
            run_batch(llm.engine, files, model_name=MODEL, ledger=ledger, key=key,
                      progress=False)
        files.close()
        monkeypatch.setattr(ledger, "record_finished", bill)
        assert ledger.usage(key.id)[0].requests == 5
        files = open_batch(input_path, tmp_path / "out.jsonl")
        summary = run_batch(llm.engine, files, model_name=MODEL, ledger=ledger, key=key,
                            progress=False)
        files.close()
        assert summary.billed == 7
        assert ledger.usage(key.id)[0].requests == 12


def test_output_recovery_drops_only_a_torn_last_line(tmp_path):
    from engine.batch.jsonl import OutputFile

    whole = [json.dumps({"id": f"batch_req_{i}", "custom_id": f"c{i}",
                         "response": {"status_code": 200, "request_id": f"cmpl-{i}",
                                      "body": {"text": "é" * i}}, "error": None}).encode()
             + b"\n" for i in range(5)]
    path = tmp_path / "out.jsonl"
    for torn in (whole[4][:-1], whole[4][:17], b'{"id": "batch_req_9", "custom_id": "c9"}x\n'):
        path.write_bytes(b"".join(whole[:4]) + torn)
        with OutputFile(path) as output:
            assert [line.custom_id for line in output.finished] == ["c0", "c1", "c2", "c3"]
            assert output.read_line(output.finished[3])["response"]["body"]["text"] == "ééé"
            with pytest.raises(ValueError, match="another `ember batch` is writing"):
                OutputFile(path)
        assert path.read_bytes() == b"".join(whole[:4])
    path.write_bytes(whole[0] + b"garbage\n" + whole[1])
    with pytest.raises(ValueError, match="line 2 is not a JSON line"):
        OutputFile(path)


def test_ledger_bills_a_batch_request_once_at_the_discount(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.set_price(MODEL, *PRICE)
        key, _ = ledger.create_key("team-a")
        ledger.admit("running-1", key, MODEL, estimated_tokens=50)
        usages = [("new-1", 100, 20, 7), ("running-1", 30, 0, 9), ("new-2", 5, 5, 1)]
        assert ledger.record_finished(key, MODEL, usages, discount=0.25) == [
            "new-1", "running-1", "new-2"]
        assert ledger.record_finished(key, MODEL, usages, discount=0.25) == []
        assert not ledger.finalize("running-1", "completed", 1, 0, 1)
        row = ledger.usage(key.id)[0]
        assert (row.requests, row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
            3, 135, 25, 17)
        assert row.cost == pytest.approx(0.75 * (110 * PRICE[0] + 25 * PRICE[1]
                                                 + 17 * PRICE[2]) / 1e6)
        for discount in (-0.1, 1.5, True):
            with pytest.raises(ValueError, match="discount="):
                ledger.record_finished(key, MODEL, [("x", 1, 0, 1)], discount=discount)
        with pytest.raises(ValueError, match="cached_tokens="):
            ledger.record_finished(key, MODEL, [("y", 1, 2, 1)])
        ledger.revoke_key("team-a")
        with pytest.raises(PermissionError):
            ledger.record_finished(ledger.get_key("team-a"), MODEL, [("z", 1, 0, 1)])
