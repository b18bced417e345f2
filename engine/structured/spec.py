"""StructuredOutput: what a request's output must match, checked when it is made (no JAX).

One of five kinds, each carried as text so that equal constraints are equal keys of the
compiled-grammar cache (`(kind, text)`):

| kind          | text                                   | llguidance grammar            |
| ------------- | -------------------------------------- | ----------------------------- |
| `json_object` | ""                                     | JSON schema {"type": "object"} |
| `json_schema` | the schema as compact JSON             | JSON schema                   |
| `regex`       | the pattern (Rust regex syntax)        | regex                         |
| `grammar`     | Lark, or GBNF (llama.cpp's EBNF)       | Lark (GBNF converted)         |
| `choice`      | the choices as a JSON list of strings  | Lark alternatives             |

Construction runs llguidance's own validation without a tokenizer, so a bad schema, regex
or grammar fails where it is written, with the library's message and the field it came
from; checks that need the vocabulary (a special token named in a grammar) run again when
the grammar is compiled for a tokenizer (`engine/structured/compiler.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
MAX_TEXT_CHARS = 1 << 20   # a schema or grammar beyond 1 MiB of text is refused
# JSON output: any whitespace the model likes between tokens, up to 20 characters a gap:
# enough for pretty-printed nesting, never an endless run of newlines.
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}


class StructuredOutputError(ValueError):
    """A constraint the library refuses: `name` is the field, `value` what was given,
    `reason` the library's message (all three also in the message)."""

    def __init__(self, name: str, value: object, reason: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"{name}={shown}: {reason}")
        self.name, self.value, self.reason = name, value, reason


@dataclass(slots=True, frozen=True)
class StructuredOutput:
    """A constraint on one request's output. Build it with the class methods.

    Attributes:
      kind: one of KINDS.
      text: the constraint as text (see the module table); the compile cache's key.
      grammar: the llguidance grammar built from it (derived, not compared).
    """

    kind: str
    text: str = ""
    grammar: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError("kind", self.kind, f"expected one of {KINDS}")
        if not isinstance(self.text, str):
            raise StructuredOutputError(self.kind, self.text, "expected a string")
        if len(self.text) > MAX_TEXT_CHARS:
            raise StructuredOutputError(self.kind, f"<{len(self.text)} characters>",
                                        f"expected at most {MAX_TEXT_CHARS} characters")
        if self.kind == "json_object" and self.text:
            raise StructuredOutputError("json_object", self.text, "expected no text")
        try:
            grammar = _to_grammar(self.kind, self.text)
        except ValueError as error:   # e.g. a json_schema text that is not a JSON object
            raise StructuredOutputError(self.kind, self.text,
                                        library_message(str(error))) from None
        error = _llguidance().LLMatcher.validate_grammar(grammar, None)
        if error:
            raise StructuredOutputError(self.kind, self.text, library_message(error))
        object.__setattr__(self, "grammar", grammar)

    @classmethod
    def json_object(cls) -> StructuredOutput:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> StructuredOutput:
        """JSON valid against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as error:
                raise StructuredOutputError("json_schema", schema,
                                            f"expected JSON text: {error}") from None
        if not isinstance(schema, dict):
            raise StructuredOutputError("json_schema", schema, "expected a JSON object")
        return cls("json_schema", json.dumps(schema, ensure_ascii=False,
                                             separators=(",", ":")))

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        """Text matching `pattern` as a whole (Rust regex syntax; no look-around)."""
        return cls("regex", _non_empty("regex", pattern))

    @classmethod
    def grammar_text(cls, grammar: str) -> StructuredOutput:
        """Text of a context-free grammar: Lark (start rule `start`) or GBNF (`root`)."""
        return cls("grammar", _non_empty("grammar", grammar))

    @classmethod
    def choice(cls, choices: list[str] | tuple[str, ...]) -> StructuredOutput:
        """Exactly one of `choices` (non-empty strings)."""
        if (isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise StructuredOutputError("choice", choices,
                                        "expected a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(json.loads(self.text)) if self.kind == "choice" else ()


def _non_empty(name: str, text: object) -> str:
    if not isinstance(text, str) or not text:
        raise StructuredOutputError(name, text, "expected a non-empty string")
    return text


def _to_grammar(kind: str, text: str) -> str:
    llguidance = _llguidance()
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                            defaults=JSON_OPTIONS)
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        # Lark string literals take JSON's escapes (llguidance's own grammar_from does this);
        # JSON leaves DEL raw, which the Lark lexer refuses, so it is escaped too.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False).replace("\x7f", "\\u007f")
                                  for c in json.loads(text))
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    from llguidance.gbnf_to_lark import any_to_lark
    try:
        lark = any_to_lark(text)
    except Exception as error:  # noqa: BLE001 - its GBNF converter raises its own types
        raise ValueError(f"GBNF grammar: {error}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def library_message(message: str) -> str:
    """llguidance's multi-line message (a caret under the source line) as one line."""
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return message if len(message) <= 400 else message[:397] + "..."


def _llguidance():
    # Imported on first use: SamplingParams imports this module, and `import engine` for
    # SamplingParams alone should not load the grammar library.
    import llguidance
    return llguidance
