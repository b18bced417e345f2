"""Structured output on real vocabularies: whatever is drawn under the masks matches."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest

from engine.sampling_params import InvalidParamError, SamplingParams
from engine.structured import (GrammarCompiler, StructuredOutput, StructuredOutputError,
                               allowed_token_ids, apply_bitmask, compiler_for)
from tests.engine.structured.sampling import Vocab, draw, vocab_for

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
             "maxItems": 3},
    "address": {"$ref": "#/$defs/address"},
    "score": {"anyOf": [{"type": "number", "minimum": -1, "maximum": 1}, {"type": "null"}]}},
    "required": ["name", "age", "role", "tags", "address", "score"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "city": {"type": "string", "maxLength": 10}},
        "required": ["zip", "city"], "additionalProperties": False}}}
EMAIL = r"[a-z]{1,8}@[a-z]{2,6}\.(com|org)"
CHOICES = ["yes", "no", "maybe later", "n/a"]
SUM_GBNF = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
SUM_LARK = 'start: "[" NUM ("," NUM)* "]"\nNUM: /-?[0-9]{1,3}/'


def _check_json_schema(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


CASES = {
    "json_schema": (StructuredOutput.json_schema(PERSON), _check_json_schema),
    "regex": (StructuredOutput.regex(EMAIL), lambda text: re.fullmatch(EMAIL, text) or 1 / 0),
    "choice": (StructuredOutput.choice(CHOICES), lambda text: CHOICES.index(text)),
    "gbnf": (StructuredOutput.grammar_text(SUM_GBNF),
             lambda text: re.fullmatch(r"\((?:[0-9]|[1-9][0-9])(?:\+(?:[0-9]|[1-9][0-9]))*\)",
                                       text) or 1 / 0),
    "lark": (StructuredOutput.grammar_text(SUM_LARK),
             lambda text: re.fullmatch(r"\[-?[0-9]{1,3}(?:,-?[0-9]{1,3})*\]", text) or 1 / 0),
}


@pytest.fixture(scope="module")
def vocab(vocab_tokenizer) -> Vocab:
    return vocab_for(vocab_tokenizer)


@pytest.mark.parametrize("case", CASES)
def test_every_sampled_output_matches(case, vocab):
    spec, check = CASES[case]
    rng = random.Random(f"{case}-{vocab.tokenizer.vocab_size}")
    finished = 0
    for _ in range(12):
        tokens, done = draw(vocab, vocab.compiler.matcher(spec), rng)
        if done:
            finished += 1
            check(vocab.tokenizer.decode(tokens))
    assert finished >= 6


def test_json_object_takes_objects_only(trained_tokenizer):
    compiler = compiler_for(trained_tokenizer, trained_tokenizer.vocab_size)
    spec = StructuredOutput.json_object()
    for text in ('{"a": [1, {"b": null}], "c": "d"}', '{\n  "x": -1.5e3\n}', "{}"):
        matcher = compiler.matcher(spec)
        assert all(matcher.accept(t) for t in trained_tokenizer.encode(text, False)), text
        assert matcher.can_finish()
    for text in ("[1]", '"a"', "1", "null"):
        first_token = trained_tokenizer.encode(text, False)[0]
        assert not compiler.matcher(spec).accept(first_token), text


@pytest.mark.parametrize("choice", ["d\x7f", "\x01", "x\ty", 'q"r', "a/b", "l\u2028m"])
def test_a_choice_with_any_character_is_taken_as_written(choice, trained_tokenizer):
    # DEL went into the grammar's string literal raw, and its lexer refused the choice.
    compiler = compiler_for(trained_tokenizer, trained_tokenizer.vocab_size)
    matcher = compiler.matcher(StructuredOutput.choice([choice, "other"]))
    assert all(matcher.accept(t) for t in trained_tokenizer.encode(choice, False))
    assert matcher.can_finish()


def test_finished_grammar_allows_only_eos(vocab):
    compiler, vocab_tokenizer = vocab.compiler, vocab.tokenizer
    matcher = compiler.matcher(StructuredOutput.choice(["maybe later"]))
    for token in vocab_tokenizer.encode("maybe later", add_special_tokens=False):
        assert matcher.accept(token)
    assert matcher.is_finished() and matcher.can_finish()
    row = np.zeros(compiler.bitmask_width, np.uint32)
    matcher.fill_bitmask(row)
    assert set(allowed_token_ids(row, compiler.vocab_size).tolist()) == set(
        compiler.eos_token_ids)
    assert matcher.accept(min(compiler.eos_token_ids))
    assert not matcher.accept(vocab_tokenizer.encode("x", add_special_tokens=False)[0])


def _mask(compiler, matcher) -> np.ndarray:
    row = np.zeros(compiler.bitmask_width, np.uint32)
    matcher.fill_bitmask(row)
    return row


def test_matchers_keep_their_own_state(vocab):
    compiler, vocab_tokenizer = vocab.compiler, vocab.tokenizer
    spec = StructuredOutput.json_schema(PERSON)
    first, second = compiler.matcher(spec), compiler.matcher(spec)
    fresh = _mask(compiler, second)
    prefix = vocab_tokenizer.encode('{"name": "Ann", "age": 4', add_special_tokens=False)
    assert all(first.accept(token) for token in prefix)
    assert not np.array_equal(_mask(compiler, first), fresh)
    assert np.array_equal(_mask(compiler, second), fresh)          # untouched by the first
    fork = first.copy()                                            # a sibling sample
    assert fork.accept(vocab_tokenizer.encode("2", add_special_tokens=False)[0])
    assert first.num_accepted == len(prefix) and fork.num_accepted == len(prefix) + 1
    after_prefix = _mask(compiler, first)
    fork.rollback(1)
    assert np.array_equal(_mask(compiler, fork), after_prefix)
    with pytest.raises(ValueError, match="num_tokens=99"):
        fork.rollback(99)
    first.reset()
    assert np.array_equal(_mask(compiler, first), fresh) and first.num_accepted == 0


def test_compiled_grammars_are_cached_by_text(trained_tokenizer):
    compiler = GrammarCompiler.from_tokenizer(trained_tokenizer, trained_tokenizer.vocab_size,
                                              cache_size=2)
    regex = compiler.compile(StructuredOutput.regex("[a-z]+"))
    assert compiler.compile(StructuredOutput.regex("[a-z]+")) is regex
    compiler.compile(StructuredOutput.choice(["a"]))
    compiler.compile(StructuredOutput.json_object())               # evicts the regex
    assert compiler.num_cached == 2
    assert compiler.compile(StructuredOutput.regex("[a-z]+")) is not regex
    size = trained_tokenizer.vocab_size + 64
    assert compiler_for(trained_tokenizer, size) is compiler_for(trained_tokenizer, size)


@pytest.mark.parametrize("make, name, message", [
    (lambda: StructuredOutput.json_schema({"type": "strin"}), "json_schema", "strin"),
    (lambda: StructuredOutput.json_schema({"type": "array", "uniqueItems": True}),
     "json_schema", "uniqueItems"),
    (lambda: StructuredOutput.json_schema('{"type": '), "json_schema", "JSON text"),
    (lambda: StructuredOutput.json_schema({"$ref": "#/$defs/missing"}), "json_schema",
     "missing"),
    (lambda: StructuredOutput.regex("[a-"), "regex", "unclosed character class"),
    (lambda: StructuredOutput.regex("a(?=b)"), "regex", "look-around"),
    (lambda: StructuredOutput.grammar_text('root ::= "a" | ('), "grammar", "Expected ')'"),
    (lambda: StructuredOutput.grammar_text("start: foo"), "grammar", "foo"),
    (lambda: StructuredOutput.choice([]), "choice", "non-empty list"),
    (lambda: StructuredOutput("xml", "<a/>"), "kind", "expected one of"),
])
def test_invalid_constraints_name_the_field(make, name, message):
    with pytest.raises(StructuredOutputError, match=re.escape(message)) as raised:
        make()
    assert raised.value.name == name and raised.value.reason


def test_grammar_naming_an_unknown_special_token_fails_to_compile(trained_tokenizer):
    compiler = compiler_for(trained_tokenizer, trained_tokenizer.vocab_size)
    with pytest.raises(StructuredOutputError, match="grammar="):
        compiler.compile(StructuredOutput.grammar_text('start: "a" <|no_such_token|>'))


def test_bitmask_reference_masks_exactly_the_cleared_bits():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 77)).astype(np.float32)
    bitmask = rng.integers(0, 2 ** 32, size=(5, 3), dtype=np.uint32)
    enabled = np.array([True, False, True, True, False])
    masked = apply_bitmask(logits, bitmask, enabled)
    for row in range(5):
        allowed = set(allowed_token_ids(bitmask[row], 77).tolist())
        for token in range(77):
            keep = not enabled[row] or token in allowed
            assert masked[row, token] == (logits[row, token] if keep else -np.inf)
    with pytest.raises(ValueError, match="bitmask.shape"):
        apply_bitmask(logits, bitmask[:, :2])


def test_sampling_params_carry_a_structured_output():
    spec = StructuredOutput.regex("[0-9]+")
    assert SamplingParams(structured_output=spec).structured_output is spec
    assert SamplingParams(structured_output=spec) == SamplingParams(
        structured_output=StructuredOutput.regex("[0-9]+"))
    with pytest.raises(InvalidParamError, match="structured_output"):
        SamplingParams(structured_output={"type": "json_object"})


def test_batch_fill_matches_one_by_one(trained_tokenizer):
    compiler = compiler_for(trained_tokenizer, trained_tokenizer.vocab_size)
    specs = [StructuredOutput.json_schema(PERSON), StructuredOutput.regex(EMAIL),
             StructuredOutput.choice(CHOICES), StructuredOutput.grammar_text(SUM_LARK)]
    matchers = [compiler.matcher(spec) for spec in specs]
    for matcher, prefix in zip(matchers, ('{"name": "a', "ab@", "may", "[1,")):
        assert all(matcher.accept(t) for t in trained_tokenizer.encode(prefix, False))
    bitmask = np.full((6, compiler.bitmask_width), 7, np.uint32)
    compiler.fill_bitmasks([(matchers[0], 4), (matchers[1], 0), (matchers[2], 2),
                            (matchers[3], 5)], bitmask)
    for matcher, row in zip(matchers, (4, 0, 2, 5)):
        np.testing.assert_array_equal(bitmask[row], _mask(compiler, matcher))
    assert (bitmask[[1, 3]] == 7).all()                               # rows not named
    with pytest.raises(ValueError, match="expected indices below 6"):
        compiler.fill_bitmasks([(matchers[0], 6)], bitmask)


def test_a_model_vocabulary_below_the_tokenizers_is_refused(trained_tokenizer):
    with pytest.raises(ValueError, match="vocab_size=2000"):
        GrammarCompiler.from_tokenizer(trained_tokenizer, 2000)
