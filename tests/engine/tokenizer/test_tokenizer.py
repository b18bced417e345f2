"""Tokenizer, chat templates and streaming detokenizer, checked against transformers' AutoTokenizer.

Tiny tokenizers are built locally (no hub): a Llama-style sentencepiece model as transformers 5
saves it (tokenizer.json), the same model as a bare tokenizer.model, one without dummy prefix
laid out like Ember's default model, and a byte-level BPE wrapped as a PreTrainedTokenizerFast.
"""

from __future__ import annotations

import json
import random
import shutil

import jinja2
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.tokenizer import Tokenizer
from engine.tokenizer.detokenizer import IncrementalDetokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "Hello,", "world!", "it's",
         "don't", "café", "über", "naïve", "données", "Grüße", "straße", "ça", "ñ", "中文", "你好",
         "世界", "日本語", "🙂", "🚀", "tokens", "stream", "2024", "x=1;", "(a+b)"]
# Pieces of test text; some never occur in training, so they take the byte fallback / byte path.
TEXT_PIECES = WORDS + [" ", "  ", "\n", "\n\n", "\t", " ", "Ω", "ꙮ", "𝔘", "👩‍💻", "é", "ü", "中",
                       "<s>", "</s>", "<|im_start|>", "<|im_end|>", "0123456789", "~!@#$%^&*"]

LLAMA2_TEMPLATE = """\
{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}
    {% elif message['role'] == 'assistant' %}
        {{- ' ' + content.strip() + ' ' + eos_token -}}
    {% endif %}
{% endfor %}
"""

CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools (' + strftime_now('%Y') + ')\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {%- if message.content is string %}{{- message.content }}
        {%- else %}{%- for part in message.content %}{{- part.text }}{%- endfor %}{%- endif %}
        {%- for call in message.tool_calls | default([]) %}
            {{- '\\n<tool_call>' + (call.function | tojson) + '</tool_call>' }}
        {%- endfor %}
        {%- endgeneration %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo <actuelle> & prévisions for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour, ça va? 🙂"}],
    [{"role": "system", "content": "Réponds en 中文."},
     {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": " Grüße! "},
     {"role": "user", "content": "<s>encore\n\tplease"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "},
                                  {"type": "text", "text": "deux"}]},
     {"role": "assistant", "content": "ok", "reasoning_content": None}],
]
LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _corpus(rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]


def _random_text(rng: random.Random, max_pieces: int = 12) -> str:
    return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(0, max_pieces)))


def _write_json(path, content) -> None:
    path.write_text(json.dumps(content))


