"""`ember batch`: an OpenAI Batch API file through one LLMEngine, resumable and exactly once.

    files = open_batch("in.jsonl", "out.jsonl")     # reads both; checks custom_ids first
    summary = run_batch(engine, files, model_name="ember-default", ledger=ledger, key=key)

Every pending line is submitted to the engine at once and continuously batched (shared
prefixes hit the prefix cache); each finished request is appended to the output as one line
and, once a second, the output is fsync'd and the lines written since are billed in the
ledger at the batch price, in one transaction. Output lines follow the order in which
requests finish, as OpenAI's do.

Exactly once, across kills: the output is append-only (see engine/batch/jsonl.py); on start,
lines already in it are skipped. Billing follows writing, so the lines not yet billed are
always the last ones written; on start, `reconcile` walks back from the end of the output
and bills those (an id the ledger already holds as final is never billed again). See
engine/batch/lines.py for the deterministic ids and seeds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.batch import lines as br
from engine.batch.jsonl import OutputFile, read_input_lines
from engine.openai.api import ApiError, Limits

logger = logging.getLogger(__name__)
RECONCILE_CHUNK = 512     # output lines checked against the ledger per query, newest first
COMMIT_INTERVAL_S = 1.0   # how often the output is fsync'd and its new lines billed


@dataclass(slots=True)
class BatchFiles:
    """An input file's requests and the (locked, recovered) output file."""

    requests: list[br.BatchRequest]
    output: OutputFile

    @property
    def pending(self) -> list[br.BatchRequest]:
        done = {line.custom_id for line in self.output.finished}
        return [request for request in self.requests if request.custom_id not in done]

    def close(self) -> None:
        self.output.close()


@dataclass(slots=True, frozen=True)
class BatchSummary:
    total: int               # lines in the input
    skipped: int             # finished by an earlier run
    succeeded: int
    failed: int              # answered with an error body
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    billed: int              # ledger rows billed by this run (reconciled ones included)


def open_batch(input_path: str | Path, output_path: str | Path) -> BatchFiles:
    """Reads the input and recovers the output, before any model is loaded.

    Raises:
      ValueError: a repeated custom_id (naming both lines), an output held by another
        process, or an output line whose custom_id is not in the input (another batch's file).
      OSError: a file cannot be read or written.
    """
    requests = br.parse_input(read_input_lines(input_path))
    output = OutputFile(output_path)
    known = {request.custom_id for request in requests}
    stranger = next((line for line in output.finished if line.custom_id not in known), None)
    if stranger is not None:
        output.close()
        raise ValueError(f"{output_path}: custom_id={stranger.custom_id!r} is not in "
                         f"{input_path}: expected the output of this input file")
    return BatchFiles(requests, output)


def reconcile(output: OutputFile, ledger: Any, key: Any, model_name: str,
              discount: float) -> int:
    """Bills the successful output lines a killed run wrote but did not bill; returns how many.

    Billing follows writing, so those are always the newest lines. They are found from the
    end backwards, a chunk at a time, up to the newest line the ledger holds as final, then
    billed oldest first, a transaction per chunk: a run killed in between leaves the lines
    still unbilled the newest ones, which the next run finds the same way.
    """
    lines = [line for line in output.finished if line.status_code == 200 and line.request_id]
    start = len(lines)
    while start > 0:
        chunk = lines[max(0, start - RECONCILE_CHUNK):start]
        final = ledger.final_ids([line.request_id for line in chunk])
        if final:
            start -= len(chunk) - max(i for i, line in enumerate(chunk)
                                      if line.request_id in final) - 1
            break
        start -= len(chunk)
    billed = 0
    for first in range(start, len(lines), RECONCILE_CHUNK):
        usages = []
        for line in lines[first:first + RECONCILE_CHUNK]:
            usage = output.read_line(line)["response"]["body"]["usage"]
            usages.append((line.request_id, usage["prompt_tokens"],
                           usage["prompt_tokens_details"]["cached_tokens"],
                           usage["completion_tokens"]))
        billed += len(ledger.record_finished(key, model_name, usages, discount=discount))
    return billed


def run_batch(engine: Any, files: BatchFiles, *, model_name: str, ledger: Any = None,
              key: Any = None, discount: float = 0.5, progress: bool = True) -> BatchSummary:
    """Runs every pending line of `files` through `engine`, appending one output line each.

    Args:
      engine: an LLMEngine with no requests of its own in flight.
      model_name: the name bodies must carry in "model" and responses report (as
        `ember serve --served-model-name`).
      ledger, key: bill each successful request to `key` (None: no billing).
      discount: fraction taken off the ledger's price for batch requests.
      progress: show a tqdm bar (requests done, tokens/s, ETA).
    """
    run = _Run(engine, files, model_name, ledger, key, discount)
    if ledger is not None:
        run.billed = reconcile(files.output, ledger, key, model_name, discount)
    pending = files.pending
    run.bar = tqdm(total=len(files.requests), initial=len(files.requests) - len(pending),
                   desc="batch", unit="req", disable=not progress, smoothing=0.1)
    try:
        run.submit(pending)
        while engine.has_unfinished_requests():
            run.step()
    finally:
        run.commit()
        run.bar.close()
    return BatchSummary(len(files.requests), len(files.requests) - len(pending),
                        run.succeeded, run.failed, run.prompt_tokens, run.completion_tokens,
                        time.perf_counter() - run.start, run.billed)


