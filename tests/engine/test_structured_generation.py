"""LLM.generate under structured output: every output matches its constraint (greedy and
sampled, n > 1, preempted), free rows of a mixed batch draw what they draw alone, and nothing
compiles after warm-up."""

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.structured import StructuredOutput
from tests.engine.test_generation import SMALL, random_prompts

SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 99}},
          "required": ["kind", "age"], "additionalProperties": False}
CONSTRAINTS = [
    (StructuredOutput.regex("[0-9]{2,4}-[a-z]{1,3}"),
     lambda text: re.fullmatch("[0-9]{2,4}-[a-z]{1,3}", text)),
    (StructuredOutput.choice(["alpha", "beta", "gamma delta"]),
     lambda text: text in ("alpha", "beta", "gamma delta")),
    (StructuredOutput.json_schema(SCHEMA),
     lambda text: jsonschema.validate(json.loads(text), SCHEMA) or True),
]


@pytest.fixture(scope="module")
def warm_llm(hf_model_dirs):
    return LLM(hf_model_dirs["llama"], **{**SMALL, "warmup": True})


def _check(outputs, params):
    for output, param in zip(outputs, params):
        check = next(c for spec, c in CONSTRAINTS if spec == param.structured_output)
        for sample in output.outputs:
            assert sample.finish_reason == "stop", sample
            assert check(sample.text), sample.text


def test_outputs_match_their_constraints(warm_llm):
    prompts = random_prompts(seed=3, count=12, low=3, high=30)
    params = [SamplingParams(n=2, max_tokens=220, temperature=[0.0, 1.0][i % 2], seed=i,
                             structured_output=CONSTRAINTS[i % 3][0])
              for i in range(len(prompts))]
    outputs = warm_llm.generate(prompts, params, use_tqdm=False)
    _check(outputs, params)
    assert warm_llm.engine.compilations_after_warmup == 0


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_a_grammar_ended_by_eos_leaves_its_text_out(warm_llm, ignore_eos):
    # [0-9]+ can only end by EOS; with special tokens shown, "</s>" was in every text.
    spec = StructuredOutput.regex("[0-9]+")
    params = SamplingParams(n=2, max_tokens=60, temperature=1.0, seed=3, structured_output=spec,
                            skip_special_tokens=False, ignore_eos=ignore_eos)
    samples = [sample for output in warm_llm.generate(random_prompts(seed=1, count=6), params,
                                                      use_tqdm=False)
               for sample in output.outputs if sample.finish_reason == "stop"]
    assert samples
    for sample in samples:
        assert re.fullmatch("[0-9]+", sample.text), sample.text
        assert sample.token_ids[-1] in warm_llm.engine.eos_token_ids   # the token is kept


def test_free_rows_of_a_mixed_batch_are_untouched(warm_llm):
    prompts = random_prompts(seed=4, count=6)
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=9, ignore_eos=True)
    alone = warm_llm.generate(prompts, free, use_tqdm=False)
    # Constrained rows with penalties and logprobs too: every bucket flag at once.
    mixed_params = [free if i % 2 == 0 else SamplingParams(
        max_tokens=200, seed=i, structured_output=CONSTRAINTS[0][0], logprobs=2,
        repetition_penalty=1.0 if i == 1 else 1.3) for i in range(6)]
    mixed = warm_llm.generate(prompts, mixed_params, use_tqdm=False)
    for i in range(0, 6, 2):
        assert mixed[i].outputs[0].token_ids == alone[i].outputs[0].token_ids
    _check(mixed[1::2], mixed_params[1::2])
    assert warm_llm.engine.compilations_after_warmup == 0


def test_preempted_requests_keep_their_grammar(hf_model_dirs):
    llm = LLM(hf_model_dirs["llama"], **{**SMALL, "num_pages": 14, "max_model_len": 160})
    prompts = random_prompts(seed=5, count=8, low=40, high=60)
    spec = StructuredOutput.regex("(ab|cd){20,30}")   # 40 to 60 tokens: the sequences grow
    params = SamplingParams(max_tokens=100, temperature=1.0, seed=1, structured_output=spec)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0
    for output in outputs:
        assert output.outputs[0].finish_reason == "stop"
        assert re.fullmatch("(ab|cd){20,30}", output.outputs[0].text)


def test_an_invalid_grammar_is_refused_before_queueing(warm_llm):
    spec = StructuredOutput.grammar_text('start: "a" <|no_such_token|>')
    with pytest.raises(ValueError, match="grammar="):
        warm_llm.engine.add_request("bad", "hi", SamplingParams(structured_output=spec))
    assert not warm_llm.engine.has_unfinished_requests()