def _train_spm(directory, **options) -> None:
    """A Llama-style sentencepiece model (BPE, byte fallback, identity normalizer)."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(0))), model_prefix=str(directory / "sp"),
        model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, **options)
    (directory / "sp.model").rename(directory / "tokenizer.model")


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    """A bare tokenizer.model with the usual dummy prefix, as Llama-2 has it."""
    directory = tmp_path_factory.mktemp("spm")
    _train_spm(directory)
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", **LLAMA_SPECIALS, "add_bos_token": True,
        "add_eos_token": False, "legacy": False, "chat_template": LLAMA2_TEMPLATE})
    return directory


@pytest.fixture(scope="session")
def no_prefix_spm_dir(tmp_path_factory):
    """A bare tokenizer.model without dummy prefix, laid out like Ember's default model."""
    directory = tmp_path_factory.mktemp("no_prefix_spm")
    _train_spm(directory, add_dummy_prefix=False, pad_id=-1)
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", **LLAMA_SPECIALS, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
        "legacy": False, "clean_up_tokenization_spaces": False, "chat_template": LLAMA2_TEMPLATE})
    _write_json(directory / "special_tokens_map.json", LLAMA_SPECIALS)
    _write_json(directory / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return directory


@pytest.fixture(scope="session")
def llama_dir(spm_dir, tmp_path_factory):
    """The sentencepiece model as transformers 5 saves it: a tokenizer.json, no tokenizer.model."""
    directory = tmp_path_factory.mktemp("llama")
    transformers.AutoTokenizer.from_pretrained(spm_dir).save_pretrained(directory)
    assert (directory / "tokenizer.json").is_file()
    assert not (directory / "tokenizer.model").exists()
    return directory


@pytest.fixture(scope="session")
def bytelevel_dir(tmp_path_factory):
    """A GPT-2 style byte-level BPE with ChatML special tokens, BOS on and extra EOS ids."""
    directory = tmp_path_factory.mktemp("bytelevel")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(random.Random(1)), trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", add_bos_token=True, chat_template=CHATML_TEMPLATE)
    wrapped.save_pretrained(directory)
    _write_json(directory / "generation_config.json", {"eos_token_id": [2, 0]})
    _write_json(directory / "config.json", {"eos_token_id": 1})
    return directory


@pytest.fixture(scope="session")
def llama_class_bytelevel_dir(bytelevel_dir, tmp_path_factory):
    """The byte-level files under a Llama tokenizer class, as hub Llama 3 files declare it:
    transformers loads the file as it is (its Llama pipeline once dropped every space)."""
    directory = tmp_path_factory.mktemp("llama_class_bytelevel")
    shutil.copytree(bytelevel_dir, directory, dirs_exist_ok=True)
    config_path = directory / "tokenizer_config.json"
    _write_json(config_path, {**json.loads(config_path.read_text()),
                              "tokenizer_class": "LlamaTokenizerFast"})
    return directory


def _both(directory):
    """(ours, transformers') tokenizer for the same directory."""
    return (Tokenizer.from_pretrained(directory),
            transformers.AutoTokenizer.from_pretrained(directory))


@pytest.fixture(scope="session",
                params=["llama_dir", "spm_dir", "no_prefix_spm_dir", "bytelevel_dir",
                        "llama_class_bytelevel_dir"])
def pair(request):
    return _both(request.getfixturevalue(request.param))


# --- encode / decode -------------------------------------------------------------------------


def test_encode_matches_transformers(pair):
    ours, ref = pair
    rng = random.Random(2)
    for _ in range(300):
        text = _random_text(rng)
        for add_special in (True, False):
            expected = ref.encode(text, add_special_tokens=add_special)
            assert ours.encode(text, add_special) == expected, f"{text=} {add_special=}"


def test_long_text_encodes_as_transformers_does(pair):
    # Past 64k characters encode takes the GIL-releasing batch path; same ids either way.
    ours, ref = pair
    rng = random.Random(4)
    text = " ".join(_random_text(rng) for _ in range(4000))
    assert len(text) > 1 << 16
    for add_special in (True, False):
        assert ours.encode(text, add_special) == ref.encode(text, add_special_tokens=add_special)


def test_decode_matches_transformers(pair):
    ours, ref = pair
    rng = random.Random(3)
    for _ in range(300):
        encoded = ours.encode(_random_text(rng))
        garbage = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 12))]
        for ids in (encoded, garbage):
            for skip in (True, False):
                expected = ref.decode(ids, skip_special_tokens=skip)
                assert ours.decode(ids, skip) == expected, f"{ids=} {skip=}"


def test_one_token_decodes_as_transformers_every_time(pair):
    # decode() of one token is memoised (each streamed token decodes the one before it):
    # a repeat, with either skip_special_tokens, gives what the first call gave.
    ours, ref = pair
    special = sorted(ours.all_special_ids)
    ids = special + random.Random(12).sample(range(ours.vocab_size), min(300, ours.vocab_size))
    for _ in range(2):
        for token in ids:
            for skip in (True, False):
                expected = ref.decode([token], skip_special_tokens=skip)
                assert ours.decode([token], skip) == expected, f"{token=} {skip=}"


