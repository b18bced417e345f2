"""Validated requests -> engine prompts and SamplingParams, checked against the model (no JAX).

Runs on the HTTP thread with the engine's tokenizer (read-only, thread-safe), so a prompt that
cannot run (ids outside the vocabulary, prompt plus max_tokens beyond the context) is a 400
before the request is admitted, never an error inside the engine thread.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from engine.info import ModelInfo
from engine.openai.api import ApiError, ChatRequest, CompletionRequest, SamplingFields, invalid
from engine.openai.constraints import ToolRequest
from engine.openai.tools import ToolCallFormat, detect_parser
from engine.sampling_params import InvalidParamError, SamplingParams
from engine.structured import StructuredOutput, StructuredOutputError, compiler_for


@dataclass(slots=True, frozen=True)
class EnginePrompt:
    """One engine request: the prompt's text (None for token ids) and its token ids."""

    text: str | None
    token_ids: list[int]

    def as_engine_prompt(self) -> dict:
        return {"prompt_token_ids": self.token_ids, "prompt": self.text}


@dataclass(slots=True, frozen=True)
class PreparedRequest:
    """tool_calls: how the output holds tool calls (None: it is all content)."""

    prompts: list[EnginePrompt]
    params: SamplingParams
    tool_calls: ToolCallFormat | None = None

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
    extra = _structured(request.structured_output, model)
    if request.logprobs is not None:
        extra["logprobs"] = request.logprobs
        if request.echo:
            extra["prompt_logprobs"] = request.logprobs
    return PreparedRequest(prompts, _params(request.sampling, prompts, model, extra))


def render_chat(request: ChatRequest, model: ModelInfo) -> str:
    """The prompt text the chat template writes from the messages (and tools): what the
    server bounds before tokenizing it, as it bounds a completion's prompt."""
    tools = request.tools
    try:
        return model.tokenizer.apply_chat_template(
            template_messages(request.messages), add_generation_prompt=True, tokenize=False,
            tools=None if tools is None else list(tools.tools))
    except Exception as error:  # noqa: BLE001 - a template failing on user messages is a 400
        raise ApiError(400, f"messages: the chat template could not render them: "
                       f"{str(error)[:200]}", param="messages", code="invalid_value") from None


def prepare_chat(request: ChatRequest, model: ModelInfo, text: str | None = None
                 ) -> PreparedRequest:
    """`text`: render_chat's, when the caller has it already."""
    if text is None:
        text = render_chat(request, model)
    # Encoded without BOS / EOS: the template writes them.
    token_ids = model.tokenizer.encode(text, add_special_tokens=False)
    tools = request.tools
    prompts = [EnginePrompt(None, token_ids)]
    extra = _structured(request.structured_output, model)
    if request.logprobs:
        extra["logprobs"] = request.top_logprobs or 0
    return PreparedRequest(prompts, _params(request.sampling, prompts, model, extra, "messages"),
                           _tool_call_format(tools, model))


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as chat templates expect them, as vLLM hands them to a text model's
    template: content as one string (a list of text parts joined by newlines; an
    assistant's null content beside its tool_calls, as the server itself answers, empty),
    and an assistant's tool call arguments as a dict, where OpenAI sends JSON text
    (templates such as Llama 3.1's write `arguments | tojson`, which would quote the text
    once more)."""
    rendered = []
    for message in messages:
        if not isinstance(message, dict):
            rendered.append(message)   # validate_messages names what is wrong with it
            continue
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) for part in content):
            message = {**message, "content": "\n".join(str(part.get("text", ""))
                                                        for part in content)}
        elif content is None and message.get("tool_calls"):
            message = {**message, "content": ""}
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_call_for_template(call) for call in calls]}
        rendered.append(message)
    return rendered


def _call_for_template(call: object) -> object:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _structured(spec: StructuredOutput | None, model: ModelInfo) -> dict:
    """{"structured_output": spec} once its grammar compiles for the model's vocabulary (a
    400 otherwise), so the engine thread only ever takes a cached compiled grammar."""
    if spec is None:
        return {}
    try:
        compiler = compiler_for(model.tokenizer, model.vocab_size)
    except ValueError as error:   # the model's vocabulary is narrower than its tokenizer's
        raise ApiError(400, f"structured output is not available for this model: {error}"[:500],
                       param=_PARAMS.get(spec.kind), code="unsupported_parameter") from None
    try:
        compiler.compile(spec)
    except StructuredOutputError as error:
        raise ApiError(400, str(error)[:500], param=_PARAMS.get(spec.kind),
                       code="invalid_value") from None
    return {"structured_output": spec}


# The body field each kind comes from most often (a 400 here is rare: only a grammar that
# names a special token the vocabulary lacks passes the checks without a tokenizer).
_PARAMS = {"grammar": "guided_grammar", "regex": "guided_regex",
           "json_schema": "response_format", "choice": "guided_choice"}


def _tool_call_format(tools: ToolRequest | None, model: ModelInfo) -> ToolCallFormat | None:
    if tools is None or tools.choice == "none":
        return None
    if tools.choice == "function":
        return ToolCallFormat("named", function_name=tools.function_name)
    if tools.choice == "required":
        return ToolCallFormat("array")
    return ToolCallFormat("parse", parser=tools.parser or detect_parser(model.tokenizer))


def _check_ids(name: str, token_ids: list[int], vocab_size: int) -> None:
    for position, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise invalid(f"{name}[{position}]", token, f"a token id in [0, {vocab_size})")


def _params(sampling: SamplingFields, prompts: list[EnginePrompt], model: ModelInfo,
            extra: dict, prompt_param: str = "prompt") -> SamplingParams:
    """The request's SamplingParams; without max_tokens it gets sampling.default_max_tokens
    (the server's default, or the endpoint's; at least min_tokens) cut to the context the
    longest prompt leaves. `prompt_param`: the body field the prompts came from."""
    longest = max(len(p.token_ids) for p in prompts)
    room = model.max_model_len - longest
    for index, prompt in enumerate(prompts):
        if not prompt.token_ids:
            name = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            raise ApiError(400, f"{name}: expected at least one token", param="prompt",
                           code="invalid_value")
    if room < 0:
        raise ApiError(400, f"{prompt_param} has {longest} tokens: beyond the context of "
                       f"max_model_len={model.max_model_len}", param=prompt_param,
                       code="context_length_exceeded")
    max_tokens, default = sampling.max_tokens, sampling.default_max_tokens
    if max_tokens is None:   # a default never undercuts the min_tokens the body asks for
        default = max(default, sampling.fields.get("min_tokens", 0)) if default else None
        max_tokens = room if default is None else min(default, room)
    elif max_tokens > room:
        name = sampling.max_tokens_param
        raise ApiError(400, f"{prompt_param} has {longest} tokens and {name}={max_tokens}: "
                       f"together beyond max_model_len={model.max_model_len}", param=name,
                       code="context_length_exceeded")
    fields = dict(sampling.fields)
    _check_ids("stop_token_ids", list(fields.get("stop_token_ids", ())), model.vocab_size)
    try:
        return dataclasses.replace(model.defaults, n=sampling.n, max_tokens=max_tokens,
                                   **fields, **extra)
    except ValueError as error:  # SamplingParams' own checks name the field
        param = error.name if isinstance(error, InvalidParamError) else None
        raise ApiError(400, str(error)[:300], param=param, code="invalid_value") from None
