"""LLMEngine behaviour a server relies on: zero compilations after warm-up, abort,
n samples, chat, penalties, max_model_len sized to the KV cache, seeds from OS entropy,
tenant and cache_salt."""

import jax
import numpy as np
import pytest

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from tests.engine.test_generation import SMALL, random_prompts

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def warm_llm(hf_model_dirs):
    return LLM(hf_model_dirs["qwen3"], **{**SMALL, "warmup": True})


def random_params(rng):
    return SamplingParams(
        max_tokens=int(rng.integers(1, 12)), temperature=float(rng.choice([0.0, 0.7, 1.0])),
        top_k=int(rng.choice([0, 5, 50])), top_p=float(rng.choice([1.0, 0.9])),
        min_p=float(rng.choice([0.0, 0.1])), seed=int(rng.integers(0, 1000)),
        n=int(rng.choice([1, 1, 2])), logprobs=rng.choice([None, 0, 3]),
        prompt_logprobs=rng.choice([None, None, 2]),
        presence_penalty=float(rng.choice([0.0, 0.5])),
        repetition_penalty=float(rng.choice([1.0, 1.2])))


def test_zero_compilations_after_warmup(warm_llm):
    compiles = []

    def listener(event, duration, **_):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(event)

    rng = np.random.default_rng(0)
    prompts = random_prompts(seed=10, count=200, low=1, high=150)
    params = [random_params(rng) for _ in prompts]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outputs = warm_llm.generate(prompts, params, use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(outputs) == 200 and all(o.finished for o in outputs)
    assert compiles == []
    assert warm_llm.engine.compilations_after_warmup == 0


def test_final_only_steps_give_the_same_final_outputs_and_nothing_else(warm_llm):
    engine, rng = warm_llm.engine, np.random.default_rng(13)
    prompts = random_prompts(seed=13, count=8, low=2, high=40)
    params = [random_params(rng) for _ in prompts]
    finals = {}
    for final_only in (False, True):
        for index, (prompt, sampling) in enumerate(zip(prompts, params)):
            engine.add_request(f"{final_only}-{index}", {**prompt, "cache_salt": str(final_only)},
                               sampling)
        seen = []
        while engine.has_unfinished_requests():
            seen += engine.step(final_only=final_only)
        if final_only:
            assert seen and all(output.finished for output in seen)
        else:
            assert any(not output.finished for output in seen)   # snapshots on the way
        finals[final_only] = {o.request_id.split("-")[1]: o for o in seen if o.finished}
    assert finals[True].keys() == finals[False].keys() == {str(i) for i in range(len(prompts))}
    for index, want in finals[False].items():
        got = finals[True][index]
        for want_sample, got_sample in zip(want.outputs, got.outputs, strict=True):
            assert got_sample.token_ids == want_sample.token_ids
            assert got_sample.text == want_sample.text
            assert got_sample.logprobs == want_sample.logprobs
            assert got_sample.finish_reason == want_sample.finish_reason
        assert got.prompt_logprobs == want.prompt_logprobs


def test_running_snapshots_keep_what_their_step_had(warm_llm):
    # A running request's output shares the engine's growing lists (engine/outputs.Prefix):
    # after later steps it must still read as its own step's tokens, logprobs and text.
    engine = warm_llm.engine
    for index, prompt in enumerate(random_prompts(seed=17, count=3, low=2, high=30)):
        engine.add_request(f"snap-{index}", prompt, SamplingParams(
            n=2, max_tokens=12 + index, temperature=1.0, seed=index, logprobs=2,
            ignore_eos=True))
    seen = []   # (output, what each sample read when the step returned it)
    while engine.has_unfinished_requests():
        seen += [(output, [(list(s.token_ids), list(s.logprobs), s.text) for s in output.outputs])
                 for output in engine.step()]
    finals = {output.request_id: output for output, _ in seen if output.finished}
    assert len(finals) == 3 and any(not output.finished for output, _ in seen)
    for output, read_then in seen:
        final = finals[output.request_id]
        for sample, (tokens, logprobs, text), last in zip(output.outputs, read_then,
                                                          final.outputs, strict=True):
            assert sample.token_ids == tokens and list(sample.logprobs) == logprobs
            assert sample.text == text
            assert tokens == last.token_ids[:len(tokens)]                 # a prefix of it
            assert sample.token_ids[1:] == tokens[1:] and sample.token_ids[-2:] == tokens[-2:]
            assert [sample.token_ids[i] for i in range(-len(tokens), 0)] == tokens
            with pytest.raises(IndexError):
                sample.token_ids[len(tokens)]                             # not a later token


def test_n_samples_share_prompt_and_differ(warm_llm):
    prompt = random_prompts(seed=11, count=1, low=40, high=41)[0]
    out = warm_llm.generate(prompt, SamplingParams(n=3, max_tokens=10, temperature=1.0,
                                                   seed=5, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 10 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert out.usage.completion_tokens == 30 and out.usage.prompt_tokens == 40
    again = warm_llm.generate(prompt, SamplingParams(n=3, max_tokens=10, temperature=1.0,
                                                     seed=5, ignore_eos=True))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_abort_mid_decode_frees_pages_and_bills_emitted_tokens(warm_llm):
    engine = warm_llm.engine
    free_before = engine.stats().num_free_pages
    engine.add_request("a", random_prompts(seed=12, count=1, low=30, high=31)[0],
                       SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    emitted = 0
    while emitted < 3:
        for output in engine.step():
            emitted = len(output.outputs[0].token_ids)
    final = engine.abort("a")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.usage.completion_tokens == emitted
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_free_pages == free_before
    assert engine.abort("a") is None


def test_chat_uses_the_template(warm_llm):
    messages = [{"role": "user", "content": "hello"}]
    out = warm_llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))[0]
    expected = warm_llm.get_tokenizer().apply_chat_template(messages, tokenize=True)
    assert out.prompt_token_ids == expected
    assert out.prompt == warm_llm.get_tokenizer().apply_chat_template(messages)   # the text
    with pytest.raises(ValueError, match="role"):
        warm_llm.chat([{"role": "robot", "content": "hi"}])


def test_penalties_change_the_greedy_choice(warm_llm):
    prompt = random_prompts(seed=13, count=1, low=20, high=21)[0]
    plain = warm_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    penalised = warm_llm.generate(prompt, SamplingParams(
        max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=2.0,
        repetition_penalty=2.0))[0].outputs[0].token_ids
    assert penalised != plain
    counts = np.bincount(penalised)
    assert counts.max() <= np.bincount(plain).max()


TINY = dict(max_num_seqs=4, max_num_batched_tokens=32, page_size=16, num_pages=64,
            warmup=False, compilation_cache_dir="")


@pytest.mark.parametrize("num_pages, max_model_len, expected", [
    (5, None, 64),      # the model's 512 clamped to the 4 usable pages of 16 tokens
    (64, None, 512),    # the cache holds more than the model: the model's limit
    (64, 300, 300),     # an explicit length that fits
    (5, 64, 64),        # exactly what the cache holds
    (5, 65, "max_model_len=65 is beyond the 64 tokens the KV cache holds"),
    (5, 256, "max_model_len=256 is beyond the 64 tokens the KV cache holds"),
    # Beyond the model's 512 positions: refused, as vLLM does (it was cut to 512 unsaid).
    (64, 513, "max_model_len=513 is beyond the model's limit of 512 positions"),
])
def test_max_model_len_fits_the_kv_cache(hf_model_dirs, caplog, num_pages, max_model_len,
                                         expected):
    config = EngineConfig(**{**TINY, "num_pages": num_pages, "max_model_len": max_model_len})
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            LLMEngine(hf_model_dirs["llama"], config)
        return
    engine = LLMEngine(hf_model_dirs["llama"], config)
    assert engine.max_model_len == engine.model_info().max_model_len == expected
    assert ("clamped to 64" in caplog.text) == (max_model_len is None and expected == 64)
    # A request without max_tokens runs to the end of the context the cache can hold.
    engine.add_request("r", {"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=None))
    assert engine.scheduler.get_request("r").max_tokens == expected - 10
    engine.abort("r")


def drawn_seeds(model_dir, seed, count=3) -> list[int]:
    """The seeds a fresh engine gives its first unseeded requests (a restart each call)."""
    engine = LLMEngine(model_dir, EngineConfig(**TINY, seed=seed))
    for index in range(count):
        engine.add_request(f"r{index}", {"prompt_token_ids": [5, 6]}, SamplingParams())
    return [engine.scheduler.get_request(f"r{index}").seed for index in range(count)]


def test_unseeded_requests_draw_from_os_entropy(hf_model_dirs):
    first, second = (drawn_seeds(hf_model_dirs["llama"], None) for _ in range(2))
    assert first != second and len(set(first)) == 3   # a restart never repeats the sequence
    # A seed in the config is the opt-in for repeatable runs.
    assert drawn_seeds(hf_model_dirs["llama"], 3) == drawn_seeds(hf_model_dirs["llama"], 3)


def test_tenant_and_cache_salt_reach_every_sample(hf_model_dirs):
    engine = LLMEngine(hf_model_dirs["llama"], EngineConfig(**TINY))
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7], "cache_salt": "k17"},
                       SamplingParams(n=2, max_tokens=2), tenant="17")
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=2))
    samples = [engine.scheduler.get_request(i) for i in ("a#0", "a#1", "b")]
    assert [(s.tenant, s.cache_salt) for s in samples] == [("17", "k17")] * 2 + [("", None)]
    for bad, field in ((dict(cache_salt=5), "cache_salt"), (dict(cache_salt=""), "cache_salt"),
                       (dict(tenant=17), "tenant")):
        salt = {"cache_salt": bad["cache_salt"]} if "cache_salt" in bad else {}
        with pytest.raises(ValueError, match=field):
            engine.add_request("c", {"prompt_token_ids": [5], **salt}, SamplingParams(),
                               tenant=bad.get("tenant", ""))
        assert engine.scheduler.get_request("c") is None
