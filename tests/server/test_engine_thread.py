"""The engine thread and the app in-process around a hand-computable fake engine (JetStream's
mock-engine idea): an engine that fails on one request fails only that request, answers 500
without internals, bills it as 'error', and keeps serving; while the engine recovers from a
step that raised, /health answers 503, and 200 again once it serves."""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time

import pytest

from engine.info import EngineStats, ModelInfo
from engine.metering import Ledger
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.serving.engine_thread import EngineThread, StepStalled, Unavailable
from engine.tokenizer import Tokenizer

POISON = 7   # a prompt holding this token id makes the fake engine's step raise
CULPRIT = 8  # a prompt holding this one fails alone (as LLMEngine isolates a request)


class FakeEngine:
    """Each step appends token (prompt length + position) to every request, up to max_tokens."""

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.tenants: dict[str, str] = {}
        self.is_recovering = False
        self.step_failures: dict[str, Exception] = {}
        # None: recover() succeeds at once; else each call takes its outcome from here
        # (an exception to raise, or None), blocking until the test provides one.
        self.recover_outcomes: queue.Queue | None = None

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.tokenizer, 320, 256, SamplingParams())

    def add_request(self, request_id, prompt, params, priority=0, *, tenant=""):
        if prompt["prompt_token_ids"] == [1, 1, 1]:
            raise RuntimeError("add_request crashed (internal detail)")
        self.requests[request_id] = (prompt["prompt_token_ids"], params, [])
        self.tenants[request_id] = tenant

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def is_waiting(self, request_id: str) -> bool:
        return False  # every request is scheduled at its first step

    def _output(self, request_id: str, finish_reason: str | None) -> RequestOutput:
        prompt, params, tokens = self.requests[request_id]
        return RequestOutput(request_id, None, prompt, [CompletionOutput(
            0, "".join(chr(65 + t % 26) for t in tokens), list(tokens),
            finish_reason=finish_reason)], finished=finish_reason is not None)

    def step(self) -> list[RequestOutput]:
        self.step_failures = {}
        if any(POISON in prompt for prompt, _, _ in self.requests.values()):
            raise RuntimeError("kernel exploded (internal detail)")
        outputs = []
        for request_id, (prompt, params, tokens) in list(self.requests.items()):
            if CULPRIT in prompt:
                self.step_failures[request_id] = RuntimeError("culprit (internal detail)")
                outputs.append(self._output(request_id, "error"))
                del self.requests[request_id]
                continue
            tokens.append(len(prompt) + len(tokens))
            done = len(tokens) >= params.max_tokens
            outputs.append(self._output(request_id, "length" if done else None))
            if done:
                del self.requests[request_id]
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        if request_id not in self.requests:
            return None
        output = self._output(request_id, "abort")
        del self.requests[request_id]
        return output

    def recover(self) -> None:
        if self.recover_outcomes is not None:
            outcome = self.recover_outcomes.get(timeout=10)
            if outcome is not None:
                raise outcome

    def stats(self) -> EngineStats:
        return EngineStats(len(self.requests), 0, 10, 0.0, 0.0, 0, 0)


