"""Validation at the edge: every numeric field within what the runner packs (int32, float32,
> 0 after float32 rounding where required), every string valid Unicode, one set of bounds
shared by SamplingParams (the offline API), the OpenAI parsing (the server) and `ember batch`.
The hostile cases are tables; the server and batch suites send the same values end to end."""

import dataclasses
import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.core.request import Request
from engine.info import ModelInfo
from engine.openai import api
from engine.openai.prompts import prepare_chat, prepare_completion
from engine.sampling_params import RANGES, InvalidParamError
from engine.tokenizer import Tokenizer
from engine.worker.runner import Runner
from tests.hf_models import build_hf_model

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=64, page_size=16, num_pages=96,
             max_model_len=256, warmup=False, compilation_cache_dir="")
LIMITS = api.Limits("tiny")
# (field, value, the field SamplingParams names, the param the server's 400 names (None: the
# body is not JSON)): each passes a naive check (an int, a positive number) yet cannot be
# packed, or packs into a value the sampler cannot use.
POISON = [
    ("top_k", 2 ** 31, "top_k", "top_k"),                         # int32 overflow in the runner
    ("top_k", -2, "top_k", "top_k"),
    ("seed", 2 ** 64, "seed", "seed"),
    ("seed", -2 ** 63 - 1, "seed", "seed"),
    ("min_tokens", 2 ** 31, "min_tokens", "min_tokens"),
    ("repetition_penalty", 1e-300, "repetition_penalty", "repetition_penalty"),  # 0 in f32
    ("repetition_penalty", 1e-40, "repetition_penalty", "repetition_penalty"),   # logits/it: inf
    ("repetition_penalty", 0, "repetition_penalty", "repetition_penalty"),
    ("top_p", 1e-50, "top_p", "top_p"),                           # 0.0 in float32
    ("top_p", 1.5, "top_p", "top_p"),
    ("temperature", 1e39, "temperature", "temperature"),          # inf in float32
    ("temperature", -0.5, "temperature", "temperature"),
    ("presence_penalty", 2.5, "presence_penalty", "presence_penalty"),
    ("frequency_penalty", float("inf"), "frequency_penalty", None),
    ("frequency_penalty", float("nan"), "frequency_penalty", None),
    ("min_p", 1.0000001, "min_p", "min_p"),
    ("logprobs", 21, "logprobs", "logprobs"),
    ("stop_token_ids", [5, 2 ** 31], "stop_token_ids[1]", "stop_token_ids"),
    ("stop", ["ok", "a\ud800"], "stop[1]", "stop[1]"),
]
POISON_IDS = [f"{case[0]}={case[1]!r}" for case in POISON]
SURROGATE = "fine \ud800 text"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_hf_model("llama", tmp_path_factory.mktemp("validation") / "tiny-llama")


@pytest.fixture(scope="module")
def info(model_dir):
    return ModelInfo(Tokenizer.from_pretrained(model_dir), 320, 256, SamplingParams())


