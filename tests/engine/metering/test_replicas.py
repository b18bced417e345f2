"""Replicas on one ledger: two Ledgers (two instances, two connection pools, two in-process
locks, as two server processes have) admitting for one key at the same moment never take
more than its limit, and each admitted request id gets exactly one row, under the replica
that admitted it; an id both replicas admit and finalise at once gets one row, billed once."""

import random
import threading

import pytest
import sqlalchemy as sa

from engine.metering import Ledger, schema

THREADS_PER_REPLICA = 8
ATTEMPTS_PER_THREAD = 8


def _hammer(replicas, key, estimates):
    """Every thread of every replica tries its share of `estimates` at once; returns
    {request_id: (replica index, estimate, allowed)}."""
    barrier = threading.Barrier(len(replicas) * THREADS_PER_REPLICA)
    outcomes, errors = {}, []

    def admit(replica: int, thread: int):
        ledger = replicas[replica]
        barrier.wait()
        try:
            for attempt in range(ATTEMPTS_PER_THREAD):
                request_id = f"r{replica}-t{thread}-{attempt}"
                estimate = estimates[request_id]
                decision = ledger.try_admit(request_id, key, "llama", estimate)
                outcomes[request_id] = (replica, estimate, decision.allowed)
        except Exception as error:  # noqa: BLE001 - reported below, with the thread
            errors.append(error)

    threads = [threading.Thread(target=admit, args=(replica, thread))
               for replica in range(len(replicas)) for thread in range(THREADS_PER_REPLICA)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(outcomes) == len(estimates)
    return outcomes


@pytest.mark.parametrize("limits", [{"rpm": 7}, {"tpm": 4000}, {"tokens_per_day": 4000},
                                    {"rpm": 30, "tpm": 3000}])
def test_two_replicas_admitting_at_once_never_exceed_a_key_limit(empty_db_url, limits):
    rng = random.Random(20250401 + len(str(limits)))
    with Ledger(empty_db_url, instance="replica-a") as first, \
            Ledger(empty_db_url, instance="replica-b") as second:
        key, _ = first.create_key("team-a", **limits)
        estimates = {f"r{replica}-t{thread}-{attempt}": rng.randrange(50, 700)
                     for replica in range(2) for thread in range(THREADS_PER_REPLICA)
                     for attempt in range(ATTEMPTS_PER_THREAD)}
        outcomes = _hammer([first, second], key, estimates)
        with first._db.connect() as conn:
            rows = conn.execute(sa.select(schema.requests.c.id, schema.requests.c.instance,
                                          schema.requests.c.reserved_tokens)).all()

    admitted = {rid: outcome for rid, outcome in outcomes.items() if outcome[2]}
    # One row per admitted request, under its replica's name; none for a refused one.
    assert sorted(row.id for row in rows) == sorted(admitted)
    names = ("replica-a", "replica-b")
    assert {row.id: (row.instance, row.reserved_tokens) for row in rows} == {
        rid: (names[replica], estimate) for rid, (replica, estimate, _) in admitted.items()}
    # Within the limits, and no refusal that would have fitted: what was taken only grows,
    # so a refused request still does not fit on top of the final total (nothing has left
    # the 60 s window: the test takes a few seconds).
    taken = sum(estimate for _, estimate, _ in admitted.values())
    assert _fits(len(admitted), taken, limits)
    for _, estimate, allowed in outcomes.values():
        assert allowed or not _fits(len(admitted) + 1, taken + estimate, limits)


def _fits(requests: int, tokens: int, limits: dict) -> bool:
    token_limit = limits.get("tpm") or limits.get("tokens_per_day")
    return requests <= limits.get("rpm", requests) and (token_limit is None
                                                        or tokens <= token_limit)


def test_one_request_id_sent_to_both_replicas_gets_one_row_billed_once(empty_db_url):
    rng = random.Random(20250402)
    ids = [f"req-{i}" for i in range(20)]
    with Ledger(empty_db_url, instance="replica-a") as first, \
            Ledger(empty_db_url, instance="replica-b") as second:
        key, _ = first.create_key("team-a", rpm=1000)
        counts = {request_id: (rng.randrange(1, 500), rng.randrange(1, 500))
                  for request_id in ids}
        barrier, won, billed, refused = threading.Barrier(2), {}, {}, []

        def serve(ledger):
            barrier.wait()
            for request_id in ids:
                try:
                    if ledger.try_admit(request_id, key, "llama", 1000).allowed:
                        won.setdefault(request_id, []).append(ledger.instance)
                except ValueError as error:   # the other replica admitted it first
                    refused.append(str(error))
                prompt, completion = counts[request_id]
                if ledger.finalize(request_id, "completed", prompt, 0, completion):
                    billed.setdefault(request_id, []).append(ledger.instance)

        threads = [threading.Thread(target=serve, args=(ledger,)) for ledger in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        rows = first.usage(key.id)[0]
        with first._db.connect() as conn:
            instances = dict(conn.execute(sa.select(schema.requests.c.id,
                                                    schema.requests.c.instance)).all())
    assert sorted(won) == sorted(billed) == sorted(ids)
    assert len(refused) == len(ids) and all("already in the ledger" in r for r in refused)
    assert all(len(winners) == 1 for winners in won.values())
    assert all(len(billers) == 1 for billers in billed.values())
    assert instances == {request_id: winners[0] for request_id, winners in won.items()}
    assert (rows.requests, rows.prompt_tokens, rows.completion_tokens) == (
        len(ids), sum(p for p, _ in counts.values()), sum(c for _, c in counts.values()))