class _Run:
    """One run_batch call: the jobs in flight, what was written, and what is to be billed."""

    def __init__(self, engine, files: BatchFiles, model_name: str, ledger, key,
                 discount: float):
        self.engine, self.files, self.ledger, self.key = engine, files, ledger, key
        self.discount = discount
        self.limits = Limits(model_name)
        self.info = engine.model_info()
        self.in_flight: dict[str, tuple[br.BatchJob, int]] = {}
        self.unbilled: list[tuple[str, int, int, int]] = []
        self.start = self.last_commit = time.perf_counter()
        self.succeeded = self.failed = self.prompt_tokens = self.completion_tokens = 0
        self.billed = 0
        self.bar: tqdm | None = None

    def submit(self, pending: list[br.BatchRequest]) -> None:
        """Adds every valid line's prompts to the engine; writes the others' error lines."""
        errors, created = [], int(time.time())
        account = self.key.name if self.key is not None else "-"
        for request in pending:
            ids = br.batch_ids(account, self.limits.model_name, request)
            try:
                job = br.plan_job(request, ids, self.info, self.limits, created)
                self._add(job)
            except ApiError as error:
                errors.append(br.error_line(request, ids, error))
            except Exception:  # noqa: BLE001 - nothing a line holds may stop the run
                # What the server answers an unexpected failure; the traceback goes to the log.
                logger.exception("batch line %d (custom_id=%r) failed", request.line_no,
                                 request.custom_id)
                errors.append(br.error_line(request, ids, internal_error(ids)))
        self.files.output.append(errors)
        self.failed += len(errors)
        self.bar.update(len(errors))

    def _add(self, job: br.BatchJob) -> None:
        added = []
        try:
            for index, prompt in enumerate(job.prepared.prompts):
                request_id = f"batch-{job.request.line_no}-{index}"
                self.engine.add_request(request_id, prompt.as_engine_prompt(),
                                        job.prepared.params)
                added.append(request_id)
                self.in_flight[request_id] = (job, index)
        except Exception as error:   # none of the line's prompts may stay in flight
            for request_id in added:
                self.engine.abort(request_id)
                del self.in_flight[request_id]
            if isinstance(error, ValueError):   # answered as the server's engine_error does
                raise ApiError(400, str(error)[:300], code="invalid_value") from None
            raise

    def step(self) -> None:
        """One engine step; finished lines are written at once, committed once a second."""
        finished = []
        for output in self.engine.step(final_only=True):
            if output.finished and output.request_id in self.in_flight:
                job, index = self.in_flight.pop(output.request_id)
                job.outputs[index] = output
                if all(o is not None for o in job.outputs):
                    finished.append(job)
        if finished:
            self.files.output.append([self._answer(job) for job in finished])
            # A line the engine failed is an error line, unbilled like every error line
            # (reconcile bills only 200 lines, so a resumed run agrees).
            answered = [job for job in finished if not _engine_failed(job)]
            for job in answered:
                usage = job.usage
                self.unbilled.append((job.ids.request_id, usage.prompt_tokens,
                                      usage.cached_tokens, usage.completion_tokens))
                self.prompt_tokens += usage.prompt_tokens
                self.completion_tokens += usage.completion_tokens
            self.failed += len(finished) - len(answered)
            self.succeeded += len(answered)
            rate = ((self.prompt_tokens + self.completion_tokens)
                    / max(time.perf_counter() - self.start, 1e-9))
            self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
            self.bar.update(len(finished))
        if time.perf_counter() - self.last_commit >= COMMIT_INTERVAL_S:
            self.commit()

    @staticmethod
    def _answer(job: br.BatchJob) -> bytes:
        if _engine_failed(job):
            logger.error("batch line %d (custom_id=%r): the engine failed it",
                         job.request.line_no, job.request.custom_id)
            return br.error_line(job.request, job.ids, internal_error(job.ids))
        return br.success_line(job)

    def commit(self) -> None:
        """fsyncs the output, then bills the lines written since the last commit, in one
        ledger transaction (so what is billed has been written, and the unbilled lines are
        always the newest)."""
        self.files.output.sync()
        if self.ledger is not None and self.unbilled:
            self.billed += len(self.ledger.record_finished(
                self.key, self.limits.model_name, self.unbilled, discount=self.discount))
        self.unbilled = []
        self.last_commit = time.perf_counter()


def internal_error(ids: br.BatchIds) -> ApiError:
    """What the server answers a request it failed inside: no internals, the request id."""
    return ApiError(500, f"internal server error (request {ids.request_id})",
                    type="server_error", code="internal_error")


def _engine_failed(job: br.BatchJob) -> bool:
    # finish_reason "error": the engine could not run this request (LLMEngine.step_failures).
    return any(sample.finish_reason == "error" for output in job.outputs
               for sample in output.outputs)