@pytest.mark.parametrize("field,value,param,_", POISON, ids=POISON_IDS)
def test_sampling_params_rejects_what_the_engine_cannot_pack(field, value, param, _):
    with pytest.raises(InvalidParamError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.name == param and str(caught.value).startswith(f"{param}=")
    assert "expected" in str(caught.value)
    with pytest.raises(ValueError, match=f"^{re.escape(param)}="):
        dataclasses.replace(SamplingParams(), **{field: value})


@pytest.mark.parametrize("field,value", [("stop", 5), ("stop", {"a": 1}),
                                         ("stop_token_ids", 5), ("stop_token_ids", "5")])
def test_sampling_params_names_a_stop_field_of_the_wrong_type(field, value):
    # These once raised a TypeError naming nothing (an int is not iterable).
    with pytest.raises(InvalidParamError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.name == field and "expected a " in str(caught.value)


def random_in(bounds, rng):
    """An endpoint or a random value of a range (log-uniform for wide ones)."""
    low = bounds.low if not bounds.low_open else min(bounds.high, bounds.low + 1e-6)
    if bounds.integer:
        return rng.choice([int(low), int(bounds.high), rng.randint(int(low), int(bounds.high))])
    return rng.choice([low, bounds.high, rng.uniform(low, bounds.high)])


def test_every_accepted_value_packs_as_the_runner_packs_it():
    """Random values within RANGES (their endpoints included) go through the runner's own
    packing: no overflow, finite float32, > 0 where the range excludes 0."""
    rng = random.Random()
    seed = rng.randrange(2 ** 32)
    rng.seed(seed)
    for _ in range(200):
        fields = {name: random_in(RANGES[name], rng) for name in (
            "temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty")}
        params = SamplingParams(**fields, seed=random_in(RANGES["seed"], rng))
        requests = [Request("r", [1, 2, 3], params, seed=params.seed % 2 ** 32)]
        runner = SimpleNamespace(max_model_len=16)
        sampling, penalties = Runner._sampling_arrays(runner, requests, 2, True)
        for name, array in [*sampling._asdict().items(), *penalties._asdict().items()]:
            assert np.all(np.isfinite(array)), (name, fields, seed)
        assert sampling.top_k[0] == params.top_k, (fields, seed)
        assert sampling.top_p[0] > 0 and penalties.repetition[0] > 0, (fields, seed)


def test_a_tiny_temperature_is_raised_to_the_minimum_as_vllm_does():
    assert SamplingParams(temperature=1e-300).temperature == 0.01   # not 0: still sampled
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.5).temperature == 0.5


def completion(**fields):
    return {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, **fields}


def parse_and_prepare(body, info, chat=False):
    if chat:
        return prepare_chat(api.parse_chat(body, LIMITS), info)
    return prepare_completion(api.parse_completion(body, LIMITS), info)


@pytest.mark.parametrize("field,value,_,param", POISON, ids=POISON_IDS)
def test_the_openai_parsing_answers_400_naming_the_field(field, value, _, param, info):
    # As the server reads it: bytes through parse_json_body (NaN and Infinity are not JSON).
    raw = json.dumps(completion(**{field: value})).encode()
    with pytest.raises(api.ApiError) as caught:
        parse_and_prepare(api.parse_json_body(raw), info)
    error = caught.value
    assert (error.status, error.param) == (400, param), error.body()
    assert error.code == ("invalid_json" if param is None else
                          "invalid_encoding" if field == "stop" else "invalid_value")
    if param is not None:
        assert error.message.startswith(f"{param}="), error.message


# (raw JSON body, the JSON path the 400 names): a lone surrogate wherever a string enters.
SURROGATE_BODIES = [
    ('{"prompt": "a\\ud800"}', "prompt"),
    ('{"prompt": ["ok", "b\\udfff"]}', "prompt[1]"),
    ('{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    ('{"prompt": "x", "stop": ["ok", "\\udc00"]}', "stop[1]"),
    ('{"prompt": "x", "user": "\\ud800"}', "user"),
    ('{"prompt": "x", "model": "\\ud800"}', "model"),
    ('{"prompt": "x", "stream_options": {"\\ud800": true}}', "stream_options.'\\ud800'"),
    ('{"prompt": "x", "extra": [[{"deep": "\\ud800"}]]}', "extra[0][0].deep"),
    ('{"tokens": [1], "prompt": "\\ud800"}', "prompt"),        # /tokenize's body
]


@pytest.mark.parametrize("raw,path", SURROGATE_BODIES, ids=[c[1] for c in SURROGATE_BODIES])
def test_a_lone_surrogate_anywhere_is_a_400_naming_its_json_path(raw, path):
    with pytest.raises(api.ApiError) as caught:
        api.parse_json_body(raw.encode())
    error = caught.value
    assert (error.status, error.code, error.param) == (400, "invalid_encoding", path)
    assert "lone surrogate" in error.message
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")   # answerable as UTF-8


def test_a_valid_surrogate_pair_is_text_not_an_error(info):
    body = api.parse_json_body('{"model": "tiny", "prompt": "smile \\ud83d\\ude00"}'.encode())
    prepared = parse_and_prepare(body, info)
    assert prepared.prompts[0].text == "smile \U0001F600"


def test_offline_tokenizer_and_chat_name_the_bad_text(info):
    with pytest.raises(ValueError, match=r"^prompt='fine \\ud800 text': expected valid Unicode"):
        info.tokenizer.encode(SURROGATE)
    with pytest.raises(ValueError, match=r"^messages\[1\]\.content="):
        info.tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                            {"role": "user", "content": SURROGATE}])


