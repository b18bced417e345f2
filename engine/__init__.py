"""Ember's engine. Its public API lives here: LLM, LLMEngine, SamplingParams, EngineConfig and
the output records. The parts behind it, one folder each (docs/design.md has the seams):

    core/       requests, scheduler, page manager, output processor (host code, no JAX)
    worker/     runner, the jitted step, compilation counting (the JAX side)
    tokenizer/  tokenizers, incremental detokenizer, chat templates
    openai/     the OpenAI protocol: request parsing, prompts, response shapes
    serving/    engine thread, generation lifecycle, service, metrics, gunicorn process
    metering/   API keys, the usage ledger, quotas (SQLAlchemy)
    batch/      `ember batch`: OpenAI Batch files, resumable and billed exactly once
    default_model/  the default model (SmolLM2-135M-Instruct), fetched on first use
    cli.py      the `ember` command
"""

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
