"""End-to-end generation through LLM: parity with transformers, batching invariance,
prefix caching, preemption, seeded sampling, logprobs, stops, min_tokens and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_models import ARCHITECTURES, load_hf_model

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=64, page_size=16, num_pages=96,
             max_model_len=256, warmup=False, compilation_cache_dir="")


def random_prompts(seed, count, low=3, high=40):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 259, size=int(rng.integers(low, high))).tolist()}
            for _ in range(count)]


def hf_greedy(model_dir, prompt_ids, max_new_tokens):
    model = load_hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def llama(hf_model_dirs):
    return LLM(hf_model_dirs["llama"], **SMALL)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_greedy_matches_transformers_generate(kind, hf_model_dirs):
    llm = LLM(hf_model_dirs[kind], **SMALL)
    prompt = random_prompts(seed=sorted(ARCHITECTURES).index(kind), count=1, low=20, high=30)[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0))[0]
    expected = hf_greedy(hf_model_dirs[kind], prompt["prompt_token_ids"], 32)
    assert out.outputs[0].token_ids == expected
    assert len(set(expected)) > 4, "greedy text should vary for the test to mean something"


def test_batched_greedy_equals_each_alone(llama):
    prompts = random_prompts(seed=1, count=64, low=2, high=120)
    rng = np.random.default_rng(2)
    params = [SamplingParams(max_tokens=int(rng.integers(1, 24)), temperature=0, ignore_eos=True)
              for _ in prompts]
    together = llama.generate(prompts, params, use_tqdm=False)
    for prompt, param, out in zip(prompts, params, together):
        alone = llama.generate(prompt, param, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == param.max_tokens


def test_prefix_cached_results_equal_uncached(hf_model_dirs, llama):
    shared = random_prompts(seed=3, count=1, low=70, high=71)[0]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": shared + tail["prompt_token_ids"]}
               for tail in random_prompts(seed=4, count=6, low=1, high=20)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    uncached = LLM(hf_model_dirs["llama"], **{**SMALL, "enable_prefix_caching": False})
    expected = [o.outputs[0].token_ids for o in uncached.generate(prompts, params)]
    llama.generate(prompts[:1], params)  # fills the cache with the shared pages
    cached = llama.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in cached] == expected
    # The others share 4 full pages (64 of the 70 shared tokens); the first, run before,
    # hits every full page of its own prompt but the last token's.
    assert [o.num_cached_tokens for o in cached[1:]] == [64] * 5
    assert cached[0].num_cached_tokens == (len(prompts[0]["prompt_token_ids"]) - 1) // 16 * 16


def test_preempted_and_recomputed_equal_uninterrupted(hf_model_dirs, llama):
    prompts = random_prompts(seed=5, count=8, low=20, high=60)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llama.generate(prompts, params)]
    # 12 pages of 16 tokens cannot hold 8 sequences of up to 100 tokens: preemption must run.
    # (12 pages hold one sequence of 192 tokens: max_model_len may not exceed that.)
    tight = LLM(hf_model_dirs["llama"], **{**SMALL, "num_pages": 13, "max_model_len": 192})
    outputs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert tight.engine.scheduler.stats().num_free_pages == 12


def test_seeded_request_same_alone_and_in_batch(llama):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    target = random_prompts(seed=6, count=1)[0]
    alone = llama.generate(target, params)[0].outputs[0].token_ids
    others = random_prompts(seed=7, count=5)
    mixed = llama.generate(others[:2] + [target] + others[2:],
                           [SamplingParams(max_tokens=15, temperature=0.8)] * 2 + [params]
                           + [SamplingParams(max_tokens=15, temperature=0.8)] * 3)
    assert mixed[2].outputs[0].token_ids == alone
    unseeded = llama.generate([target] * 2, SamplingParams(max_tokens=20, temperature=1.0))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_every_64_bit_seed_is_its_own(llama):
    # Seeds were cut to 32 bits: 0 and 2**32 drew the same tokens.
    target = random_prompts(seed=6, count=1)[0]
    seeds = [0, 1, 2 ** 32, 2 ** 32 + 1, 2 ** 63, 2 ** 64 - 1, -1]
    drawn = [tuple(out.outputs[0].token_ids) for out in llama.generate(
        [target] * len(seeds), [SamplingParams(max_tokens=20, temperature=1.0, seed=seed)
                                for seed in seeds])]
    assert len(set(drawn[:-1])) == len(seeds) - 1   # all different
    assert drawn[-1] == drawn[-2]                   # -1 is 2**64 - 1 (mod 2**64)


def test_logprobs_equal_log_softmax_of_transformers_logits(hf_model_dirs, llama):
    prompt = random_prompts(seed=8, count=1, low=10, high=11)[0]["prompt_token_ids"]
    out = llama.generate({"prompt_token_ids": prompt},
                         SamplingParams(max_tokens=8, temperature=0, logprobs=5,
                                        prompt_logprobs=3, ignore_eos=True))[0]
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        logits = load_hf_model(hf_model_dirs["llama"])(torch.tensor([prompt + tokens])).logits[0]
    expected = torch.log_softmax(logits.double(), dim=-1).numpy()
    for step, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = expected[len(prompt) - 1 + step]
        assert entry[token].logprob == pytest.approx(row[token], abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the most likely token
        top = sorted(entry.values(), key=lambda lp: lp.rank)
        np.testing.assert_allclose([lp.logprob for lp in top], np.sort(row)[::-1][:5], atol=1e-4)
    assert out.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        actual = out.prompt_logprobs[position][prompt[position]]
        assert actual.logprob == pytest.approx(expected[position - 1][prompt[position]], abs=1e-4)


def test_stop_strings_and_length(llama):
    prompt = random_prompts(seed=9, count=1)[0]
    free = llama.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    text = free.outputs[0].text
    assert free.outputs[0].finish_reason == "length"
    assert len(free.outputs[0].token_ids) == 30
    stop = text[10:12]
    assert stop and stop in text
    stopped = llama.generate(prompt, SamplingParams(max_tokens=30, temperature=0,
                                                    ignore_eos=True, stop=[stop]))[0]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == stop
    assert stopped.outputs[0].text == text[:text.index(stop)]


def greedy_ids(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(temperature=0, **params))[0].outputs[0]


def test_min_tokens_holds_back_eos_and_stop_tokens_as_transformers_does(hf_model_dirs, llama,
                                                                        tmp_path):
    prompt = random_prompts(seed=9, count=1)[0]
    first = greedy_ids(llama, prompt, max_tokens=1, ignore_eos=True).token_ids[0]
    # The same model with the greedy first token as a second EOS (generation_config).
    eos_dir = tmp_path / "llama-eos"
    shutil.copytree(hf_model_dirs["llama"], eos_dir)
    config = json.loads((eos_dir / "generation_config.json").read_text())
    eos = sorted(llama.engine.eos_token_ids | {first})
    (eos_dir / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    with_eos = LLM(str(eos_dir), **SMALL)
    model = load_hf_model(hf_model_dirs["llama"])
    for min_tokens in (0, 1, 4):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt["prompt_token_ids"]]), max_new_tokens=8,
                                 min_new_tokens=min_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0)
        expected = out[0, len(prompt["prompt_token_ids"]):].tolist()
        assert (expected[0] == first) == (min_tokens == 0)
        ended = greedy_ids(with_eos, prompt, max_tokens=8, min_tokens=min_tokens)
        assert ended.token_ids == expected, min_tokens
        # A stop token is held back alike (vLLM's rule as well).
        stopped = greedy_ids(llama, prompt, max_tokens=8, min_tokens=min_tokens,
                             stop_token_ids=[first])
        assert stopped.token_ids == ended.token_ids, min_tokens
        if min_tokens == 0:   # ended on its first token: no text from it
            assert ended.finish_reason == stopped.finish_reason == "stop"
            assert stopped.stop_reason == first and ended.text == stopped.text == ""


def test_a_stop_tokens_text_comes_only_with_include_stop_str_in_output(llama):
    prompt = random_prompts(seed=9, count=1)[0]
    free = greedy_ids(llama, prompt, max_tokens=12, ignore_eos=True).token_ids
    index = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    decode = llama.get_tokenizer().decode
    for include, expected in ((False, decode(free[:index])), (True, decode(free[:index + 1]))):
        out = greedy_ids(llama, prompt, max_tokens=12, ignore_eos=True,
                         stop_token_ids=[free[index]], include_stop_str_in_output=include)
        assert out.token_ids == free[:index + 1] and out.stop_reason == free[index]
        assert out.text == expected, include


def test_each_streamed_text_starts_the_final_text(llama):
    # A stop string's first characters come a step before the rest; a view showing them
    # was later cut back (LLMEngine.step streams these views).
    prompt = random_prompts(seed=9, count=1)[0]
    free = greedy_ids(llama, prompt, max_tokens=30, ignore_eos=True).text
    start = next(i for i in range(1, len(free) - 1)   # two plain characters, one token each
                 if free[i:i + 2].isascii() and free[i:i + 2].isprintable())
    stop = free[start:start + 2]
    engine = llama.engine
    engine.add_request("streamed", prompt, SamplingParams(max_tokens=30, temperature=0,
                                                          ignore_eos=True, stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        texts += [out.outputs[0].text for out in engine.step() if out.request_id == "streamed"]
    assert texts[-1] == free[:free.index(stop)]
    assert all(texts[-1].startswith(text) for text in texts), texts


def test_stop_strings_are_not_looked_for_within_min_tokens(llama):
    # A prompt whose first greedy token is one plain character, then that character as stop.
    for seed in range(100, 200):
        prompt = random_prompts(seed=seed, count=1)[0]
        first = greedy_ids(llama, prompt, max_tokens=1, ignore_eos=True).text
        if first.isascii() and first.isalnum():
            break
    else:
        pytest.fail("no prompt of seeds 100-199 starts its output with a plain character")
    free = greedy_ids(llama, prompt, max_tokens=16, ignore_eos=True).text
    stopped = greedy_ids(llama, prompt, max_tokens=16, ignore_eos=True, stop=[first])
    assert stopped.text == "" and stopped.finish_reason == "stop"
    held = greedy_ids(llama, prompt, max_tokens=16, ignore_eos=True, stop=[first], min_tokens=1)
    later = free.find(first, 1)   # found again only after the first token's text
    assert held.text == (free if later < 0 else free[:later])


def test_request_beyond_max_model_len_is_rejected_before_taking_pages(llama):
    free_before = llama.engine.scheduler.stats().num_free_pages
    with pytest.raises(ValueError, match="max_model_len"):
        llama.generate({"prompt_token_ids": [5] * 250}, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]=999"):
        llama.generate({"prompt_token_ids": [5, 999]}, SamplingParams(max_tokens=10))
    assert llama.engine.scheduler.stats().num_free_pages == free_before
    assert not llama.engine.has_unfinished_requests()
