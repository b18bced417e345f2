"""Ember's engine: requests, scheduler, pages, runner, LLM API, tokenizer, CLI."""

from engine.config import EngineConfig
from engine.outputs import CompletionOutput, Logprob, RequestOutput, Usage
from engine.sampling_params import SamplingParams


def __getattr__(name):
    # LLM and LLMEngine import JAX; loaded on first use so host-only code stays light.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine
        return LLMEngine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "Logprob", "Usage"]
