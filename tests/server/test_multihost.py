"""Multi-host serving: two real `ember serve` processes on 127.0.0.1 (jax.distributed, gloo CPU
collectives), each with 4 fake CPU devices, serve one model split 8 ways. Greedy answers
equal a single-process, single-device run; a killed follower turns /health to 503 and fails
requests instead of hanging them; SIGTERM to the leader stops the follower too."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from engine import LLM, SamplingParams
from engine.cli import main
from engine.structured import StructuredOutput
from tests.hf_models import build_hf_model
from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["hello world", "0123456789", "the cat sat on"]
MAX_TOKENS = 12
ENGINE_FLAGS = ["--max-model-len", "128", "--num-pages", "64", "--max-num-seqs", "2",
                "--max-num-batched-tokens", "16", "--shutdown-timeout", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 8 query heads and an MLP width of 128 split 8 ways; the 2 kv heads are repeated.
    return build_hf_model("llama", tmp_path_factory.mktemp("multihost") / "llama",
                          num_attention_heads=8)


class Pair:
    """A leader (process 0, HTTP) and a follower (process 1) of one 8-device mesh."""

    def __init__(self, model_dir: Path, home: Path, *extra: str):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "EMBER_HOME": str(home),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        self.port = free_port()
        common = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model_dir),
                  "--no-auth", "--coordinator-address", f"127.0.0.1:{free_port()}",
                  "--num-processes", "2", *ENGINE_FLAGS, *extra]
        self.logs = [open(home / f"process{i}.log", "w") for i in range(2)]
        self.leader = subprocess.Popen(
            [*common, "--process-id", "0", "--port", str(self.port),
             "--db", f"sqlite:///{home / 'ledger.db'}"], cwd=ROOT, env=env,
            stdout=self.logs[0], stderr=subprocess.STDOUT)
        self.follower = subprocess.Popen([*common, "--process-id", "1"], cwd=ROOT, env=env,
                                         stdout=self.logs[1], stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.leader.poll() is None and self.follower.poll() is None, self.log()
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):   # not up, or a busy CI host
                pass
            time.sleep(0.2)
        raise AssertionError(f"no healthy server within {timeout} s\n{self.log()}")

    def complete(self, prompt: str, timeout: float = 60.0) -> requests.Response:
        return requests.post(self.url + "/v1/completions", timeout=timeout, json={
            "model": "llama", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": 1})

    def log(self) -> str:
        for log in self.logs:
            log.flush()
        return "\n".join((Path(log.name).read_text()[-3000:]) for log in self.logs)

    def close(self) -> None:
        for process in (self.follower, self.leader):
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in self.logs:
            log.close()


@pytest.fixture
def new_pair(model_dir, tmp_path):
    pairs = []

    def start(*extra: str) -> Pair:
        home = tmp_path / f"pair{len(pairs)}"
        home.mkdir()
        pairs.append(Pair(model_dir, home, *extra))
        return pairs[-1]

    yield start
    for pair in pairs:
        pair.close()


def test_two_processes_answer_as_one_device_and_stop_together(model_dir, new_pair):
    pair = new_pair()
    llm = LLM(model_dir, warmup=False)
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                    logprobs=1))
    regex = "[a-f]{2,5}-[0-9]{2}"   # the bitmask goes to the follower with the sampler
    (constrained,) = llm.generate(PROMPTS[0], SamplingParams(
        temperature=0, max_tokens=40, structured_output=StructuredOutput.regex(regex)))
    pair.wait_healthy()
    response = requests.post(pair.url + "/v1/completions", timeout=60, json={
        "model": "llama", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0,
        "guided_regex": regex})
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    assert text == constrained.outputs[0].text and re.fullmatch(regex, text)
    penalties = dict(repetition_penalty=1.3, presence_penalty=0.6, frequency_penalty=0.5)
    (penalised,) = llm.generate(PROMPTS[1], SamplingParams(   # token counts kept per process
        temperature=0, max_tokens=MAX_TOKENS, **penalties))
    response = requests.post(pair.url + "/v1/completions", timeout=60, json={
        "model": "llama", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0,
        **penalties})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == penalised.outputs[0].text
    for prompt, reference in zip(PROMPTS, expected):
        response = pair.complete(prompt)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"] == reference.outputs[0].text
        logprobs = [entry[token] for entry, token in zip(reference.outputs[0].logprobs,
                                                         reference.outputs[0].token_ids)]
        got = choice["logprobs"]["token_logprobs"]
        assert got == pytest.approx([lp.logprob for lp in logprobs], abs=1e-4)
    pair.leader.send_signal(signal.SIGTERM)
    assert pair.leader.wait(timeout=30) == 0, pair.log()
    assert pair.follower.wait(timeout=30) == 0, pair.log()


def test_a_lost_follower_fails_requests_and_health_not_hangs(new_pair):
    pair = new_pair("--no-warmup")
    pair.wait_healthy()
    assert pair.complete(PROMPTS[0]).status_code == 200
    pair.follower.kill()
    pair.follower.wait()
    started = time.monotonic()
    response = pair.complete(PROMPTS[1], timeout=30)
    assert response.status_code >= 500, response.text
    assert time.monotonic() - started < 30
    health = requests.get(pair.url + "/health", timeout=5)
    assert health.status_code == 503
    deadline = time.monotonic() + 30   # "recovering" until the recovery fails: the mesh is gone
    while True:
        refused = pair.complete(PROMPTS[2], timeout=10)
        assert refused.status_code == 503, refused.text
        if "failed" in refused.json()["error"]["message"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "failed" in refused.json()["error"]["message"]


@pytest.mark.parametrize("flags, message", [
    (["--coordinator-address", "127.0.0.1:1"], "multi-host serving needs all three"),
    (["--num-processes", "2", "--process-id", "0"], "multi-host serving needs all three"),
    (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "expected --num-processes >= 2 and 0 <= --process-id < --num-processes"),
])
def test_incomplete_multihost_flags_are_refused_before_anything_starts(flags, message,
                                                                       model_dir, capsys):
    assert main(["serve", "--model", str(model_dir), *flags]) == 2
    assert message in capsys.readouterr().err


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[003-004]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_distributed_takes_the_processes_from_the_cluster(monkeypatch, model_dir, capsys):
    from pallas_kernels.compat import detect_cluster
    for name in [*SLURM, "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"]:
        monkeypatch.delenv(name, raising=False)
    assert detect_cluster() == (None, None, None)
    assert main(["serve", "--model", str(model_dir), "--distributed"]) == 2
    assert "--distributed: no cluster environment found" in capsys.readouterr().err
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    address, count, process_id = detect_cluster()
    assert address.startswith("node003:") and (count, process_id) == (2, 1)
    # Detected values fill only the flags not given: here a rank the job does not have.
    assert main(["serve", "--model", str(model_dir), "--distributed", "--process-id", "5"]) == 2
    assert "0 <= --process-id < --num-processes" in capsys.readouterr().err


def test_a_hung_follower_fails_requests_after_the_step_timeout(new_pair):
    pair = new_pair("--step-timeout", "4")   # warmed up: no step compiles
    pair.wait_healthy()
    assert pair.complete(PROMPTS[0]).status_code == 200
    pair.follower.send_signal(signal.SIGSTOP)   # alive, holding its sockets, never answering
    try:
        started = time.monotonic()
        response = pair.complete(PROMPTS[0], timeout=60)
        assert response.status_code == 503, response.text
        assert "step timeout" in response.json()["error"]["message"]
        assert time.monotonic() - started < 20
        assert requests.get(pair.url + "/health", timeout=5).status_code == 503
        refused = pair.complete(PROMPTS[2], timeout=10)
        assert refused.status_code == 503, refused.text
    finally:
        pair.follower.send_signal(signal.SIGCONT)
