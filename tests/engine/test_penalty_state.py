"""Penalties read token counts kept on the device from step to step (step.py: PenaltyState):
greedy decoding under repetition, presence and frequency penalties equals transformers'
`generate`, with async scheduling on and off; slots reused, evicted, preempted, aborted and
lost to a failed step change no request's tokens; nothing compiles after warm-up; and no
step ships a request's whole history to the device."""

import operator

import jax
import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from engine import LLM, SamplingParams
from engine.core.request import Request, RequestStatus
from engine.worker.penalty_slots import PenaltySlots
from tests.engine.test_async_scheduling import TIGHT
from tests.engine.test_generation import random_prompts
from tests.hf_models import load_hf_model

# TIGHT's 12 pages of 16 tokens preempt; warmed, so any compile while serving shows.
WARM_TIGHT = {**TIGHT, "warmup": True}
PENALTIES = [dict(repetition_penalty=1.3, presence_penalty=0.6, frequency_penalty=0.5),
             dict(repetition_penalty=1.3), dict(presence_penalty=0.6),
             dict(frequency_penalty=0.5)]


@pytest.fixture(scope="module")
def llm(hf_model_dirs):
    return LLM(hf_model_dirs["llama"], **WARM_TIGHT)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated after the
    prompt (not the prompt's): logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, num_prompt: int, presence: float, frequency: float):
        self.num_prompt, self.presence, self.frequency = num_prompt, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        outputs = input_ids[:, self.num_prompt:]
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_penalised_greedy(model, prompt_ids, max_new_tokens, penalties):
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(penalties.get("repetition_penalty", 1.0)),
        OpenAIPenalties(len(prompt_ids), penalties.get("presence_penalty", 0.0),
                        penalties.get("frequency_penalty", 0.0))])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, logits_processor=processors)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_penalised_greedy_matches_transformers(llm, hf_model_dirs, async_scheduling):
    llm.engine.async_scheduling = async_scheduling
    model = load_hf_model(hf_model_dirs["llama"])
    prompts = random_prompts(seed=70, count=len(PENALTIES), low=5, high=30)
    params = [SamplingParams(max_tokens=24, temperature=0, **penalties)
              for penalties in PENALTIES]
    outputs = llm.generate(prompts, params, use_tqdm=False)   # batched in one run
    for prompt, penalties, output in zip(prompts, PENALTIES, outputs):
        expected = hf_penalised_greedy(model, prompt["prompt_token_ids"], 24, penalties)
        assert output.outputs[0].token_ids == expected, penalties
    plain = llm.generate(prompts[0], SamplingParams(max_tokens=24, temperature=0),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert plain != outputs[0].outputs[0].token_ids, "the penalties should change the text"
    llm.engine.async_scheduling = True


def stress_workload():
    """More penalised samples than slots (4), n=2 siblings, seeded and greedy, mixed with
    rows without penalties."""
    prompts = random_prompts(seed=71, count=9, low=20, high=60)
    params = [SamplingParams(max_tokens=60, temperature=0.7, seed=5, ignore_eos=True,
                             **PENALTIES[0]),   # aborted in flight
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, **PENALTIES[0]),
              SamplingParams(max_tokens=40, temperature=0.8, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=36, temperature=0.9, seed=2, ignore_eos=True, n=2,
                             **PENALTIES[0]),
              SamplingParams(max_tokens=25, temperature=0, ignore_eos=True, **PENALTIES[1]),
              SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True,
                             **PENALTIES[3]),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=35, temperature=0.7, seed=4, ignore_eos=True,
                             **PENALTIES[2]),
              SamplingParams(max_tokens=28, temperature=0, ignore_eos=True, **PENALTIES[3])]
    return prompts, params


def tokens_of(output):
    return [sample.token_ids for sample in output.outputs]


def alone(llm, prompts, params):
    return [tokens_of(llm.generate(p, q, use_tqdm=False)[0]) for p, q in zip(prompts, params)]


