"""Replicas on one ledger: two real `ember serve` processes sharing one PostgreSQL database
(tests/postgres.py). A key's quota holds across both under concurrent requests, with one row
per admitted request and none per refusal; a replica killed with SIGKILL mid-stream and
restarted marks interrupted only its own rows, never the live replica's."""

import signal
import threading
import time

import pytest
import requests

from tests.server.conftest import MAX_MODEL_LEN, auth
from tests.server.test_billing_crash import RawStream

BODY = {"model": "tiny-llama", "prompt": "0123456789", "max_tokens": 20, "ignore_eos": True}
STREAM = {**BODY, "max_tokens": MAX_MODEL_LEN - 32, "stream": True, "logprobs": 0}
REQUESTS_PER_REPLICA = 12


@pytest.fixture(scope="module")
def replicas(postgres, new_replica):
    """Two servers on one fresh database, booted side by side."""
    url = postgres.new_database()
    pair = [new_replica(url), new_replica(url)]
    for replica in pair:
        replica.start(wait=False)
    for replica in pair:
        replica.wait_healthy()
    yield pair
    for replica in pair:
        replica.stop()


def _wait_for(condition, what: str, timeout: float = 60.0, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def _post_at_once(replicas, key: str) -> list[tuple[int, requests.Response]]:
    """REQUESTS_PER_REPLICA completions to each replica, all sent at the same moment;
    returns (replica index, response) per request."""
    count = REQUESTS_PER_REPLICA * len(replicas)
    barrier, answers = threading.Barrier(count), [None] * count

    def post(i: int) -> None:
        replica = replicas[i % len(replicas)]
        barrier.wait()
        answers[i] = (i % len(replicas), requests.post(
            replica.base_url + "/v1/completions", json=BODY, headers=auth(key), timeout=120))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    return answers


@pytest.mark.parametrize("limits, allowed", [
    (dict(rpm=5), 5),
    (dict(tpm=150), 5),             # each request reserves 10 prompt + 20 output tokens
    (dict(tokens_per_day=210), 7),
])
def test_a_key_quota_holds_across_replicas_under_concurrent_requests(replicas, limits,
                                                                      allowed):
    name, key = replicas[0].create_key(**limits)
    answers = _post_at_once(replicas, key)
    refused = [response for _, response in answers if response.status_code != 200]
    assert len(answers) - len(refused) == allowed, [r.text for r in refused[:3]]
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    # Exactly one row per 200, each under the replica that answered it; none per 429.
    served = {response.headers["X-Request-Id"]: replica for replica, response in answers
              if response.status_code == 200}
    rows = replicas[0].rows("key_id = (SELECT id FROM keys WHERE name = ?)", (name,))
    assert sorted(row["id"] for row in rows) == sorted(served)
    assert {(row["status"], row["prompt_tokens"], row["completion_tokens"]) for row in rows} == {
        ("completed", 10, 20)}
    replica_of_instance = {}
    for row in rows:
        replica_of_instance.setdefault(row["instance"], set()).add(served[row["id"]])
    assert all(len(replica) == 1 for replica in replica_of_instance.values())


def test_a_replica_killed_mid_stream_marks_only_its_own_rows_on_restart(replicas):
    killed, live = replicas
    _, key = killed.create_key()
    finished = [requests.post(replica.base_url + "/v1/completions", json=BODY,
                              headers=auth(key), timeout=60).headers["X-Request-Id"]
                for replica in replicas]
    instances = [killed.row(request_id)["instance"] for request_id in finished]
    doomed = [RawStream(killed, key, STREAM) for _ in range(8)]   # --max-num-seqs 8
    spared = [RawStream(live, key, STREAM) for _ in range(8)]
    _wait_for(lambda: all(any(stream.events >= 2 for stream in streams)
                          for streams in (doomed, spared)), "first tokens", poll_s=0.005)
    # Both replicas are paused mid-stream, so their rows hold still: then one is killed, and
    # the other stays paused (alive, its lease fresh: it lapses after 15 s) until the killed
    # one has restarted and swept the ledger, so that its rows are running rows then.
    for replica in replicas:
        replica.signal(signal.SIGSTOP)
    try:
        time.sleep(0.2)   # the bytes sent before the pause arrive
        running = [{row["id"] for row in killed.rows("instance = ? AND status = 'running'",
                                                     (instance,))} for instance in instances]
        assert all(running), f"no stream was running on each replica: {running}"
        killed.signal(signal.SIGKILL)
        killed.proc.wait(30)
        killed.log.close()
        killed.start(wait=False)
        _wait_for(lambda: {killed.row(request_id)["status"] for request_id in running[0]} == {
            "interrupted"}, "the restarted replica to mark its predecessor's rows")
        assert {live.row(request_id)["status"] for request_id in running[1]} == {"running"}
        assert {live.row(request_id)["status"] for request_id in finished} == {"completed"}
    finally:
        live.signal(signal.SIGCONT)
    for stream in spared:
        stream.thread.join(120)
        row = live.row(stream.request_id)
        assert stream.done and stream.tokens == STREAM["max_tokens"]
        assert (row["status"], row["completion_tokens"]) == ("completed", stream.tokens)
    for stream in doomed:
        stream.thread.join(30)
        if stream.request_id in running[0]:
            assert killed.row(stream.request_id)["completion_tokens"] <= stream.tokens
    killed.wait_healthy()
    again = requests.post(killed.base_url + "/v1/completions", json=BODY, headers=auth(key),
                          timeout=60)
    assert again.status_code == 200, again.text
    assert killed.row(again.headers["X-Request-Id"])["status"] == "completed"
