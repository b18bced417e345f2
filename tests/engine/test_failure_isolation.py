"""A step that raises fails only the request that makes it raise, in a real, warmed engine.

The fault is injected at the device boundary, whenever a marked token id is in the batch:
"host" raises before the runner's jitted forward runs; "lost" also deletes the donated KV
cache, as a run that fails on the device leaves it; "device" swaps in a jitted forward (the
cache donated, as the runner's) whose host callback raises while the program runs, so XLA
itself fails the run and drops the donated cache. Everything else is the real engine.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from engine import LLM, SamplingParams
from engine.llm_engine import RequestFailed
from engine.worker.step import forward_step
from tests.engine.test_generation import random_prompts

WARM = dict(max_num_seqs=4, max_num_batched_tokens=32, page_size=16, num_pages=64,
            max_model_len=256, warmup=True, compilation_cache_dir="")
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(hf_model_dirs):
    return LLM(hf_model_dirs["llama"], **WARM)


@pytest.fixture(scope="module")
def baseline(llm):
    """Four prompts and their greedy outputs, run without any fault."""
    prompts = random_prompts(seed=40, count=4, low=10, high=40)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return prompts, [o.outputs[0].token_ids for o in outputs]


def unused_token(baseline) -> int:
    """An id in no baseline prompt nor output (random_prompts draws ids below 259)."""
    seen = {t for ids in baseline[1] for t in ids}
    return next(t for t in range(259, 320) if t not in seen)


def inject_fault(monkeypatch, runner, marker: int, kind: str) -> list[int]:
    """Makes the forward fail while `marker` is in the batch; returns a list that counts
    the injected failures."""
    real_forward, failures = runner._forward, []
    if kind == "device":
        monkeypatch.setattr(runner, "_forward", failing_jitted_forward(runner, marker, failures))
        return failures

    def forward(params, kv_cache, batch, *args):
        if marker in np.asarray(batch.input_ids):
            failures.append(marker)
            if kind == "lost":   # what a run that fails on the device leaves of a donated cache
                kv_cache.delete()
            raise RuntimeError("injected device fault")
        return real_forward(params, kv_cache, batch, *args)

    monkeypatch.setattr(runner, "_forward", forward)
    return failures


def failing_jitted_forward(runner, marker: int, failures: list[int]):
    def check(input_ids):
        if marker in input_ids:
            failures.append(marker)
            raise RuntimeError("injected device fault")
        return np.int32(0)

    def forward(graphdef, params, kv_cache, batch, *args):
        io_callback(check, jax.ShapeDtypeStruct((), jnp.int32), batch.input_ids)
        params = jax.tree.unflatten(jax.tree.structure(runner.params), params)   # its leaves
        return forward_step(graphdef, params, kv_cache, batch, *args,
                            backend=runner.config.backend, interpret=runner.config.interpret)

    return jax.jit(functools.partial(forward, runner.graphdef), donate_argnums=(1,))


def poisoned_prompt(marker: int) -> dict:
    # The marker sits past the first chunk (32 tokens): the request holds pages and has
    # computed part of its prompt when the step that feeds the marker fails, with others.
    ids = random_prompts(seed=41, count=1, low=40, high=41)[0]["prompt_token_ids"]
    return {"prompt_token_ids": ids[:36] + [marker] + ids[36:]}


def run_to_end(engine) -> tuple[dict, dict]:
    finished, failures = {}, {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        failures.update(engine.step_failures)
    return finished, failures


@pytest.mark.parametrize("kind, poisoned_at, n", [
    ("host", 0, 1),     # the cache survives: only the poisoned request is touched
    ("lost", 2, 1),     # the cache is lost: rebuilt, the others recompute their tokens
    ("lost", 1, 2),     # n=2: both samples fail, as one request
    ("device", 3, 1),   # XLA fails the run itself and drops the donated cache
])
def test_only_the_failing_request_fails(llm, baseline, monkeypatch, kind, poisoned_at, n):
    engine = llm.engine
    prompts, expected = baseline
    marker = unused_token(baseline)
    free_before = engine.stats().num_free_pages
    rebuilds_before = engine.runner.num_kv_rebuilds
    compilations_before = engine.compilations_after_warmup
    injected = inject_fault(monkeypatch, engine.runner, marker, kind)
    ids = [f"ok-{i}" for i in range(len(prompts))]
    ids.insert(poisoned_at, "poisoned")
    mixed = list(prompts)
    mixed.insert(poisoned_at, poisoned_prompt(marker))
    for request_id, prompt in zip(ids, mixed):
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                n=n if request_id == "poisoned" else 1)
        engine.add_request(request_id, prompt, params)
    finished, failures = run_to_end(engine)
    assert injected, "the fault must have fired for the test to mean something"
    assert [finished[f"ok-{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected
    assert all(finished[f"ok-{i}"].outputs[0].finish_reason == "length"
               for i in range(len(prompts)))
    assert [o.finish_reason for o in finished["poisoned"].outputs] == ["error"] * n
    assert list(failures) == ["poisoned"]
    assert isinstance(failures["poisoned"], RequestFailed)
    assert "injected device fault" in str(failures["poisoned"].__cause__)
    assert (engine.runner.num_kv_rebuilds > rebuilds_before) == (kind != "host")
    assert engine.stats().num_free_pages == free_before
    if kind != "device":   # the swapped-in forward compiles itself, once per token rung
        assert engine.compilations_after_warmup == compilations_before


def test_llm_generate_survives_a_failing_prompt(llm, baseline, monkeypatch):
    prompts, expected = baseline
    marker = unused_token(baseline)
    free_before = llm.engine.stats().num_free_pages
    compilations_before = llm.engine.compilations_after_warmup
    inject_fault(monkeypatch, llm.engine.runner, marker, "lost")
    outputs = llm.generate(prompts[:2] + [poisoned_prompt(marker)] + prompts[2:], GREEDY,
                           use_tqdm=False)
    assert outputs[2].finished and outputs[2].outputs[0].finish_reason == "error"
    assert [o.outputs[0].token_ids for o in outputs[:2] + outputs[3:]] == expected
    following = llm.generate(prompts[1], GREEDY, use_tqdm=False)[0]   # fault still armed
    assert following.outputs[0].token_ids == expected[1]
    assert llm.engine.stats().num_free_pages == free_before
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.compilations_after_warmup == compilations_before
