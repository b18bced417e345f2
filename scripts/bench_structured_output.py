"""Structured-output libraries compared: llguidance against xgrammar on one real vocabulary.

    python scripts/bench_structured_output.py                      # the default model's vocab
    python scripts/bench_structured_output.py --tokenizer DIR      # a tokenizer.json directory

Both are what vLLM uses for structured output. For each JSON schema below (nested objects,
arrays, enums, anyOf, $ref, patterns, min/max) it measures:

1. compile: schema text -> something a sequence can start from (llguidance: the grammar
   string, its validation and a first LLMatcher; xgrammar: GrammarCompiler.compile_json_schema,
   whose token-mask cache is built here, and a GrammarMatcher), with each library's cache off.
2. mask fill: the time to fill one sequence's u32[ceil(V/32)] bitmask, at every step of the
   same token sequences (drawn once with llguidance from its allowed tokens, replayed on both),
   the first fill apart (llguidance builds its lexer states lazily).
3. coverage: which schema features each library refuses (or silently ignores).

Needs `pip install xgrammar llguidance` (xgrammar also needs torch and transformers).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

ADDRESS = {"type": "object", "properties": {
    "street": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 30},
    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"],
    "additionalProperties": False}
SCHEMAS = {
    "nested objects": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
        "address": ADDRESS, "employer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30}, "address": ADDRESS},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["name", "age", "address", "employer"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 5},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"},
                                              "maxItems": 3}, "maxItems": 3}},
        "required": ["tags", "matrix"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue", "cyan", "magenta"]},
        "size": {"enum": ["S", "M", "L", 42, None]}, "unit": {"const": "cm"}},
        "required": ["color", "size", "unit"], "additionalProperties": False},
    "anyOf": {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {
            "type": "number"}}, "required": ["kind", "radius"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "integer"},
                                          "h": {"type": "integer"}},
         "required": ["kind", "w", "h"], "additionalProperties": False}]}},
        "required": ["shape"], "additionalProperties": False},
    "$ref": {"$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["sku", "qty"], "additionalProperties": False}},
        "type": "object", "properties": {"first": {"$ref": "#/$defs/item"}, "rest": {
            "type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 4}},
        "required": ["first", "rest"], "additionalProperties": False},
    "patterns + min/max": {"type": "object", "properties": {
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"},
        "score": {"type": "integer", "minimum": -5, "maximum": 250},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "code": {"type": "string", "minLength": 2, "maxLength": 6}},
        "required": ["email", "score", "ratio", "code"], "additionalProperties": False},
}
# Features beyond the above: does the library accept them (and enforce them)?
COVERAGE = {
    "format: date-time": {"type": "string", "format": "date-time"},
    "format: email": {"type": "string", "format": "email"},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"required": ["a"]}]},
    "not": {"not": {"type": "string"}},
    "if/then": {"if": {"type": "integer"}, "then": {"minimum": 3}},
    "recursive $ref": {"$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"},
    "patternProperties": {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
    "additionalProperties: schema": {"type": "object",
                                     "additionalProperties": {"type": "integer"}},
    "minProperties": {"type": "object", "minProperties": 2},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
    "contains": {"type": "array", "contains": {"const": 1}},
}
MAX_WHITESPACE = 20   # characters a JSON gap may take: engine/structured/spec.py JSON_OPTIONS
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def import_seconds(module: str) -> float:
    """Wall time of `import module` in a fresh interpreter (what a server start pays)."""
    import subprocess
    import sys
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def load_tokenizer(directory: str | None):
    """A transformers fast tokenizer: a directory's, else the default model's GGUF vocab."""
    from transformers import AutoTokenizer
    if directory:
        return AutoTokenizer.from_pretrained(directory)
    from engine.default_model.fetch import ensure_default_model
    gguf = ensure_default_model(progress=False)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


class Llguidance:
    name = "llguidance"

    def __init__(self, hf_tokenizer, vocab_size: int, compact: bool):
        import llguidance
        from engine.structured.spec import JSON_OPTIONS   # what Ember compiles, exactly
        self.options = COMPACT if compact else JSON_OPTIONS
        self.llg = llguidance
        start = time.perf_counter()
        self.tokenizer = llguidance.LLTokenizer(hf_tokenizer.backend_tokenizer.to_str(),
                                                n_vocab=vocab_size,
                                                eos_token=hf_tokenizer.eos_token_id)
        self.setup_s = time.perf_counter() - start

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=self.options)
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        return self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, row: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def finished(self, matcher) -> bool:
        return matcher.is_stopped() or matcher.is_accepting()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab_size: int, threads: int, compact: bool):
        import xgrammar
        self.xgr = xgrammar
        self.compact = compact
        start = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.setup_s = time.perf_counter() - start

    def compile(self, schema: dict):
        if self.compact:   # separators (", ", ": "), no other whitespace
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True,
                                                 max_whitespace_cnt=MAX_WHITESPACE)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, row: np.ndarray) -> None:
        import torch
        matcher.fill_next_token_bitmask(torch.from_numpy(row.view(np.int32))[None], 0)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def finished(self, matcher) -> bool:
        return matcher.is_terminated()


def allowed(row: np.ndarray, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def draw_sequences(lib, compiled, eos: int, vocab_size: int, count: int,
                   seed: int, max_len: int = 400) -> list[list[int]]:
    """Token sequences drawn uniformly from the allowed tokens until EOS (or max_len)."""
    rng = random.Random(seed)
    row = np.zeros((vocab_size + 31) // 32, np.uint32)
    sequences = []
    for _ in range(count):
        matcher, tokens = lib.matcher(compiled), []
        while len(tokens) < max_len:
            lib.fill(matcher, row)
            token = int(rng.choice(allowed(row, vocab_size)))
            tokens.append(token)
            if token == eos:
                break
            assert lib.accept(matcher, token), token
        sequences.append(tokens)
    return sequences


def time_fills(lib, compiled, sequences: list[list[int]], vocab_size: int) -> dict:
    row = np.zeros((vocab_size + 31) // 32, np.uint32)
    first, rest = [], []
    for tokens in sequences:
        matcher = lib.matcher(compiled)
        for step, token in enumerate(tokens):
            start = time.perf_counter()
            lib.fill(matcher, row)
            (first if step == 0 else rest).append(time.perf_counter() - start)
            lib.accept(matcher, token)
    rest.sort()
    return {"first_ms": 1e3 * statistics.mean(first), "mean_us": 1e6 * statistics.mean(rest),
            "p50_us": 1e6 * rest[len(rest) // 2], "p99_us": 1e6 * rest[int(len(rest) * .99)],
            "tokens": len(rest)}


def timed_compile(lib, schema: dict, vocab_size: int, repeats: int) -> tuple[float, object]:
    best, compiled = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        compiled = lib.compile(schema)
        lib.matcher(compiled)   # what one more sequence of the schema costs
        best = min(best, time.perf_counter() - start)
    return best, compiled


def coverage(lib, hf_tokenizer, vocab_size: int, draws: int = 20) -> dict[str, str]:
    """Per feature: refused (the library's message), or accepted and then checked: outputs
    drawn under its masks are validated with jsonschema, so a keyword ignored shows."""
    import jsonschema
    verdicts = {}
    for feature, schema in COVERAGE.items():
        try:
            compiled = lib.compile(schema)
        except Exception as error:  # noqa: BLE001 - we report the library's own refusal
            verdicts[feature] = f"refused: {str(error).splitlines()[0][:70]}"
            continue
        eos, invalid, finished = hf_tokenizer.eos_token_id, 0, 0
        for tokens in draw_sequences(lib, compiled, eos, vocab_size, draws, 1, max_len=200):
            if tokens[-1] != eos:
                continue
            finished += 1
            try:
                jsonschema.validate(json.loads(hf_tokenizer.decode(tokens[:-1])), schema,
                                    format_checker=jsonschema.FormatChecker())
            except (ValueError, jsonschema.ValidationError):
                invalid += 1
        verdicts[feature] = (
            f"accepted, NOT enforced: {invalid}/{finished} outputs invalid" if invalid else
            f"accepted: {finished}/{draws} outputs finished, all valid" if finished else
            "accepted: no output finished within 200 tokens")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the default model)")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="xgrammar compile threads")
    parser.add_argument("--compact", action="store_true",
                        help='JSON with ", " and ": " and no other whitespace (default: up to '
                        f"{MAX_WHITESPACE} whitespace characters a gap, as Ember compiles it)")
    args = parser.parse_args()
    hf_tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = len(hf_tokenizer)
    libs = [Llguidance(hf_tokenizer, vocab_size, args.compact),
            Xgrammar(hf_tokenizer, vocab_size, args.threads, args.compact)]
    print(f"vocabulary: {vocab_size} tokens")
    for module in ("llguidance", "xgrammar"):
        print(f"import {module}: {import_seconds(module):.2f} s (fresh interpreter)")
    for lib in libs:
        print(f"{lib.name}: tokenizer setup {lib.setup_s:.2f} s")
    print("| schema | library | compile ms | first mask ms | mask mean us | p50 us | p99 us |")
    for name, schema in SCHEMAS.items():
        compiled = {lib.name: timed_compile(lib, schema, vocab_size, args.repeats) for lib in libs}
        sequences = draw_sequences(libs[0], compiled["llguidance"][1],
                                   hf_tokenizer.eos_token_id, vocab_size, args.sequences, 0)
        for lib in libs:
            seconds, grammar = compiled[lib.name]
            fills = time_fills(lib, grammar, sequences, vocab_size)
            print(f"| {name} | {lib.name} | {1e3 * seconds:.1f} | {fills['first_ms']:.2f} | "
                  f"{fills['mean_us']:.0f} | {fills['p50_us']:.0f} | {fills['p99_us']:.0f} |")
    for lib in libs:
        print(f"{lib.name} coverage:",
              json.dumps(coverage(lib, hf_tokenizer, vocab_size), indent=1))


if __name__ == "__main__":
    main()
