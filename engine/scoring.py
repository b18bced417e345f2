"""Log-likelihood scoring: how likely a model finds a continuation after a context.

    results = LLM().score([("def add(a, b):\\n    return", " a + b"), ...])
    results[0].logprob, results[0].is_greedy

Tokenization follows lm-evaluation-harness (`HFLM._encode_pair` and `loglikelihood`, with
its default add_bos_token=False), so scores are comparable with the harness's:

1. trailing whitespace of the context moves to the front of the continuation
   ("Q: 2+2 =", " 4" stays as is; "Q: 2+2 = ", "4" becomes "Q: 2+2 =", " 4");
2. context_tokens = encode(context); continuation_tokens = encode(context + continuation)
   [len(context_tokens):] (so a token that merges across the boundary is scored whole);
3. an empty context becomes [BOS] (EOS when the model has no BOS), and then
   continuation_tokens = encode(continuation).

encode adds no special tokens unless add_bos_token=True (as the harness's add_bos_token,
which it turns on for Gemma). The prompt context_tokens + continuation_tokens runs through
the engine with max_tokens=0 and prompt_logprobs=0, all pairs batched together; each
continuation token's logprob and rank (1 = the argmax) come from the prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class ScoreResult:
    """One (context, continuation) pair's score.

    Attributes:
      logprob: sum of the continuation tokens' log probabilities.
      is_greedy: every continuation token is the model's most likely next token.
      token_logprobs: each continuation token's log probability.
      tokens: the continuation's token ids.
    """

    logprob: float
    is_greedy: bool
    token_logprobs: list[float]
    tokens: list[int]


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_bos_token: bool = False) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) by the harness's rule (see the module doc)."""
    if context == "":
        prefix = tokenizer.bos_token_id
        prefix = tokenizer.eos_token_id if prefix is None else prefix
        if prefix is None:
            raise ValueError("context is empty and the tokenizer has neither BOS nor EOS to "
                             "stand for it")
        return [prefix], tokenizer.encode(continuation, add_special_tokens=add_bos_token)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_bos_token)
    context_tokens = tokenizer.encode(context, add_special_tokens=add_bos_token)
    return context_tokens, whole[len(context_tokens):]


def score(llm: Any, pairs: list[tuple[str, str]], *, add_bos_token: bool = False,
          use_tqdm: bool = True) -> list[ScoreResult]:
    """Scores every pair in one batched run of `llm` (an engine.LLM); see LLM.score.

    Raises:
      ValueError: naming pairs[i]: not two strings, no continuation token, or too long.
    """
    tokenizer, max_len = llm.get_tokenizer(), llm.engine.max_model_len
    prompts, spans = [], []
    for index, pair in enumerate(pairs):
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(text, str) for text in pair)):
            raise ValueError(f"pairs[{index}]={str(pair)[:80]}: expected a (context, "
                             "continuation) pair of strings")
        context_tokens, continuation_tokens = encode_pair(tokenizer, *pair, add_bos_token)
        if not continuation_tokens:
            raise ValueError(f"pairs[{index}]: continuation={pair[1][:40]!r} has no token of "
                             "its own: expected text to score")
        total = len(context_tokens) + len(continuation_tokens)
        if total > max_len:
            raise ValueError(f"pairs[{index}]: context and continuation have {total} tokens: "
                             f"beyond max_model_len={max_len}")
        prompts.append({"prompt_token_ids": context_tokens + continuation_tokens})
        spans.append(len(context_tokens))
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    results = []
    for prompt, start, output in zip(prompts, spans, outputs):
        tokens = prompt["prompt_token_ids"][start:]
        entries = [output.prompt_logprobs[start + i][token] for i, token in enumerate(tokens)]
        token_logprobs = [entry.logprob for entry in entries]
        results.append(ScoreResult(logprob=float(sum(token_logprobs)),
                                   is_greedy=all(entry.rank == 1 for entry in entries),
                                   token_logprobs=token_logprobs, tokens=list(tokens)))
    return results
