"""Structured output and tools in request bodies: what parses, the 400s that name the field,
and chat templates with tools rendered as transformers renders them."""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from engine.info import ModelInfo
from engine.openai.api import ApiError, Limits, parse_chat, parse_completion
from engine.openai.prompts import prepare_chat, prepare_completion
from engine.openai.tools import ToolCallFormat, detect_parser
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutput
from engine.tokenizer import Tokenizer
from tests.vocabularies import save_trained_bpe

LIMITS = Limits("m")
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "now"}}]

# Qwen2.5's template (tools in the system turn, <tool_call> blocks, <tool_response> turns).
QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3.1's template, its tool parts (tools in the first user turn, JSON calls, ipython).
LLAMA_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {{- message.content }}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
# A conversation that went through one call: OpenAI sends the arguments as JSON text.
CALLED = USER + [
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]


@pytest.fixture(scope="module", params=["qwen", "llama", "plain"])
def template_dir(request, tmp_path_factory):
    template = {"qwen": QWEN_TEMPLATE, "llama": LLAMA_TEMPLATE, "plain": PLAIN_TEMPLATE}
    directory = tmp_path_factory.mktemp(request.param)
    save_trained_bpe(directory, vocab_size=600, chat_template=template[request.param])
    return request.param, directory


def _model(directory) -> ModelInfo:
    tokenizer = Tokenizer.from_pretrained(directory)
    return ModelInfo(tokenizer, tokenizer.vocab_size + 5, 4096, SamplingParams(max_tokens=None))


def _as_transformers_expects(messages):
    """The OpenAI messages with arguments as dicts, as transformers' docs pass them."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def test_tools_render_as_transformers_renders_them(template_dir):
    kind, directory = template_dir
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    model = _model(directory)
    for messages in (USER, CALLED) if kind != "plain" else (USER,):   # plain: no tool turns
        body = {"messages": messages, "tools": TOOLS}
        prepared = prepare_chat(parse_chat(body, LIMITS), model)
        expected = reference.apply_chat_template(
            _as_transformers_expects(messages), tools=TOOLS, add_generation_prompt=True,
            tokenize=False)
        assert model.tokenizer.decode(prepared.prompts[0].token_ids,
                                      skip_special_tokens=False) == expected
    assert detect_parser(model.tokenizer) == {"qwen": "hermes", "llama": "llama3_json",
                                              "plain": "hermes"}[kind]


def test_tool_choice_sets_the_output_format(template_dir):
    _, directory = template_dir
    model = _model(directory)

    def prepared(**fields):
        return prepare_chat(parse_chat({"messages": USER, "tools": TOOLS, **fields}, LIMITS),
                            model)

    auto = prepared()
    assert auto.tool_calls.mode == "parse" and auto.params.structured_output is None
    assert prepared(tool_choice="none").tool_calls is None
    named = prepared(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_calls == ToolCallFormat("named", function_name="get_weather")
    assert named.params.structured_output == StructuredOutput.json_schema(SCHEMA)
    required = prepared(tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(required.params.structured_output.text)
    assert required.tool_calls.mode == "array" and schema["maxItems"] == 1
    assert [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]] == [
        "get_weather", "now"]
    forced = prepare_chat(parse_chat({"messages": USER, "tools": TOOLS}, Limits(
        "m", tool_call_parser="llama3_json")), model)
    assert forced.tool_calls.parser == "llama3_json"


@pytest.mark.parametrize("fields, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutput.json_object()),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "city", "schema": SCHEMA, "strict": True}}}, StructuredOutput.json_schema(SCHEMA)),
    ({"response_format": {"type": "text"}}, None),
    ({"guided_json": SCHEMA}, StructuredOutput.json_schema(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredOutput.json_schema(SCHEMA)),
    ({"guided_regex": "[0-9]{3}"}, StructuredOutput.regex("[0-9]{3}")),
    ({"guided_choice": ["a", "b"]}, StructuredOutput.choice(["a", "b"])),
    ({"guided_grammar": 'root ::= "x"'}, StructuredOutput.grammar_text('root ::= "x"')),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutput.regex("a+")),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput.json_object()),
])
def test_constraints_parse(fields, expected):
    chat = parse_chat({"messages": USER, **fields}, LIMITS)
    assert chat.structured_output == expected
    completion = parse_completion({"prompt": "x", **fields}, LIMITS)
    assert completion.structured_output == expected


BAD = [
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format.json_schema.schema",
     "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema", 'Unimplemented keys: ["uniqueItems"]'),
    ({"guided_json": "{nope"}, "guided_json", "JSON text"),
    ({"guided_regex": "(a"}, "guided_regex", "unclosed group"),
    ({"guided_grammar": 'root ::= "a" | ('}, "guided_grammar", "Expected ')'"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"structured_outputs": {"choice": "ab"}}, "structured_outputs.choice", "list"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "guided_regex is given"),
    ({"tools": {"name": "f"}}, "tools", "list"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "function"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name", "letters"),
    ({"tools": TOOLS + [TOOLS[1]]}, "tools[2].function.name", "not used by another tool"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters", "JSON schema object"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "required"),
    ({"tool_choice": "required"}, "tool_choice", "tools to choose from"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice.function.name", "one of the tools"),
    ({"tools": [TOOLS[1], {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"not": {}}}}}}], "tool_choice": "required"},
     "tools[1].function.parameters", "not"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "response_format"),
    ({"functions": [{"name": "f"}]}, "functions", "tools"),
    # Accepted once, each asking for what was never enforced: arguments that need not be an
    # object, a constraint under an unknown key, whitespace rules llguidance does not take,
    # a choice among no tools.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "properties": {"x": {"type": "integer"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", '"type": "object"'),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools[0].function.parameters", '"type": "object"'),
    ({"structured_outputs": {"jsonschema": {"type": "object"}}},
     "structured_outputs.jsonschema", "one of the keys"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
     "one of the keys"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ({"tool_choice": "auto"}, "tool_choice", "tools to choose from"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
]


@pytest.mark.parametrize("fields, param, message", BAD, ids=[f"{b[1]}-{i}" for i, b in
                                                            enumerate(BAD)])
def test_mistakes_are_400s_naming_the_field(fields, param, message):
    with pytest.raises(ApiError) as raised:
        parse_chat({"messages": USER, **fields}, LIMITS)
    assert raised.value.status == 400 and raised.value.param == param
    assert message in raised.value.message


def test_a_grammar_the_vocabulary_cannot_spell_is_a_400(template_dir):
    _, directory = template_dir
    body = {"prompt": "x", "guided_grammar": 'start: "a" <|no_such_token|>'}
    with pytest.raises(ApiError) as raised:
        prepare_completion(parse_completion(body, LIMITS), _model(directory))
    assert raised.value.param == "guided_grammar"


def test_prepared_params_carry_the_constraint(template_dir):
    _, directory = template_dir
    body = {"prompt": "x", "guided_choice": ["yes", "no"], "n": 2}
    prepared = prepare_completion(parse_completion(body, LIMITS), _model(directory))
    assert prepared.params.structured_output == StructuredOutput.choice(["yes", "no"])
    assert prepared.params.n == 2