def test_no_prefix_sentencepiece_matches_sentencepiece_itself(no_prefix_spm_dir):
    """Without a dummy prefix the converted tokenizer gives the ids the model was trained on."""
    ours = Tokenizer.from_pretrained(no_prefix_spm_dir)
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(no_prefix_spm_dir / "tokenizer.model"))
    rng = random.Random(11)
    for _ in range(200):
        text = _random_text(rng).replace("<", "(")  # sentencepiece reads "<s>" as text
        assert ours.encode(text) == [processor.bos_id(), *processor.encode(text)], f"{text=}"
        assert ours.decode(ours.encode(text)) == processor.decode(processor.encode(text))


def test_bytelevel_round_trip(bytelevel_dir):
    ours = Tokenizer.from_pretrained(bytelevel_dir)
    rng = random.Random(4)
    for _ in range(200):
        text = _random_text(rng)
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_token_properties_match_transformers(pair):
    ours, ref = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == len(ref)
    assert set(ref.all_special_ids) <= ours.all_special_ids
    assert ref.eos_token_id in ours.eos_token_ids


def test_eos_token_ids_join_generation_config_and_config(bytelevel_dir):
    ours = Tokenizer.from_pretrained(bytelevel_dir)
    assert ours.eos_token_ids == frozenset({ours.eos_token_id, 2, 0, 1})


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False, "add_eos_token": True},
                                   {"add_bos_token": True, "add_eos_token": True}])
def test_sentencepiece_bos_eos_flags(spm_dir, tmp_path, flags):
    shutil.copy(spm_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    _write_json(tmp_path / "tokenizer_config.json",
                {"tokenizer_class": "LlamaTokenizer", **LLAMA_SPECIALS, **flags})
    ours, ref = _both(tmp_path)
    for text in ("hello world", " café 中文", ""):
        assert ours.encode(text) == ref.encode(text)


def test_hub_llama2_layout_follows_transformers(llama_dir, tmp_path):
    """Hub Llama-2 tokenizer.json files prepend "▁" with a normalizer; transformers 5 replaces
    it with its own text handling, so " hi" and text after <s> encode differently from the file."""
    backend = json.loads((llama_dir / "tokenizer.json").read_text())
    backend["pre_tokenizer"] = None
    backend["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    _write_json(tmp_path / "tokenizer.json", backend)
    _write_json(tmp_path / "tokenizer_config.json",
                {"tokenizer_class": "LlamaTokenizerFast", **LLAMA_SPECIALS})
    ours, ref = _both(tmp_path)
    rng = random.Random(10)
    for _ in range(100):
        text = _random_text(rng)
        assert ours.encode(text) == ref.encode(text), f"{text=}"


def test_config_tokens_missing_from_tokenizer_json_are_added(bytelevel_dir, tmp_path):
    backend = json.loads((bytelevel_dir / "tokenizer.json").read_text())
    backend["added_tokens"] = []  # the special tokens stay in the vocab, as ordinary tokens
    _write_json(tmp_path / "tokenizer.json", backend)
    tool = {"content": "<|tool|>", "special": True, "lstrip": False, "rstrip": False,
            "normalized": False, "single_word": False}
    _write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": "<|endoftext|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "extra_special_tokens": ["<|im_start|>"], "added_tokens_decoder": {"600": tool}})
    ours, ref = _both(tmp_path)
    rng = random.Random(9)
    for _ in range(50):
        text = _random_text(rng) + "<|tool|>" + _random_text(rng)
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert set(ref.all_special_ids) <= ours.all_special_ids


def test_legacy_special_tokens_map_wins(bytelevel_dir, tmp_path):
    backend = json.loads((bytelevel_dir / "tokenizer.json").read_text())
    backend["added_tokens"], backend["post_processor"] = [], None
    _write_json(tmp_path / "tokenizer.json", backend)
    _write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": "<|im_start|>", "eos_token": "<|im_start|>", "add_bos_token": True,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content + eos_token }}"
                         "{% endfor %}"})
    _write_json(tmp_path / "special_tokens_map.json", {
        "bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>", "lstrip": False}})
    ours, ref = _both(tmp_path)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    text = "hi <|im_end|> there<|endoftext|>"
    assert ours.encode(text) == ref.encode(text)  # no BOS: tokenizer.json has no post-processor
    conversation = CONVERSATIONS[1]
    assert ours.apply_chat_template(conversation) == ref.apply_chat_template(
        conversation, tokenize=False)


