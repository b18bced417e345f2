"""LLM.score: log-likelihoods equal to a transformers forward pass, lm-evaluation-harness
tokenization, and the same numbers over HTTP (/v1/completions echo + logprobs, official
openai client)."""

import random

import pytest
import torch
from transformers import AutoTokenizer

from engine import LLM
from engine.scoring import encode_pair
from tests.hf_models import build_hf_model, load_hf_model
from tests.server.conftest import ServerProcess, openai_client

ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, page_size=16, num_pages=96,
              max_model_len=256, warmup=False)
MODEL = "tiny-llama"   # the name tests/server/conftest.py serves under


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_hf_model("llama", tmp_path_factory.mktemp("scoring") / MODEL)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def hf(model_dir):
    return load_hf_model(model_dir), AutoTokenizer.from_pretrained(model_dir)


def harness_encode(tokenizer, context, continuation):
    """lm-evaluation-harness's rule, written against the transformers tokenizer."""
    if context == "":
        return [tokenizer.bos_token_id], tokenizer.encode(continuation,
                                                          add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_tokens = tokenizer.encode(context, add_special_tokens=False)
    return context_tokens, whole[len(context_tokens):]


def hf_score(model, context_tokens, continuation_tokens):
    """(summed logprob, is_greedy, per-token logprobs) from one transformers forward pass."""
    ids = torch.tensor([context_tokens + continuation_tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    rows = logprobs[len(context_tokens) - 1:-1]
    target = torch.tensor(continuation_tokens)
    chosen = rows[torch.arange(len(target)), target]
    return float(chosen.sum()), bool((rows.argmax(-1) == target).all()), chosen.tolist()


def greedy_pair(model, tokenizer, rng):
    """A (context, continuation) whose continuation is the model's argmax token."""
    for _ in range(200):
        context = "".join(rng.choice("abcdefghij ():=") for _ in range(rng.randint(3, 12)))
        ids = tokenizer.encode(context, add_special_tokens=False)
        with torch.no_grad():
            best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        text = tokenizer.decode([best])
        if text.strip() and tokenizer.encode(context + text, add_special_tokens=False) == ids + [
                best]:
            return context, text
    raise AssertionError("no round-tripping greedy token found")


def test_scores_equal_a_transformers_forward_pass(llm, hf):
    model, tokenizer = hf
    rng = random.Random(21)
    pairs = [("def add(a, b):\n    return", " a + b"),   # continuation with a leading space
             ("", "import os"),                         # empty context: BOS stands for it
             ("x = 1 ", "+ 2"),                          # trailing space moves over
             ("for i in range(10):\n", "    print(i)\n"),
             greedy_pair(model, tokenizer, rng)]
    pairs += [("".join(rng.choice("abc xyz") for _ in range(rng.randint(1, 40))),
               "".join(rng.choice("abc xyz") for _ in range(rng.randint(1, 10))))
              for _ in range(6)]
    results = llm.score(pairs, use_tqdm=False)
    greedy = []
    for pair, result in zip(pairs, results):
        context_tokens, continuation_tokens = harness_encode(tokenizer, *pair)
        assert encode_pair(llm.get_tokenizer(), *pair) == (context_tokens, continuation_tokens)
        assert result.tokens == continuation_tokens
        logprob, is_greedy, token_logprobs = hf_score(model, context_tokens,
                                                      continuation_tokens)
        assert result.logprob == pytest.approx(logprob, abs=1e-4)
        assert result.token_logprobs == pytest.approx(token_logprobs, abs=1e-4)
        assert result.is_greedy == is_greedy
        greedy.append(is_greedy)
    assert greedy[4] and not all(greedy)
    assert results[2].tokens[0] == llm.get_tokenizer().encode(" ")[0]


def test_bad_pairs_are_refused_naming_the_pair(llm):
    with pytest.raises(ValueError, match=r"pairs\[1\]: continuation='' has no token"):
        llm.score([("a", "b"), ("a", "")], use_tqdm=False)
    with pytest.raises(ValueError, match=r"pairs\[0\]: .* 301 tokens: beyond max_model_len"):
        llm.score([("a" * 300, "b")], use_tqdm=False)
    with pytest.raises(ValueError, match=r"pairs\[0\]=.*expected a \(context, continuation\)"):
        llm.score([("a", 3)], use_tqdm=False)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("scoring_server")
    process = ServerProcess(model_dir, home, home / "ledger.db", "--no-auth", "--no-warmup")
    yield process.start()
    process.stop()


def test_completions_echo_logprobs_over_http_equal_score(llm, server):
    rng = random.Random(22)
    pairs = [("def add(a, b):\n    return", " a + b"), ("", "import os")]
    pairs += [("".join(rng.choice("abc xyz()") for _ in range(rng.randint(2, 30))),
               "".join(rng.choice("abc xyz()") for _ in range(rng.randint(1, 8))))
              for _ in range(4)]
    results = llm.score(pairs, use_tqdm=False)
    client = openai_client(server, "unused")
    for pair, result in zip(pairs, results):
        context_tokens, continuation_tokens = encode_pair(llm.get_tokenizer(), *pair)
        answer = client.completions.create(model=MODEL, prompt=context_tokens
                                           + continuation_tokens, max_tokens=0, echo=True,
                                           logprobs=1)
        logprobs = answer.choices[0].logprobs
        scored = logprobs.token_logprobs[len(context_tokens):]
        assert sum(scored) == pytest.approx(result.logprob, abs=1e-4)
        assert scored == pytest.approx(result.token_logprobs, abs=1e-4)
        top = logprobs.top_logprobs[len(context_tokens):]
        assert all(max(t.values()) <= s + 1e-6 for t, s in zip(top, scored)) == result.is_greedy
        assert answer.usage.completion_tokens == 0
