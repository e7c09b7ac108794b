"""OpenAI's error object, and the wording of request validation errors in it.

Every error the server answers is ``{"error": {"message", "type", "param",
"code"}}``. For an invalid request, ``param`` names the offending field and
``message`` says what it must be, e.g. ``'top_p' must be in (0.0, 1.0], got 0``.
"""

from __future__ import annotations

from typing import Any

from annotated_types import Ge, Gt, Le
from pydantic_core import ErrorDetails, PydanticCustomError


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.kind, self.headers = code, kind, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_request(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    """A 400 naming ``param``."""
    return APIError(400, message, param=param, code=code)


def client_error(
    message: str, code: str = "invalid_value", param: str | None = None
) -> PydanticCustomError:
    """A validation error worded for the client, raised by a validator. ``param`` is needed
    where the error's location does not name the field (model validators)."""
    ctx = {"message": message} if param is None else {"message": message, "param": param}
    return PydanticCustomError(code, "{message}", ctx)


def range_message(name: str, value: Any, lo: Any, hi: Any = None, open_low: bool = False) -> str:
    if hi is None:
        return f"'{name}' must be {'>' if open_low else '>='} {lo}, got {value}"
    return f"'{name}' must be in {'(' if open_low else '['}{lo}, {hi}], got {value}"


_TYPE_NOUNS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than_equal", "finite_number")


def from_error_details(err: ErrorDetails, bounds: list) -> APIError:
    """One pydantic error as a 400. ``bounds``: the field's declared constraints
    (``FieldInfo.metadata``), to word a range error with both ends of the range."""
    loc, kind, ctx = err["loc"], err["type"], err.get("ctx") or {}
    param = ctx.get("param") or (str(loc[0]) if loc else None)
    if "message" in ctx:  # from client_error: already worded
        return invalid_request(param, ctx["message"], kind)
    name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "missing":
        return invalid_request(param, f"'{name}' is required", "missing_required_parameter")
    if kind in _TYPE_NOUNS:
        return invalid_request(
            param,
            f"'{name}' must be {_TYPE_NOUNS[kind]}, got {type(err['input']).__name__}",
            "invalid_type",
        )
    if kind in _RANGE_ERRORS and len(loc) == 1:
        return invalid_request(param, _declared_range_message(name, err["input"], bounds))
    return invalid_request(param, f"'{name}': {err['msg']}")


def _declared_range_message(name: str, value: Any, bounds: list) -> str:
    lo = hi = None
    open_low = False
    for m in bounds:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, open_low = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
    if lo is None and hi is None:  # no bounds: it was NaN or infinite
        return f"'{name}' must be a finite number, got {value}"
    return range_message(name, value, lo, hi, open_low)
