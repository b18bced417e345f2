"""Turns sampled tokens into user-facing outputs: text, logprobs, stop strings (no JAX)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.request import ModelOutput, Request, RequestStatus, SchedulerOutput
from engine.outputs import CompletionOutput, Logprob, PositionLogprobs, Prefix, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(slots=True)
class RequestGroup:
    """One user request: its n samples (scheduler requests) and their outputs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[Request]
    outputs: list[CompletionOutput] = field(default_factory=list)
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(output.finished for output in self.outputs)

    @property
    def holdback(self) -> int:
        """Characters a running sample's text holds back: a stop string found later cuts
        the text where it starts (unless include_stop_str_in_output), and what a snapshot
        showed is never taken back (vLLM holds back alike)."""
        params = self.params
        if not params.stop or params.include_stop_str_in_output:
            return 0
        return max(map(len, params.stop)) - 1

    def snapshot(self) -> RequestOutput:
        """This step's view of the group, without copying what it generated: a finished
        sample's lists never change again and are handed out as they are; a running one's
        are Prefix views of the tokens so far (the engine keeps appending to them), and its
        text without the last `holdback` characters, so each view's text starts the next."""
        hold = self.holdback
        outputs = [CompletionOutput(o.index, o.text if o.finished or not hold
                                    else o.text[:max(0, len(o.text) - hold)],
                                    _as_of_now(o.token_ids, o.finished),
                                    o.cumulative_logprob,
                                    None if o.logprobs is None else _as_of_now(o.logprobs,
                                                                               o.finished),
                                    o.finish_reason, o.stop_reason) for o in self.outputs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                             finished=self.finished,
                             num_cached_tokens=self.samples[0].num_cached_tokens,
                             prompt_logprobs=self.prompt_logprobs)


def _as_of_now(items: list, finished: bool) -> list | Prefix:
    return items if finished else Prefix(items, len(items))


