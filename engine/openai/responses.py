"""A Generation's outputs -> OpenAI completions / chat bodies and stream chunks (no JAX).

Choices are indexed prompt-major, sample-minor (choice = prompt * n + sample), as OpenAI does.
While a choice streams, the engine's outputs hold back the last max(len(stop)) - 1 characters
(engine/core/output_processor.py: RequestGroup.holdback): a stop string found later cuts the
text there, and what was already sent can never be taken back.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.openai import formatting as fmt
from engine.openai import tools
from engine.openai.api import ChatRequest, CompletionRequest
from engine.openai.prompts import PreparedRequest
from engine.outputs import CompletionOutput, RequestOutput, Usage


@dataclass(slots=True)
class _Sent:
    """What one choice has streamed so far."""

    chars: int = 0
    tokens: int = 0
    offset: int = 0        # text offset of the next token (legacy logprobs)
    started: bool = False
    finished: bool = False


class _Assembler:
    def __init__(self, prepared: PreparedRequest, response_id: str, created: int, model: str,
                 include_usage: bool):
        self.prepared, self.response_id, self.created, self.model = (
            prepared, response_id, created, model)
        self.include_usage = include_usage
        self.n = prepared.params.n
        self._sent = [_Sent() for _ in range(len(prepared.prompts) * self.n)]
        self._token_deltas = prepared.params.logprobs is not None   # a chunk per token then

    def _deltas(self, prompt_index: int, output: RequestOutput):
        """(choice index, sample, new text, first new token) for samples that moved on."""
        for sample in output.outputs:
            choice = prompt_index * self.n + sample.index
            sent = self._sent[choice]
            if sent.finished:
                continue
            done = sample.finish_reason is not None
            end = max(sent.chars, len(sample.text))
            text, first_token = sample.text[sent.chars:end], sent.tokens
            if not text and not done and (not self._token_deltas
                                          or len(sample.token_ids) == first_token):
                continue
            sent.chars, sent.tokens, sent.finished = end, len(sample.token_ids), done
            yield choice, sample, text, first_token

    def usage_chunk(self, usage: Usage) -> dict:
        return self._body([], usage, chunk=True)

    def _body(self, choices: list[dict], usage: Usage | None, chunk: bool) -> dict:
        raise NotImplementedError


class CompletionAssembler(_Assembler):
    """/v1/completions: text (after the echoed prompt) and legacy logprobs."""

    def __init__(self, request: CompletionRequest, prepared: PreparedRequest, tokenizer,
                 response_id: str, created: int, model: str):
        super().__init__(prepared, response_id, created, model,
                         request.sampling.include_usage)
        self.echo, self.logprobs, self._tokenizer = request.echo, request.logprobs, tokenizer
        self._echo_text = [p.text if p.text is not None else tokenizer.decode(p.token_ids)
                           for p in prepared.prompts] if request.echo else None

    def _body(self, choices, usage, chunk):
        return fmt.completion_body(self.response_id, self.created, self.model, choices, usage,
                                   chunk=chunk, include_usage=self.include_usage)

    def _prompt_logprobs(self, prompt_index: int, output: RequestOutput) -> dict:
        token_ids = self.prepared.prompts[prompt_index].token_ids
        positions = output.prompt_logprobs or [None] * len(token_ids)
        first = self._tokenizer.decode(token_ids[:1], skip_special_tokens=False)
        return fmt.completion_logprobs(positions, token_ids, self.logprobs, 0, first)

    def _choice(self, prompt_index: int, output: RequestOutput, sample: CompletionOutput,
                text: str, first_token: int, sent: _Sent) -> dict:
        logprobs = None
        if not sent.started and self.echo:
            text = self._echo_text[prompt_index] + text
            if self.logprobs is not None:
                logprobs = self._prompt_logprobs(prompt_index, output)
                sent.offset = len(self._echo_text[prompt_index])
        sent.started = True
        if self.logprobs is not None:
            new = fmt.completion_logprobs(sample.logprobs[first_token:],
                                          sample.token_ids[first_token:], self.logprobs,
                                          sent.offset)
            sent.offset += sum(len(token) for token in new["tokens"])
            logprobs = new if logprobs is None else {
                name: logprobs[name] + new[name] for name in new}
        return fmt.completion_choice(prompt_index * self.n + sample.index, text,
                                     sample.finish_reason, logprobs)

    def chunks(self, changed: dict[int, RequestOutput]) -> list[dict]:
        chunks = []
        for prompt_index, output in sorted(changed.items()):
            for choice, sample, text, first_token in self._deltas(prompt_index, output):
                body = self._choice(prompt_index, output, sample, text, first_token,
                                    self._sent[choice])
                chunks.append(self._body([body], None, chunk=True))
        return chunks

    def response(self, outputs: list[RequestOutput], usage: Usage) -> dict:
        choices = []
        for prompt_index, output in enumerate(outputs):
            for sample in output.outputs:
                sent = self._sent[prompt_index * self.n + sample.index]
                choices.append(self._choice(prompt_index, output, sample, sample.text, 0, sent))
        return self._body(choices, usage, chunk=False)


class ChatAssembler(_Assembler):
    """/v1/chat/completions: assistant messages, tool calls and chat logprobs."""

    def __init__(self, request: ChatRequest, prepared: PreparedRequest, response_id: str,
                 created: int, model: str, tokenizer=None):
        """`tokenizer`: gives each logprob entry its token's own bytes (None: those of its
        text, which a token holding part of a character shows as U+FFFD)."""
        super().__init__(prepared, response_id, created, model,
                         request.sampling.include_usage)
        self._token_bytes = None if tokenizer is None else tokenizer.token_bytes
        self.logprobs = request.logprobs
        self.top_logprobs = request.top_logprobs or 0
        self._tool_format = prepared.tool_calls
        self._tool_streams = None if prepared.tool_calls is None else [
            tools.ToolCallStream(prepared.tool_calls) for _ in self._sent]

    def _body(self, choices, usage, chunk):
        return fmt.chat_body(self.response_id, self.created, self.model, choices, usage,
                             chunk=chunk, include_usage=self.include_usage)

    def _logprobs(self, sample: CompletionOutput, first_token: int) -> dict | None:
        if not self.logprobs:
            return None
        return fmt.chat_logprobs(sample.logprobs[first_token:], sample.token_ids[first_token:],
                                 self.top_logprobs, self._token_bytes)

    def role_chunks(self) -> list[dict]:
        """The first chunk of every choice: the assistant role and empty content."""
        return [self._body([fmt.chat_delta(choice, {"role": "assistant", "content": ""}, None)],
                           None, chunk=True) for choice in range(len(self._sent))]

    def chunks(self, changed: dict[int, RequestOutput]) -> list[dict]:
        chunks = []
        for prompt_index, output in sorted(changed.items()):
            for choice, sample, text, first_token in self._deltas(prompt_index, output):
                deltas, finish_reason = self._choice_deltas(choice, sample, text)
                for place, delta in enumerate(deltas):   # logprobs first, finish_reason last
                    body = fmt.chat_delta(
                        choice, delta, finish_reason if place == len(deltas) - 1 else None,
                        self._logprobs(sample, first_token) if place == 0 else None)
                    chunks.append(self._body([body], None, chunk=True))
        return chunks

    def _choice_deltas(self, choice: int, sample: CompletionOutput, text: str
                       ) -> tuple[list[dict], str | None]:
        """The deltas one step of a choice sends (at least one), and its finish_reason."""
        if self._tool_streams is None:
            return [{"content": text} if text else {}], sample.finish_reason
        stream, done = self._tool_streams[choice], sample.finish_reason is not None
        deltas = stream.feed(text, done)
        if not deltas and (done or self.logprobs):   # text held back: an empty delta carries
            deltas = [{}]                            # the finish_reason or the logprobs
        return deltas, tools.finish_reason(sample.finish_reason, stream.called,
                                           sample.stop_reason)

    def response(self, outputs: list[RequestOutput], usage: Usage) -> dict:
        choices = [self._message(sample) for output in outputs for sample in output.outputs]
        return self._body(choices, usage, chunk=False)

    def _message(self, sample: CompletionOutput) -> dict:
        if self._tool_format is None:
            return fmt.chat_choice(sample.index, sample.text, sample.finish_reason,
                                   self._logprobs(sample, 0))
        content, calls = tools.message_tool_calls(sample.text, self._tool_format)
        return fmt.chat_choice(sample.index, content,
                               tools.finish_reason(sample.finish_reason, bool(calls),
                                                   sample.stop_reason),
                               self._logprobs(sample, 0), calls)