@pytest.mark.parametrize("default,chat,words", [
    (None, False, 5),       # OpenAI's legacy 16 for completions
    (None, True, 5),        # chat: the whole remaining context
    (64, False, 5),
    (64, True, 5),
    (64, True, 180),        # cut to what the context leaves
    (64, False, 240),
])
def test_default_max_tokens_is_the_servers_cut_to_the_context(default, chat, words, info):
    limits = api.Limits("tiny", default_max_tokens=default)
    text = "".join(random.choice("abcd") for _ in range(words))   # a token per letter
    if chat:
        body = {"messages": [{"role": "user", "content": text}], "n": 2}
        prepared = prepare_chat(api.parse_chat(body, limits), info)
    else:
        body = {"prompt": [text, text + " e"], "n": 2}
        prepared = prepare_completion(api.parse_completion(body, limits), info)
    longest = max(len(p.token_ids) for p in prepared.prompts)
    room = info.max_model_len - longest
    wanted = default if default is not None else (None if chat else 16)
    assert prepared.params.max_tokens == (room if wanted is None else min(wanted, room))
    if words > 100:
        assert room < 64   # the cut is what is under test
    # The quota reserves every prompt plus n times that value.
    assert prepared.estimated_tokens == sum(len(p.token_ids) + 2 * prepared.params.max_tokens
                                            for p in prepared.prompts)


def test_limits_reject_a_nonsense_default():
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="default_max_tokens="):
            api.Limits("tiny", default_max_tokens=bad)


def test_a_poisoned_offline_request_beside_another_is_refused_before_anything_is_queued(
        model_dir):
    llm = LLM(model_dir, **SMALL)
    engine = llm.engine
    victim = {"prompt_token_ids": np.random.default_rng().integers(3, 300, 20).tolist()}
    victim_params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = llm.generate(victim, victim_params, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("victim", victim, victim_params)
    for field, value, param, _ in POISON:
        with pytest.raises(ValueError, match=f"^{re.escape(param)}=.*expected"):
            llm.generate(["def f(x):", victim], [SamplingParams(max_tokens=4),
                                                 SamplingParams(**{field: value})])
    with pytest.raises(ValueError, match=r"^prompts\[1\]: prompt='fine \\ud800 text': "
                                         "expected valid Unicode"):
        llm.generate(["def f(x):", SURROGATE], SamplingParams(max_tokens=4), use_tqdm=False)
    assert engine.stats().num_waiting + engine.stats().num_running == 1   # the victim alone
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outputs] == ["victim"]
    assert outputs[0].outputs[0].token_ids == alone


def test_a_default_max_tokens_never_undercuts_min_tokens(info):
    limits = api.Limits("tiny", default_max_tokens=4)
    parsed = api.parse_completion({"prompt": "abc", "min_tokens": 9}, limits)
    assert prepare_completion(parsed, info).params.max_tokens == 9
    parsed = api.parse_completion({"prompt": "abc", "min_tokens": 9, "max_tokens": 5}, limits)
    with pytest.raises(api.ApiError, match=r"^min_tokens=9: expected at most max_tokens=5"):
        prepare_completion(parsed, info)


def chat_ids(body, info):
    return parse_and_prepare({"model": "tiny", **body}, info, chat=True).prompts[0].token_ids


def test_text_parts_reach_a_string_template_as_one_string(info):
    # The template concatenates message['content']: a list of parts failed there (a 400).
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    assert chat_ids({"messages": [{"role": "user", "content": parts}]}, info) == chat_ids(
        {"messages": [{"role": "user", "content": "hel\nlo"}]}, info)


def test_an_answered_tool_call_goes_back_as_the_server_gave_it(info):
    # The assistant message as the server answers it (content null beside tool_calls), then
    # the tool's result: the standard round trip, once a 400 ('no attribute content').
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "user", "content": "1 + 2?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    assert chat_ids({"messages": messages}, info) == chat_ids(
        {"messages": [{**messages[1], "content": ""} if m is messages[1] else m
                      for m in messages]}, info)
