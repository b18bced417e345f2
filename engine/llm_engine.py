"""LLMEngine: requests in, RequestOutputs out, one continuous-batching step at a time.

    schedule -> run -> update -> detokenize and check stop strings

The server drives it with add_request / step / abort; LLM.generate drives it to the end.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pallas_kernels
from engine.config import EngineConfig
from engine.core.output_processor import OutputProcessor, RequestGroup
from engine.core.request import Request, RequestStatus
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.info import EngineStats, ModelInfo
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from engine.worker import compilation
from engine.worker.runner import Runner, pages_that_fit
from models.checkpoint import load_generation_config, load_model

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class LLMEngine:
    """Owns the scheduler, the runner and the tokenizer of one model."""

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None):
        config = config or EngineConfig()
        pallas_kernels.resolve_backend(config.backend)  # a bad name fails before any loading
        compilation.compilations()  # start listening before anything compiles
        compilation.enable_persistent_cache(config.compilation_cache_dir)
        if model is None:
            from engine.default_model.build import ensure_default_model
            model = ensure_default_model()
        self.model_path = Path(model)
        self.config = config
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        self.generation_config = load_generation_config(self.model_path)
        loaded = load_model(self.model_path, dtype=config.dtype)
        self.model_config = loaded.config
        limit = loaded.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        num_pages = config.num_pages or pages_that_fit(loaded.config, config)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, page_size=config.page_size, num_pages=num_pages,
            enable_prefix_caching=config.enable_prefix_caching))
        self.runner = Runner(loaded, config, self.max_model_len, num_pages)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._rng = random.Random(config.seed)
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
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ValueError(f"prompt_token_ids={str(token_ids)[:80]}: expected a list of ints")
        vocab = self.model_config.vocab_size
        for index, token in enumerate(token_ids):
            if not 0 <= token < vocab:
                raise ValueError(f"prompt_token_ids[{index}]={token}: expected an id in "
                                 f"[0, {vocab})")
        return text, list(token_ids)

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | None = None, priority: int = 0) -> None:
        """Queues a request (n samples share its prompt pages).

        Raises:
          ValueError naming the field when the prompt or params cannot be served (empty
          prompt, ids outside the vocabulary, prompt + max_tokens beyond max_model_len);
          nothing is queued then.
        """
        params = params or self.default_sampling_params()
        if self.output_processor.has(request_id):
            raise ValueError(f"request_id={request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        if not token_ids:
            raise ValueError("prompt: expected at least one token")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        samples = []
        for index in range(params.n):
            sample_id = request_id if params.n == 1 else f"{request_id}#{index}"
            samples.append(Request(sample_id, token_ids, params, eos_token_ids=eos,
                                   priority=priority, seed=(base_seed + index) % 2 ** 32,
                                   wait_for=None if index == 0 else samples[0].request_id))
        self.scheduler.add_request(samples[0])  # validates before any page is taken
        for sample in samples[1:]:
            self.scheduler.add_request(sample)
        self.output_processor.add(RequestGroup(request_id, text, token_ids, params, samples))

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
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns an output for every request that changed."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        scheduled = {item.request_id: self.scheduler.get_request(item.request_id)
                     for item in scheduler_output.scheduled}
        model_output = self.runner.execute(scheduler_output, scheduled)
        updated = self.scheduler.update(scheduler_output, model_output)
        stopped = self.output_processor.process(scheduler_output, model_output, updated)
        for request_id, stop_string in stopped:
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED, stop_string)
        return self.output_processor.collect()
