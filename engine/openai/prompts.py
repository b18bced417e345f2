"""Validated requests -> engine prompts and SamplingParams, checked against the model (no JAX).

Runs on the HTTP thread with the engine's tokenizer (read-only, thread-safe), so a prompt that
cannot run (ids outside the vocabulary, prompt plus max_tokens beyond the context) is a 400
before the request is admitted, never an error inside the engine thread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.info import ModelInfo
from engine.openai.api import ApiError, ChatRequest, CompletionRequest, SamplingFields, invalid
from engine.sampling_params import InvalidParamError, SamplingParams


@dataclass(slots=True, frozen=True)
class EnginePrompt:
    """One engine request: the prompt's text (None for token ids) and its token ids."""

    text: str | None
    token_ids: list[int]

    def as_engine_prompt(self) -> dict:
        return {"prompt_token_ids": self.token_ids, "prompt": self.text}


@dataclass(slots=True, frozen=True)
class PreparedRequest:
    prompts: list[EnginePrompt]
    params: SamplingParams

    @property
    def estimated_tokens(self) -> int:
        """What the quota reserves: every prompt plus n times its max_tokens."""
        n, max_tokens = self.params.n, self.params.max_tokens
        return sum(len(p.token_ids) + n * max_tokens for p in self.prompts)


def prepare_completion(request: CompletionRequest, model: ModelInfo) -> PreparedRequest:
    prompts = []
    for index, prompt in enumerate(request.prompts):
        name = "prompt" if len(request.prompts) == 1 else f"prompt[{index}]"
        if isinstance(prompt, str):
            prompts.append(EnginePrompt(prompt, model.tokenizer.encode(prompt)))
        else:
            _check_ids(name, prompt, model.vocab_size)
            prompts.append(EnginePrompt(None, prompt))
    extra = {}
    if request.logprobs is not None:
        extra["logprobs"] = request.logprobs
        if request.echo:
            extra["prompt_logprobs"] = request.logprobs
    return PreparedRequest(prompts, _params(request.sampling, prompts, model, extra))


def prepare_chat(request: ChatRequest, model: ModelInfo) -> PreparedRequest:
    try:
        token_ids = model.tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, tokenize=True)
    except Exception as error:  # noqa: BLE001 - a template failing on user messages is a 400
        raise ApiError(400, f"messages: the chat template could not render them: "
                       f"{str(error)[:200]}", param="messages", code="invalid_value") from None
    prompts = [EnginePrompt(None, token_ids)]
    extra = {}
    if request.logprobs:
        extra["logprobs"] = request.top_logprobs or 0
    return PreparedRequest(prompts, _params(request.sampling, prompts, model, extra))


def _check_ids(name: str, token_ids: list[int], vocab_size: int) -> None:
    for position, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise invalid(f"{name}[{position}]", token, f"a token id in [0, {vocab_size})")


def _params(sampling: SamplingFields, prompts: list[EnginePrompt], model: ModelInfo,
            extra: dict) -> SamplingParams:
    """The request's SamplingParams; without max_tokens it gets sampling.default_max_tokens
    (the server's default, or the endpoint's; at least min_tokens) cut to the context the
    longest prompt leaves."""
    longest = max(len(p.token_ids) for p in prompts)
    room = model.max_model_len - longest
    for index, prompt in enumerate(prompts):
        if not prompt.token_ids:
            name = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            raise ApiError(400, f"{name}: expected at least one token", param="prompt",
                           code="invalid_value")
    if room < 0:
        raise ApiError(400, f"prompt has {longest} tokens: beyond the context of "
                       f"max_model_len={model.max_model_len}", param="prompt",
                       code="context_length_exceeded")
    max_tokens, default = sampling.max_tokens, sampling.default_max_tokens
    if max_tokens is None:   # a default never undercuts the min_tokens the body asks for
        default = max(default, sampling.fields.get("min_tokens", 0)) if default else None
        max_tokens = room if default is None else min(default, room)
    elif max_tokens > room:
        raise ApiError(400, f"prompt has {longest} tokens and max_tokens={max_tokens}: together "
                       f"beyond max_model_len={model.max_model_len}", param="max_tokens",
                       code="context_length_exceeded")
    fields = dict(sampling.fields)
    _check_ids("stop_token_ids", list(fields.get("stop_token_ids", ())), model.vocab_size)
    try:
        return dataclasses.replace(model.defaults, n=sampling.n, max_tokens=max_tokens,
                                   **fields, **extra)
    except ValueError as error:  # SamplingParams' own checks name the field
        param = error.name if isinstance(error, InvalidParamError) else None
        raise ApiError(400, str(error)[:300], param=param, code="invalid_value") from None
