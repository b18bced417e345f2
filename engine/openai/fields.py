"""The pieces every OpenAI body parser shares (no JAX): the 400 error, and typed readers of
one field each that name the field, the value and what was expected when it is wrong.
`engine/openai/api.py` (and `constraints.py`) read bodies with them; `api` re-exports them."""

from __future__ import annotations

import math
from typing import Any

from engine.sampling_params import RANGES, NumberRange, is_int, is_number

# OpenAI's documented range where it is narrower than the engine's (RANGES); every other
# numeric field is read with the engine's own bounds, so what parses here also packs.
OPENAI_RANGES = {"temperature": NumberRange(0.0, 2.0)}


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(name: str, value: Any, expected: str, code: str = "invalid_value") -> ApiError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ApiError(400, f"{name}={shown}: expected {expected}", param=name, code=code)


def _is_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def get_int(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise invalid(name, value, "an integer", "invalid_type")
    if value < low or (high is not None and value > high):
        raise invalid(name, value, f"an integer in [{low}, {high}]" if high is not None
                      else f"an integer >= {low}")
    return value


def get_ranged(body: dict, name: str) -> int | float | None:
    """A numeric sampling field within its bounds (OPENAI_RANGES, else the engine's RANGES)."""
    bounds = OPENAI_RANGES.get(name) or RANGES[name]
    value = body.get(name)
    if value is None:
        return None
    if not (is_int(value) if bounds.integer else _is_number(value)):
        raise invalid(name, value, "an integer" if bounds.integer else "a finite number",
                      "invalid_type")
    if not bounds.contains(value):
        raise invalid(name, value, bounds.expected())
    return value if bounds.integer else float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, value, "true or false", "invalid_type")
    return value


def get_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, value, "a string", "invalid_type")
    return value