# --- chat templates --------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS[:2], ids=["one_turn", "system_multi_turn"])
def test_llama2_chat_template_matches_transformers(llama_dir, spm_dir, conversation,
                                                   add_generation_prompt):
    for directory in (llama_dir, spm_dir):
        ours, ref = _both(directory)
        for tokenize in (False, True):
            expected = ref.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                return_dict=False)
            assert ours.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                tokenize=tokenize) == expected


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS,
                         ids=["one_turn", "system_multi_turn", "text_parts"])
def test_chatml_template_matches_transformers(bytelevel_dir, conversation, add_generation_prompt,
                                              tools):
    ours, ref = _both(bytelevel_dir)
    for tokenize in (False, True):
        expected = ref.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
            tools=tools, return_dict=False)
        assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                        tokenize=tokenize, tools=tools) == expected


def test_chatml_tool_calls_without_content(bytelevel_dir):
    call = {"type": "function", "function": {"name": "get_weather",
                                             "arguments": {"city": "Zürich"}}}
    conversation = [{"role": "user", "content": "weather in Zürich?"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": "{\"temp\": 21}"}]
    ours, ref = _both(bytelevel_dir)
    assert ours.apply_chat_template(conversation, tools=TOOLS) == ref.apply_chat_template(
        conversation, tools=TOOLS, add_generation_prompt=True, tokenize=False)


def test_template_raise_exception_is_value_error(llama_dir):
    bad_order = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    ours, ref = _both(llama_dir)
    with pytest.raises(jinja2.TemplateError, match="roles must alternate") as ref_error:
        ref.apply_chat_template(bad_order, tokenize=False)
    with pytest.raises(ValueError, match="roles must alternate") as our_error:
        ours.apply_chat_template(bad_order)
    assert str(ref_error.value) in str(our_error.value)


def test_named_templates_pick_tool_use(bytelevel_dir, tmp_path):
    shutil.copytree(bytelevel_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": LLAMA2_TEMPLATE},
                               {"name": "tool_use", "template": CHATML_TEMPLATE}]
    _write_json(tmp_path / "tokenizer_config.json", config)
    ours, ref = _both(tmp_path)
    for tools in (None, TOOLS):
        assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == ref.apply_chat_template(
            CONVERSATIONS[0], tools=tools, add_generation_prompt=True, tokenize=False)


def test_legacy_chat_template_json(bytelevel_dir, tmp_path):
    shutil.copytree(bytelevel_dir, tmp_path, dirs_exist_ok=True)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    _write_json(tmp_path / "chat_template.json", {"chat_template": template})
    expected = Tokenizer.from_pretrained(bytelevel_dir).apply_chat_template(CONVERSATIONS[1])
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(CONVERSATIONS[1]) == expected


# --- streaming ---------------------------------------------------------------------------------


def _stream(tokenizer, token_ids, rng, prompt_token_ids=(), skip_special_tokens=True):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
    pieces, start = [], 0
    while start < len(token_ids):
        size = 1 if rng.random() < 0.5 else rng.randint(1, 4)
        pieces.append(detokenizer.add(token_ids[start:start + size]))
        start += size
    pieces.append(detokenizer.finish())
    assert detokenizer.text == "".join(pieces)
    return pieces


def test_streaming_joins_to_full_decode(pair):
    ours, ref = pair
    rng = random.Random(5)
    for _ in range(150):
        ids = ours.encode(_random_text(rng, max_pieces=20))
        for skip in (True, False):
            pieces = _stream(ours, ids, rng, skip_special_tokens=skip)
            full = ref.decode(ids, skip_special_tokens=skip)
            assert "".join(pieces) == full, f"{ids=}"
            if "\ufffd" not in full:
                assert not any("\ufffd" in piece for piece in pieces), f"{pieces=}"


def test_streaming_garbage_ids_and_cut_characters(pair):
    ours, ref = pair
    rng = random.Random(6)
    for _ in range(150):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 20))]
        expected = ref.decode(ids, skip_special_tokens=True)
        assert "".join(_stream(ours, ids, rng)) == expected, f"{ids=}"
    cut = ours.encode("🙂👩‍💻", add_special_tokens=False)[:-1]  # ends inside a character
    detokenizer = IncrementalDetokenizer(ours)
    held = [detokenizer.add([token_id]) for token_id in cut]
    assert not any(piece.endswith("\ufffd") for piece in held)
    assert detokenizer.text + detokenizer.finish() == ref.decode(cut)


