"""LLMEngine: requests in, RequestOutputs out, one continuous-batching step at a time.

    schedule -> run -> update -> detokenize and check stop strings

With async scheduling (the default) each step() schedules and launches step N+1 before it
waits for step N, then applies step N's results while N+1 runs on the device: the host's
work hides behind the device's. Outputs are the same either way (tests/engine/
test_async_scheduling.py); a request that finished at step N has its row of step N+1
discarded, never emitted nor billed.

The server drives it with add_request / step / abort; LLM.generate drives it to the end.
A step that raises is run again in halves to find the requests that fail on their own; only
those fail (finish_reason "error", listed in step_failures) and the others go on.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from pathlib import Path

import jax

import pallas_kernels
from engine.config import EngineConfig
from engine.core.output_processor import OutputProcessor, RequestGroup
from engine.core.request import Request, RequestStatus, ScheduledRequest, SchedulerOutput
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.info import EngineStats, ModelInfo
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams, is_int
from engine.structured import compiler_for
from engine.tokenizer import Tokenizer
from engine.worker import compilation
from engine.worker.runner import Runner, StepInFlight
from engine.worker.sizing import fit_max_model_len, pages_that_fit
from models.checkpoint import load_config, load_generation_config, load_model
from models.sharding import ShardingPlan

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class RequestFailed(RuntimeError):
    """The engine could not run this request; the requests that shared its step went on."""


def model_files(model: Path) -> Path:
    """The directory holding a model's config.json, tokenizer and generation config: the
    model directory itself, or for a GGUF file one written from its metadata into the cache
    ($EMBER_HOME/gguf), once per file version (path, size and modification time)."""
    if model.suffix != ".gguf" or not model.is_file():
        return model
    import hashlib
    import json
    import os
    import tempfile

    from engine.config import default_cache_dir
    from engine.tokenizer.gguf_tokenizer import write_tokenizer_files
    from models.gguf import read_gguf

    stat = model.stat()
    version = f"{model.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(version).hexdigest()[:16]
    target = default_cache_dir() / "gguf" / f"{model.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    checkpoint = read_gguf(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".staging-") as staging:
        staging = Path(staging)
        (staging / "config.json").write_text(json.dumps(checkpoint.hf_config(), indent=2))
        (staging / "generation_config.json").write_text(
            json.dumps(checkpoint.generation_config(), indent=2))
        write_tokenizer_files(model, staging)
        try:
            os.rename(staging, target)   # whole or not at all; a concurrent writer won first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


class LLMEngine:
    """Owns the scheduler, the runner and the tokenizer of one model."""

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None):
        config = config or EngineConfig()
        pallas_kernels.resolve_backend(config.backend)  # a bad name fails before any loading
        pallas_kernels.resolve_kv_cache_dtype(config.kv_cache_dtype, "float32")   # likewise
        compilation.compilations()  # start listening before anything compiles
        compilation.enable_persistent_cache(config.compilation_cache_dir)
        if model is None:
            from engine.default_model.fetch import ensure_default_model
            model = ensure_default_model()
        self.model_path = Path(model)
        self.config = config
        files = model_files(self.model_path)   # config.json, tokenizer, generation config
        self.tokenizer = Tokenizer.from_pretrained(files)
        self.generation_config = load_generation_config(files)
        scan_layers = config.scans(load_config(files).num_layers)
        # Tensor parallelism: the heads must split and the devices exist, before any loading.
        plan = (None if config.tensor_parallel_size == 1 else ShardingPlan.create(
            load_config(files, config.dtype, scan_layers=scan_layers),
            config.tensor_parallel_size))
        loaded = load_model(self.model_path, dtype=config.dtype, plan=plan,
                            scan_layers=scan_layers, quantization=config.quantization,
                            load_format=config.load_format)
        self.model_config = loaded.config if plan is None else plan.config  # the real vocab
        num_pages = config.num_pages or pages_that_fit(loaded.config, config)
        self.max_model_len = fit_max_model_len(
            config.max_model_len, loaded.config.max_position_embeddings, num_pages,
            config.page_size)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, page_size=config.page_size, num_pages=num_pages,
            enable_prefix_caching=config.enable_prefix_caching))
        self.runner = Runner(loaded, config, self.max_model_len, num_pages, plan)
        # Several hosts run each call in lockstep (engine/worker/multihost.py): one at a time.
        self.async_scheduling = config.async_scheduling and jax.process_count() == 1
        self._in_flight: StepInFlight | None = None   # launched, not yet applied
        self.output_processor = OutputProcessor(self.tokenizer)
        # Unseeded requests draw from OS entropy, unless the config asks for a repeatable run.
        self._seeds = None if config.seed is None else random.Random(config.seed)
        self.is_recovering = False   # True while a failed step is being isolated
        self.step_failures: dict[str, RequestFailed] = {}
        self.warmup_seconds = 0.0
        if config.warmup:
            start = time.perf_counter()
            self.runner.warmup()
            self.warmup_seconds = time.perf_counter() - start
        self._compilations_at_start = compilation.compilations()

    # ------------------------------------------------------------------ requests
    @property
    def compilations_after_warmup(self) -> int:
        """New compiled shapes since warm-up ended; zero while serving is the target."""
        return compilation.compilations() - self._compilations_at_start

    def stats(self) -> EngineStats:
        """The scheduler's counters and the compile count, as of the last step."""
        s = self.scheduler.stats()
        return EngineStats(s.num_running, s.num_waiting, s.num_free_pages, s.page_usage,
                           s.prefix_cache_hit_rate, s.num_preemptions,
                           self.compilations_after_warmup)

    def model_info(self) -> ModelInfo:
        """The served model: tokenizer, vocabulary, context length, default sampling."""
        return ModelInfo(self.tokenizer, self.model_config.vocab_size, self.max_model_len,
                         self.default_sampling_params())

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the defaults from generation_config.json, as vLLM applies them."""
        keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
        overrides = {k: self.generation_config[k] for k in keys if k in self.generation_config}
        if self.generation_config.get("do_sample") is False:
            overrides["temperature"] = 0.0
        return SamplingParams(**overrides)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            text = prompt.get("prompt")
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        else:
            token_ids, text = prompt, None
        if not isinstance(token_ids, (list, tuple)) or not all(
                is_int(t) for t in token_ids):
            raise ValueError(f"prompt_token_ids={str(token_ids)[:80]}: expected a list of ints")
        vocab = self.model_config.vocab_size
        for index, token in enumerate(token_ids):
            if not 0 <= token < vocab:
                raise ValueError(f"prompt_token_ids[{index}]={token}: expected an id in "
                                 f"[0, {vocab})")
        return text, list(token_ids)

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None, priority: int = 0, *,
                    tenant: str = "") -> None:
        """Queues a request (n samples share its prompt pages).

        Args:
          prompt: text, token ids, or a dict with "prompt_token_ids" or "prompt", and
            optionally "cache_salt" (a non-empty string: only requests with the same salt
            share prefix-cache pages, as in vLLM).
          tenant: the fair-share group the request belongs to (the server's API key id);
            "" for offline use.

        Raises:
          ValueError naming the field when the prompt or params cannot be served (empty
          prompt, ids outside the vocabulary, prompt + max_tokens beyond max_model_len);
          nothing is queued then.
        """
        params = params or self.default_sampling_params()
        if self.output_processor.has(request_id):
            raise ValueError(f"request_id={request_id!r} is already in use")
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        text, token_ids = self.tokenize_prompt(prompt)
        if not token_ids:
            raise ValueError("prompt: expected at least one token")
        base_seed = params.seed if params.seed is not None else self._draw_seed()
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        grammar = None if params.structured_output is None else compiler_for(
            self.tokenizer, self.model_config.vocab_size).compile(params.structured_output)
        samples = []
        for index in range(params.n):
            sample_id = request_id if params.n == 1 else f"{request_id}#{index}"
            samples.append(Request(sample_id, token_ids, params, eos_token_ids=eos,
                                   priority=priority, seed=(base_seed + index) % 2 ** 64,
                                   wait_for=None if index == 0 else samples[0].request_id,
                                   tenant=tenant, cache_salt=cache_salt,
                                   matcher=None if grammar is None else grammar.matcher()))
        self.scheduler.add_request(samples[0])  # validates before any page is taken
        for sample in samples[1:]:
            self.scheduler.add_request(sample)
        self.output_processor.add(RequestGroup(request_id, text, token_ids, params, samples))

    def _draw_seed(self) -> int:
        # OS entropy: a restart or another replica never repeats the sequence.
        return secrets.randbits(32) if self._seeds is None else self._seeds.getrandbits(32)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set(self.tokenizer.eos_token_ids)
        configured = self.generation_config.get("eos_token_id")
        ids.update(configured if isinstance(configured, list) else
                   [] if configured is None else [configured])
        return frozenset(ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request at once and frees its pages; returns its final output (usage counts
        only the tokens generated), or None for an unknown or finished id."""
        group = self.output_processor.get(request_id)
        if group is None:
            return None
        for sample in group.samples:
            if not sample.is_finished:
                self.scheduler.abort(sample.request_id)
        return self.output_processor.finish_aborted(group)

    def is_waiting(self, request_id: str) -> bool:
        """True while no sample of the request has been scheduled yet (its queue time)."""
        group = self.output_processor.get(request_id)
        return group is not None and group.samples[0].status is RequestStatus.WAITING

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ one step
    def step(self, *, final_only: bool = False) -> list[RequestOutput]:
        """Runs one scheduled step; returns an output for every request that changed
        (final_only: for every request that finished; LLM.generate and the batch runner read
        nothing else, and need no output object per running request per step).

        With async scheduling it launches the next step, then applies the one launched by
        the previous call (so the first call returns no tokens, and the last launched step
        is applied by the next call). When the model run raises, the step's requests are
        run again in halves (results dropped) to find those that fail on their own: only
        those finish, with finish_reason "error" and their error in `step_failures`; the
        others are simply scheduled again. A KV cache lost with the failure is rebuilt and
        every running request recomputes its tokens. Raises only when the engine cannot
        recover.
        """
        self.step_failures = {}
        previous, self._in_flight = self._in_flight, None
        scheduler_output = self.scheduler.schedule()
        current, failure = None, None
        if not scheduler_output.is_empty:
            try:
                current = self.runner.launch(
                    scheduler_output, self._requests_of(scheduler_output.scheduled), previous)
            except Exception as error:  # noqa: BLE001 - isolated below; the engine goes on
                self.scheduler.rollback(scheduler_output)
                failure = (scheduler_output, error)
        if previous is not None:
            failed = self._apply(previous)
            if failed is not None:   # `current` ran on its lost results: undone too
                if current is not None:
                    self.scheduler.rollback(scheduler_output)
                current, failure = None, failed
        if current is not None:
            try:   # a grammar's bitmask waited for `previous`' tokens: they are applied now
                self.runner.dispatch_sample(current)
            except Exception as error:  # noqa: BLE001 - isolated below
                self.scheduler.rollback(scheduler_output)
                current, failure = None, (scheduler_output, error)
        if current is not None and not self.async_scheduling:
            failed = self._apply(current)
            current, failure = None, failed or failure
        self._in_flight = current
        failures = [] if failure is None else self._recover_step(failure[0].scheduled,
                                                                 failure[1])
        return self.output_processor.collect(final_only) + failures

    def _apply(self, step: StepInFlight) -> tuple[SchedulerOutput, Exception] | None:
        """Waits for a launched step and applies its results; on failure undoes it and
        returns (its scheduler output, the error)."""
        try:
            model_output = self.runner.collect(step)
        except Exception as error:  # noqa: BLE001 - isolated by the caller
            self.scheduler.rollback(step.scheduler_output)
            return step.scheduler_output, error
        updated = self.scheduler.update(step.scheduler_output, model_output)
        stopped = self.output_processor.process(step.scheduler_output, model_output, updated)
        for request_id, stop_string in stopped:
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED, stop_string)
        return None

    # ------------------------------------------------------------------ failures
    def recover(self) -> None:
        """Makes the engine serve again after step() raised (the caller has aborted the
        requests it failed): rebuilds a lost KV cache. Raises when it cannot."""
        if self._in_flight is not None:   # its results may depend on the failed step's
            self.scheduler.rollback(self._in_flight.scheduler_output)
            self._in_flight = None
        self.is_recovering = True
        try:
            if self.runner.restore_kv_cache():
                self._forget_computed_kv()
        finally:
            self.is_recovering = False

    def _recover_step(self, items: tuple[ScheduledRequest, ...], error: Exception
                      ) -> list[RequestOutput]:
        logger.error("an engine step of %d requests failed (%r); isolating the failing ones",
                     len(items), error)
        # Requests that finished or were preempted since it was scheduled are left out:
        # their pages may be another's by now (a preempted one fails later if it must).
        items = tuple(item for item in items if self._is_running(item.request_id))
        self.is_recovering = True
        try:
            rebuilds = self.runner.num_kv_rebuilds
            self.runner.restore_kv_cache()
            retry_error = self._probe(items)   # the step once more, as it was
            failing = {} if retry_error is None else self._bisect(list(items), retry_error)
            outputs = [self._fail(request_id, cause) for request_id, cause in failing.items()]
            if self.runner.num_kv_rebuilds > rebuilds:
                self._forget_computed_kv()
        finally:
            self.runner.penalties.reset()   # the probes' draws are counted in them
            self.is_recovering = False
        return [output for output in outputs if output is not None]

    def _bisect(self, part: list[ScheduledRequest], error: Exception) -> dict[str, Exception]:
        """`part` of a step failed with `error`: the requests to fail, found by running its
        halves again: a lone request that fails, or a part whose halves both pass (its
        requests fail together: they cannot be told apart)."""
        if len(part) == 1:
            return {part[0].request_id: error}
        failing: dict[str, Exception] = {}
        for half in (part[:len(part) // 2], part[len(part) // 2:]):
            half_error = self._probe(half)
            if half_error is not None:
                failing.update(self._bisect(half, half_error))
        return failing or {item.request_id: error for item in part}

    def _probe(self, items) -> Exception | None:
        """Runs part of a failed step again; returns its error, None if it passed (and
        rebuilds a KV cache it lost). Results are dropped: the requests are scheduled again,
        and the KV written for them is what that run writes."""
        part = SchedulerOutput(tuple(items), sum(len(item.token_ids) for item in items))
        try:
            self.runner.execute(part, self._requests_of(part.scheduled))
        except Exception as error:  # noqa: BLE001 - the probe's purpose
            self.runner.restore_kv_cache()
            return error
        return None

    def _forget_computed_kv(self) -> None:
        # The cache's contents are gone: running requests recompute their tokens from their
        # prompt and output ids, and no cached prefix may be reused.
        preempted = self.scheduler.preempt_all()
        self.scheduler.reset_prefix_cache()
        logger.warning("KV cache rebuilt; %d running requests recompute their tokens",
                       len(preempted))

    def _fail(self, sample_id: str, cause: Exception) -> RequestOutput | None:
        """Ends the request owning `sample_id` (all its samples) with finish_reason
        "error"; its error goes to step_failures."""
        group = self._group_of(sample_id)
        if group is None or group.request_id in self.step_failures:
            return None
        failure = RequestFailed(f"request {group.request_id!r} failed in the engine: "
                                f"{cause!r}")
        failure.__cause__ = cause
        logger.error("%s", failure)
        output = self.abort(group.request_id)
        for sample in output.outputs:
            if sample.finish_reason == "abort":   # this abort is the failure
                sample.finish_reason = "error"
        self.step_failures[group.request_id] = failure
        return output

    def _group_of(self, sample_id: str):
        # A sample's id is its request's id, or "<request id>#<index>" when n > 1.
        for request_id in (sample_id, sample_id.rpartition("#")[0]):
            group = self.output_processor.get(request_id)
            if group is not None and any(s.request_id == sample_id for s in group.samples):
                return group
        return None

    def _is_running(self, request_id: str) -> bool:
        request = self.scheduler.get_request(request_id)
        return request is not None and request.status is RequestStatus.RUNNING

    def _requests_of(self, items) -> dict[str, Request]:
        return {item.request_id: self.scheduler.get_request(item.request_id) for item in items}