class OutputProcessor:
    """Keeps each live request group and updates it from every step's model output."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._groups: dict[str, RequestGroup] = {}
        self._sample_index: dict[str, tuple[RequestGroup, int]] = {}
        self._touched: dict[str, RequestGroup] = {}

    def add(self, group: RequestGroup) -> None:
        params = group.params
        for index, sample in enumerate(group.samples):
            group.outputs.append(CompletionOutput(
                index, cumulative_logprob=0.0,
                logprobs=[] if params.logprobs is not None else None))
            group.detokenizers.append(IncrementalDetokenizer(
                self.tokenizer, group.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens))
            self._sample_index[sample.request_id] = (group, index)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None] * len(group.prompt_token_ids)
        self._groups[group.request_id] = group

    def has(self, request_id: str) -> bool:
        return request_id in self._groups

    def get(self, request_id: str) -> RequestGroup | None:
        return self._groups.get(request_id)

    def process(self, scheduler_output: SchedulerOutput, model_output: ModelOutput,
                updated: list[Request]) -> list[tuple[str, str]]:
        """Appends each new token; returns (sample id, stop string) for samples that hit a
        stop string (the engine finishes those in the scheduler)."""
        rows = {item.request_id: s for s, item in enumerate(scheduler_output.scheduled)}
        for request_id, scored in (model_output.prompt_logprobs or {}).items():
            self._add_prompt_logprobs(request_id, scored)
        stopped = []
        logprobs = model_output.logprobs.tolist()   # Python floats, read once
        for request in updated:
            group, index = self._sample_index[request.request_id]
            stop = self._append(group, index, request, model_output, rows[request.request_id],
                                logprobs)
            if stop is not None:
                stopped.append((request.request_id, stop))
            self._touched[group.request_id] = group
        return stopped

    def _append(self, group: RequestGroup, index: int, request: Request, model_output,
                row: int, logprobs: list[float]) -> str | None:
        output, params = group.outputs[index], group.params
        if not request.output_token_ids:  # max_tokens=0: finished on its prompt (scoring)
            output.finish_reason = request.status.finish_reason
            return None
        token = request.output_token_ids[-1]
        output.token_ids.append(token)
        output.cumulative_logprob += logprobs[row]
        if output.logprobs is not None:
            output.logprobs.append(self._position_logprobs(
                token, model_output.logprobs[row], model_output.ranks[row],
                model_output.top_logprob_ids[row], model_output.top_logprobs[row],
                params.logprobs))
        detokenizer = group.detokenizers[index]
        previous_length = len(output.text)
        is_finished = request.is_finished
        # A token that ended the request (EOS, a stop token) is in token_ids, but its text
        # only with include_stop_str_in_output, as a stop string's (vLLM's rule).
        if not (is_finished and _ended_by_token(request, token)
                and not params.include_stop_str_in_output):
            output.text += detokenizer.add([token])
        if is_finished:
            output.text += detokenizer.finish()
        stop = self._find_stop(output, params, previous_length)
        if stop is not None:
            output.finish_reason, output.stop_reason = "stop", stop
        elif is_finished:
            output.finish_reason = request.status.finish_reason
            output.stop_reason = request.stop_reason
        return stop

    @staticmethod
    def _find_stop(output: CompletionOutput, params: SamplingParams, previous_length: int
                   ) -> str | None:
        """Looks for a stop string in the new text (and the few characters before it, which
        a stop string may straddle); cuts the text there."""
        # Not within the first min_tokens tokens (vLLM's rule): their text is always kept.
        if not params.stop or len(output.token_ids) <= params.min_tokens:
            return None
        longest = max(len(s) for s in params.stop)
        start = max(0, previous_length - longest + 1)
        found = [(output.text.find(s, start), s) for s in params.stop]
        found = [(at, s) for at, s in found if at >= 0]
        if not found:
            return None
        at, stop = min(found)
        output.text = output.text[:at + len(stop) if params.include_stop_str_in_output else at]
        return stop

    def _position_logprobs(self, token, logprob, rank, top_ids, top_logprobs, count
                           ) -> PositionLogprobs:
        entries = {int(token): Logprob(float(logprob), int(rank), self._piece(token))}
        for place in range(count or 0):
            top_id = int(top_ids[place])
            if top_id not in entries:
                entries[top_id] = Logprob(float(top_logprobs[place]), place + 1,
                                          self._piece(top_id))
        return entries

    def _piece(self, token_id) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)

    def _add_prompt_logprobs(self, request_id: str, scored) -> None:
        group, index = self._sample_index[request_id]
        if index != 0 or group.prompt_logprobs is None:
            return  # siblings share the prompt; the first sample scores it
        count = group.params.prompt_logprobs
        for i, position in enumerate(scored.positions):
            token = group.prompt_token_ids[position]
            group.prompt_logprobs[position] = self._position_logprobs(
                token, scored.logprobs[i], scored.ranks[i], scored.top_ids[i],
                scored.top_logprobs[i], count)
        self._touched[group.request_id] = group

    def finish_aborted(self, group: RequestGroup) -> RequestOutput:
        for output in group.outputs:
            if not output.finished:
                output.finish_reason = "abort"
        self._touched.pop(group.request_id, None)
        self._forget(group)
        return group.snapshot()

    def collect(self, final_only: bool = False) -> list[RequestOutput]:
        """Outputs of every group that changed since the last call (final_only: of those
        that finished; no snapshot of the others is made); forgets finished ones."""
        outputs = []
        for group in self._touched.values():
            if final_only and not group.finished:
                continue
            outputs.append(group.snapshot())
            if outputs[-1].finished:
                self._forget(group)
        self._touched.clear()
        return outputs

    def _forget(self, group: RequestGroup) -> None:
        self._groups.pop(group.request_id, None)
        for sample in group.samples:
            self._sample_index.pop(sample.request_id, None)


def _ended_by_token(request: Request, token: int) -> bool:
    """Whether `token` ended the finished request as EOS or one of its stop_token_ids
    (engine/core/request.py: check_stop), rather than a length limit or a grammar."""
    if request.status is not RequestStatus.FINISHED_STOPPED:
        return False
    if request.stop_reason is not None:
        return request.stop_reason == token
    if request.matcher is not None and request.matcher.is_finished():
        # A grammar complete on its last token keeps that token's text; one that took EOS
        # (which it allows whatever ignore_eos says) ended on it.
        return token in request.matcher.eos_token_ids
    return not request.sampling_params.ignore_eos and token in request.eos_token_ids