def run_with_abort(engine, prompts, params, abort_id, abort_at):
    """Runs the requests as ids "0", "1", ...; aborts `abort_id` at step `abort_at`."""
    for index, (prompt, param) in enumerate(zip(prompts, params)):
        engine.add_request(str(index), prompt, param)
    finished, steps = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        steps += 1
        if steps == abort_at:
            finished[abort_id] = engine.abort(abort_id)
    return finished


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_slots_reused_preempted_and_aborted_change_no_tokens(llm, monkeypatch,
                                                             async_scheduling):
    engine = llm.engine
    engine.async_scheduling = async_scheduling
    prompts, params = stress_workload()
    expected = alone(llm, prompts[1:], params[1:])
    preemptions = engine.stats().num_preemptions
    fills = spy_on_slot_fills(monkeypatch, engine.runner)
    finished = run_with_abort(engine, prompts, params, abort_id="0", abort_at=8)
    assert engine.stats().num_preemptions > preemptions, "the workload should preempt"
    assert [tokens_of(finished[str(i)]) for i in range(1, len(prompts))] == expected
    aborted = finished["0"].outputs[0]
    assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < 60
    # 8 penalised samples took the 4 slots in turn.
    assert {request for request, _ in fills} == {"0", "1", "3#0", "3#1", "4", "5", "7", "8"}
    assert {slot for _, slot in fills} == {0, 1, 2, 3}
    engine.async_scheduling = True


def test_forgotten_slots_are_filled_again_with_the_token_in_flight(llm, monkeypatch):
    """Correctness never depends on keeping a slot: forgetting them all every few steps
    (async scheduling on, so a draw is in flight) changes no token."""
    engine = llm.engine
    prompts, params = stress_workload()
    expected = [tokens_of(o) for o in llm.generate(prompts, params, use_tqdm=False)]
    fills = spy_on_slot_fills(monkeypatch, engine.runner, pending=True)
    for index, (prompt, param) in enumerate(zip(prompts, params)):
        engine.add_request(str(index), prompt, param)
    finished, steps = {}, 0
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        steps += 1
        if steps % 3 == 0:
            engine.runner.penalties.slots.forget()
    assert [tokens_of(finished[str(i)]) for i in range(len(prompts))] == expected
    assert any(pending for _, _, pending in fills), "a slot should be filled with a " \
        "token still being drawn"


def spy_on_slot_fills(monkeypatch, runner, pending=False) -> list[tuple]:
    """Records (request id, slot) of every slot filled from a request's history, and with
    `pending` whether the request's last output was still being drawn then."""
    fills, take = [], runner.penalties.slots.take

    def recording_take(request, position, in_step):
        slot, fresh = take(request, position, in_step)
        if fresh:
            in_flight = position > request.num_output_tokens
            fills.append((request.request_id, slot) + ((in_flight,) if pending else ()))
        return slot, fresh

    monkeypatch.setattr(runner.penalties.slots, "take", recording_take)
    return fills


def fail_once(monkeypatch, runner, where: str, lose: str | None) -> list[int]:
    """Makes the runner's `where` ("_sample" or "_forward") raise the 6th time a penalised
    request is in the step; `lose` names a donated array ("kv_cache", "penalties.state")
    deleted with it, as a run failing on the device leaves it. Returns the failures."""
    real, calls, failures = getattr(runner, where), [], []

    def failing(*args, **kwargs):
        if any(r.sampling_params.has_penalties for r in runner.requests_in_step):
            calls.append(1)
            if len(calls) == 6:
                failures.append(1)
                if lose is not None:
                    for array in jax.tree.leaves(operator.attrgetter(lose)(runner)):
                        array.delete()
                raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, where, failing)
    return failures


@pytest.mark.parametrize("where, lose", [("_sample", None), ("_sample", "penalties.state"),
                                         ("_forward", "kv_cache")])