class Collect:
    def __init__(self):
        self.outputs, self.errors = [], []

    def on_scheduled(self, request_id, when):
        pass

    def on_output(self, output, when):
        self.outputs.append(output)

    def on_error(self, request_id, error, when):
        self.errors.append(error)

    def wait(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not (self.errors or (self.outputs and self.outputs[-1].finished)):
            assert time.monotonic() < deadline
            time.sleep(0.005)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def started_thread(engine: FakeEngine) -> EngineThread:
    thread = EngineThread(engine, max_queue=4).start()
    wait_for(lambda: thread.state == "ready")
    return thread


def test_a_failing_step_fails_its_requests_and_the_thread_goes_on():
    thread = started_thread(FakeEngine())
    thread.reserve(2)
    poisoned, bystander = Collect(), Collect()
    thread.add("a", {"prompt_token_ids": [POISON, 3]}, SamplingParams(max_tokens=3), poisoned)
    thread.add("b", {"prompt_token_ids": [4, 5]}, SamplingParams(max_tokens=3), bystander)
    poisoned.wait()
    bystander.wait()
    assert poisoned.errors and bystander.errors   # one step held both: both failed
    wait_for(lambda: thread.state == "ready")      # recovered
    thread.reserve(1)
    healthy = Collect()
    thread.add("c", {"prompt_token_ids": [4, 5, 6]}, SamplingParams(max_tokens=4), healthy)
    healthy.wait()
    assert healthy.outputs[-1].outputs[0].token_ids == [3, 4, 5, 6]
    assert thread.num_pending == 0
    thread.request_stop(0)
    assert thread.join(5)


def test_a_request_the_engine_fails_alone_gets_its_error_and_the_others_go_on():
    engine = FakeEngine()
    thread = started_thread(engine)
    thread.reserve(2)
    culprit, bystander = Collect(), Collect()
    thread.add("a", {"prompt_token_ids": [CULPRIT, 3]}, SamplingParams(max_tokens=3), culprit,
               tenant="17")
    thread.add("b", {"prompt_token_ids": [4, 5]}, SamplingParams(max_tokens=3), bystander,
               tenant="18")
    culprit.wait()
    bystander.wait()
    assert [str(e) for e in culprit.errors] == ["culprit (internal detail)"]
    assert not culprit.outputs
    assert not bystander.errors and bystander.outputs[-1].outputs[0].token_ids == [2, 3, 4]
    assert engine.tenants == {"a": "17", "b": "18"}
    assert thread.state == "ready" and thread.num_pending == 0
    thread.request_stop(0)
    assert thread.join(5)


class HangingEngine(FakeEngine):
    """Its steps wait for `release` (a multi-host follower that hangs, as the leader sees it)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def step(self) -> list[RequestOutput]:
        self.release.wait(30)
        return super().step()


def test_a_step_past_the_timeout_fails_its_requests_without_waiting_for_it():
    engine = HangingEngine()
    thread = EngineThread(engine, max_queue=4, step_timeout=0.3).start()
    wait_for(lambda: thread.state == "ready")
    thread.reserve(2)
    first, second = Collect(), Collect()
    thread.add("a", {"prompt_token_ids": [3]}, SamplingParams(max_tokens=2), first)
    thread.add("b", {"prompt_token_ids": [4]}, SamplingParams(max_tokens=2), second)
    first.wait()
    second.wait()
    assert [type(e) for e in first.errors + second.errors] == [StepStalled, StepStalled]
    assert "step timeout" in str(first.errors[0]) and not first.outputs
    assert thread.state == "failed" and thread.num_pending == 0
    with pytest.raises(Unavailable, match="failed"):
        thread.reserve(1)
    engine.release.set()   # the step ends after all: its requests leave the engine
    wait_for(lambda: thread.state == "ready" and not engine.requests)
    assert not first.outputs and not second.outputs   # failed once, never answered after
    thread.reserve(1)
    healthy = Collect()
    thread.add("c", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=2), healthy)
    healthy.wait()
    assert healthy.outputs[-1].outputs[0].token_ids == [1, 2] and not healthy.errors


def test_state_reads_recovering_while_the_engine_isolates_a_failed_step():
    engine = FakeEngine()
    thread = started_thread(engine)
    engine.is_recovering = True
    assert thread.state == "recovering"
    with pytest.raises(Unavailable, match="recovering"):
        thread.reserve(1)
    engine.is_recovering = False
    assert thread.state == "ready"
    thread.reserve(1)
    thread.release(1)
    thread.request_stop(0)
    assert thread.join(5)


@pytest.fixture()
def app_and_ledger(server_model_dir, tmp_path):
    from engine.serving.service import start_service
    from server import create_app

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    service = start_service(FakeEngine(Tokenizer.from_pretrained(server_model_dir)), ledger,
                            model_name="fake")
    app = create_app(service)
    while service.engine.state != "ready":
        time.sleep(0.01)
    yield app, ledger, tmp_path / "ledger.db", service
    service.close()


def test_engine_failure_is_a_500_without_internals_and_billed_as_error(app_and_ledger):
    app, ledger, db_path, _ = app_and_ledger
    _, key = ledger.create_key("tester")
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    for prompt in ([POISON, 3], [1, 1, 1]):   # a step that raises; an add_request that raises
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3},
                               headers=headers)
        assert response.status_code == 500
        error = response.get_json()["error"]
        assert error["code"] == "internal_error"
        assert response.headers["X-Request-Id"] in error["message"]
        assert b"RuntimeError" not in response.data and b"internal detail" not in response.data
    ok = client.post("/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 4},
                     headers=headers)
    assert ok.status_code == 200
    body = json.loads(ok.data)
    assert body["choices"][0]["text"] == "DEFG" and body["usage"]["completion_tokens"] == 4
    stream = client.post("/v1/completions", headers=headers, json={
        "prompt": [4, 5], "max_tokens": 3, "stream": True, "stream_options": {
            "include_usage": True}})
    events = [line for line in stream.data.split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3
    with sqlite3.connect(db_path) as db:
        statuses = sorted(status for status, in db.execute("SELECT status FROM requests"))
    assert statuses == ["completed", "completed", "error", "error"]


def test_health_is_503_while_the_engine_recovers_and_200_once_it_serves(app_and_ledger):
    app, ledger, _, service = app_and_ledger
    thread, engine = service.engine, service.engine.engine
    thread.retry_seconds = 0.05
    engine.recover_outcomes = queue.Queue()
    _, key = ledger.create_key("tester")
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}

    def health() -> tuple[int, str]:
        response = client.get("/health")
        return response.status_code, json.dumps(response.get_json())

    def complete() -> int:
        return client.post("/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 4},
                           headers=headers).status_code

    assert health()[0] == 200
    assert client.post("/v1/completions", json={"prompt": [POISON, 3], "max_tokens": 3},
                       headers=headers).status_code == 500
    # The step raised: the engine thread is inside recover(), which waits for an outcome.
    wait_for(lambda: thread.state == "recovering")
    status, body = health()
    assert status == 503 and "recovering" in body
    assert complete() == 503
    engine.recover_outcomes.put(RuntimeError("still broken"))
    wait_for(lambda: thread.state == "failed")
    status, body = health()
    assert status == 503 and "failed" in body
    assert complete() == 503
    engine.recover_outcomes.put(None)   # the retry succeeds
    wait_for(lambda: thread.state == "ready")
    assert health()[0] == 200
    assert complete() == 200
