"""Frozen records of the engine that code outside it reads (the server, batch jobs, metrics,
benchmarks): what the served model is, and how the engine is doing. Taken through
`LLMEngine.model_info()` and `LLMEngine.stats()`, never by reaching into the scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """The served model, as request validation and response shaping need it."""

    tokenizer: Tokenizer            # read-only use is thread-safe
    vocab_size: int
    max_model_len: int
    defaults: SamplingParams        # generation_config.json's defaults


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of the engine between two steps."""

    num_running: int                # sequences
    num_waiting: int
    num_free_pages: int
    page_usage: float               # fraction of usable pages held by requests
    prefix_cache_hit_rate: float    # of prompt tokens looked up since start
    num_preemptions: int            # since start
    compilations_after_warmup: int  # zero while serving is the target