def test_a_failed_step_changes_no_penalised_tokens(llm, monkeypatch, where, lose):
    engine = llm.engine
    prompts, params = stress_workload()
    prompts, params = prompts[:6], params[:6]
    expected = [tokens_of(o) for o in llm.generate(prompts, params, use_tqdm=False)]
    remember_requests_in_step(monkeypatch, engine.runner)
    failures = fail_once(monkeypatch, engine.runner, where, lose)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert failures, "the fault must have fired for the test to mean something"
    assert not engine.step_failures
    assert [tokens_of(o) for o in outputs] == expected


def remember_requests_in_step(monkeypatch, runner) -> None:
    """runner.requests_in_step: the requests of the step being launched or sampled."""
    launch, dispatch_sample = runner.launch, runner.dispatch_sample
    runner.requests_in_step = []

    def remembering_launch(scheduler_output, requests, *args, **kwargs):
        runner.requests_in_step = [requests[item.request_id]
                                   for item in scheduler_output.scheduled]
        return launch(scheduler_output, requests, *args, **kwargs)

    def remembering_dispatch(step, *args, **kwargs):
        runner.requests_in_step = step.chosen
        return dispatch_sample(step, *args, **kwargs)

    monkeypatch.setattr(runner, "launch", remembering_launch)
    monkeypatch.setattr(runner, "dispatch_sample", remembering_dispatch)


def test_each_history_reaches_the_device_once(llm, monkeypatch):
    """The sampler gets per-row penalty arrays [S], never a [S, max_model_len] history; a
    request's history is shipped once, when it takes its slot."""
    runner = llm.engine.runner
    widths, fills = [], spy_on_slot_fills(monkeypatch, runner)
    real_sample = runner._sample

    def sample(params, last_hidden, sampling, penalties, *args, num_seqs, **kwargs):
        if penalties is not None:
            widths.extend(np.shape(array) for array in penalties)
        return real_sample(params, last_hidden, sampling, penalties, *args,
                           num_seqs=num_seqs, **kwargs)

    monkeypatch.setattr(runner, "_sample", sample)
    prompts = random_prompts(seed=72, count=3, low=4, high=12)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, **PENALTIES[0])
    llm.generate(prompts, params, use_tqdm=False)
    assert widths and all(len(shape) == 1 and shape[0] <= 4 for shape in widths), widths
    assert len(fills) == 3


def test_nothing_compiles_after_warmup_with_penalties(llm):
    prompts, params = stress_workload()
    llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.compilations_after_warmup == 0


# The slot table alone (host only, no device).
def test_a_slot_is_trusted_only_while_it_holds_the_outputs_before_the_draw():
    slots, request = PenaltySlots(2), Request("a", [5, 6])
    request.arrival_index = 0
    assert slots.take(request, 0, set()) == (0, True)
    assert slots.take(request, 1, set()) == (0, False)   # the draw at 0 is counted
    assert slots.take(request, 1, set()) == (0, True)    # drawn again: filled again
    slots.forget()
    assert slots.take(request, 2, set()) == (0, True)
    again = Request("a", [5, 6])   # the id used again by a new request
    again.arrival_index = 1
    assert slots.take(again, 0, set()) == (1, True)


def test_a_full_table_takes_a_finished_requests_slot_then_the_least_recently_used():
    slots = PenaltySlots(3)
    requests = [Request(str(i), [1]) for i in range(5)]
    for index, request in enumerate(requests):
        request.arrival_index = index
    for request in requests[:3]:
        slots.take(request, 0, set())
    requests[1].status = RequestStatus.FINISHED_ABORTED
    assert slots.take(requests[3], 0, {0}) == (1, True)   # the finished one's
    slots.take(requests[2], 1, set())                      # 0 is now the least recently used
    assert slots.take(requests[4], 0, {1}) == (0, True)
    assert slots.take(requests[0], 1, {0, 1}) == (2, True)   # evicted, then filled again
    with pytest.raises(RuntimeError, match="every one of the 3 penalty slots"):
        slots.take(Request("x", [1]), 0, {0, 1, 2})
