"""Async scheduling changes no output: one warmed engine runs a mixed workload (greedy and
seeded, stop strings, EOS, n > 1, penalties, logprobs, a grammar, preemption) with
async scheduling off and then on; every token, logprob and finish reason is the same, no
page is leaked and no token past a request's end is emitted. (Zero compilations after
warm-up with async scheduling, the default, is checked by the warmed engines of
test_structured_generation.py and test_failure_isolation.py; this one skips warm-up.)"""

import time

import pytest

from engine import LLM, SamplingParams
from engine.structured import StructuredOutput
from engine.worker.timeline import DeviceTimeline
from tests.engine.test_generation import random_prompts

# 12 usable pages of 16 tokens for 4 sequences of up to ~110 tokens: preemption runs.
TIGHT = dict(max_num_seqs=4, max_num_batched_tokens=32, page_size=16, num_pages=13,
             max_model_len=192, warmup=False, compilation_cache_dir="")


@pytest.fixture(scope="module")
def llm(hf_model_dirs):
    return LLM(hf_model_dirs["llama"], **TIGHT)


def run(llm, prompts, params, *, async_scheduling):
    """Each sample's (token ids, text, finish reason, stop reason) and its logprobs."""
    llm.engine.async_scheduling = async_scheduling
    outputs = llm.generate(prompts, params, use_tqdm=False)
    exact = [[(s.token_ids, s.text, s.finish_reason, s.stop_reason) for s in o.outputs]
             for o in outputs]
    logprobs = [[s.cumulative_logprob] + [entry.logprob for position in s.logprobs or ()
                                          for entry in position.values()]
                for o in outputs for s in o.outputs]
    return exact, logprobs


def workload(llm):
    prompts = random_prompts(seed=60, count=10, low=20, high=60)
    # Stop strings that occur: cut from the greedy text of the same prompts.
    greedy = llm.generate(prompts[:2], SamplingParams(max_tokens=24, temperature=0,
                                                       ignore_eos=True), use_tqdm=False)
    stops = [o.outputs[0].text[12:15] for o in greedy]
    assert all(stops)
    params = [
        SamplingParams(max_tokens=24, temperature=0, stop=[stops[0]]),
        SamplingParams(max_tokens=24, temperature=0.9, seed=1, stop=[stops[1]]),
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=40, temperature=1.0, seed=2, n=2),
        SamplingParams(max_tokens=30, temperature=0.7, seed=3, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.4),
        SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.5),
        SamplingParams(max_tokens=60, temperature=1.0, seed=4,
                       structured_output=StructuredOutput.regex("[0-9]{2,4}-[a-z]{1,3}")),
        SamplingParams(max_tokens=60, temperature=0.8, seed=5,
                       structured_output=StructuredOutput.choice(["alpha", "beta"])),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=50, temperature=1.2, seed=6),   # may draw EOS on the way
    ]
    return prompts, params


def test_async_scheduling_changes_no_output(llm):
    engine = llm.engine
    prompts, params = workload(llm)
    free_pages = engine.stats().num_free_pages
    preemptions = engine.stats().num_preemptions
    sync = run(llm, prompts, params, async_scheduling=False)
    assert engine.stats().num_preemptions > preemptions, "the workload should preempt"
    preemptions = engine.stats().num_preemptions
    overlapped = run(llm, prompts, params, async_scheduling=True)
    assert engine.stats().num_preemptions > preemptions
    assert overlapped[0] == sync[0]
    # Batches are made up differently (a sibling joins a step later, a finished request's
    # row rides along once): logprobs agree to float rounding, not bit for bit.
    for mine, theirs in zip(overlapped[1], sync[1]):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    for output, param in zip(overlapped[0], params):
        for token_ids, text, finish_reason, *_ in output:
            assert len(token_ids) <= param.max_tokens
            if finish_reason == "stop" and param.stop:
                assert param.stop[0] not in text   # cut at the stop string, nothing after
    assert engine.stats().num_free_pages == free_pages


def test_an_abort_in_flight_emits_nothing_after_it(llm):
    engine = llm.engine
    engine.async_scheduling = True
    prompts = random_prompts(seed=61, count=3, low=10, high=30)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    free_pages = engine.stats().num_free_pages
    for index, prompt in enumerate(prompts):
        engine.add_request(f"abort-{index}", prompt, params)
    seen = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id] = output.outputs[0].token_ids
        if len(seen.get("abort-1", ())) >= 5 and engine.abort("abort-1") is not None:
            aborted_at = len(seen["abort-1"])
    final = engine.abort("abort-1")
    assert final is None   # already gone: aborted once, and nothing came after
    assert seen["abort-1"] == expected[1][:aborted_at]
    assert seen["abort-0"] == expected[0] and seen["abort-2"] == expected[2]
    engine.step()   # applies the step still in flight: it emits nothing for the aborted one
    assert engine.stats().num_free_pages == free_pages


def test_a_timeline_counts_host_time_in_jitted_calls_and_busy_time_by_step(llm):
    # The benchmarks split the host's time per step into the jitted calls (where a launch
    # that waits for the device shows) and the rest.
    timeline = llm.engine.runner.timeline = DeviceTimeline()
    start = time.perf_counter()
    try:
        llm.generate(random_prompts(seed=61, count=3, low=10, high=20),
                     SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    finally:
        llm.engine.runner.timeline = None
    elapsed = time.perf_counter() - start
    summary = timeline.summary()
    assert summary.computations >= 2 * 6   # a forward and a sampler a step, at least 6 steps
    assert 0 < summary.dispatch_s < elapsed
    # Prompts of 10-20 tokens take a prefill step; then come decode steps.
    assert set(summary.busy_by_kind) == {"prefill", "decode"}
    assert sum(summary.busy_by_kind.values()) == pytest.approx(summary.busy_s)
    assert len(summary.busy_each) == summary.computations
    assert sum(summary.busy_each) == pytest.approx(summary.busy_s)