def test_streaming_after_prompt_continues_prompt_text(pair):
    ours, _ = pair
    rng = random.Random(7)
    for _ in range(100):
        prompt = ours.encode(_random_text(rng) + "x")
        output = ours.encode(" " + _random_text(rng), add_special_tokens=False)
        expected = ours.decode(prompt + output)[len(ours.decode(prompt)):]
        assert "".join(_stream(ours, output, rng, prompt_token_ids=prompt)) == expected


def test_streaming_cost_per_token_is_bounded(llama_dir):
    longest = 0

    class CountingTokenizer(Tokenizer):
        def decode(self, token_ids, skip_special_tokens=True):
            nonlocal longest
            longest = max(longest, len(token_ids))
            return super().decode(token_ids, skip_special_tokens)

    counting = CountingTokenizer.from_pretrained(llama_dir)
    ids = counting.encode(" ".join(WORDS * 40), add_special_tokens=False)
    full = counting.decode(ids)
    longest = 0
    assert "".join(_stream(counting, ids, random.Random(8))) == full
    assert len(ids) > 1000 and longest <= 16


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("messages, field", [
    ([{"role": "bot", "content": "hi"}], "messages[0].role='bot'"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "messages[1].role=None"),
    ([{"role": "user"}], "messages[0].content=None"),
    ([{"role": "user", "content": 7}], "messages[0].content=7"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "messages[0].content[0]"),
    (["hello"], "messages[0]='hello'"),
    ([], "messages=[]"),
])
def test_bad_messages_name_the_field(bytelevel_dir, messages, field):
    with pytest.raises(ValueError) as error:
        Tokenizer.from_pretrained(bytelevel_dir).apply_chat_template(messages)
    assert str(error.value).startswith(field)


def test_bad_tools_name_the_field(bytelevel_dir):
    ours = Tokenizer.from_pretrained(bytelevel_dir)
    with pytest.raises(ValueError, match=r"tools\[0\]='get_weather'"):
        ours.apply_chat_template(CONVERSATIONS[0], tools=["get_weather"])


def test_missing_files_and_template_are_clear_errors(bytelevel_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(bytelevel_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=f"{tmp_path}: tokenizer_config.json has no chat_template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(CONVERSATIONS[0])


def test_token_bytes_join_into_the_text(pair):
    # A character split over tokens (byte fallback, byte-level pieces) decodes to U+FFFD
    # token by token; the tokens' own bytes put it back together (chat logprobs' `bytes`).
    ours, _ = pair
    rng = random.Random(5)
    for _ in range(60):
        text = " ".join(rng.choice(["héllo", "世界", "🎉", "word", "Ωmega", "a", "naïve"])
                        for _ in range(rng.randint(1, 6)))
        ids = ours.encode(text, add_special_tokens=False)
        joined = b"".join(ours.token_bytes(token) for token in ids).decode("utf-8")
        assert joined.strip(" ") == text, (text, joined)   # sentencepiece: a leading space
    special = sorted(ours.all_special_ids)
    assert all(ours.token_bytes(token) == ours.decode([token], skip_special_tokens=False)
               .encode("utf-8") for token in special)
