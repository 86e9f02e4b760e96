"""Decoding a client's JSON body without trusting it. Pure functions, no I/O.

:func:`loads` is ``json.loads`` plus the checks that keep hostile input a clear 400 instead of a
crash further in: every check here is iterative (no recursion, so no ``RecursionError``) and linear
in the body's size.

* nesting deeper than ``max_depth`` arrays/objects is refused before the parser sees it;
* ``NaN``, ``Infinity``, ``-Infinity`` (Python's json accepts them, JSON does not) and numbers that
  overflow a double (``1e999``) are refused;
* integers outside the signed 64-bit range are refused (nothing we call takes more, and a
  400-digit integer otherwise overflows wherever it is turned into a float);
* strings (values and keys) containing NUL or an unpaired UTF-16 surrogate are refused: Postgres
  JSONB cannot store them and no upstream accepts them;
* the body must be UTF-8.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from common.errors import InvalidRequest

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# a JSON string literal, escapes included: removed before counting brackets so that "[[[" in a
# string does not count as nesting
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def loads(raw: bytes, *, max_depth: int) -> Any:
    """The decoded body. Raises :class:`InvalidRequest` for anything :mod:`this module <safejson>`
    refuses (the message says what and, for strings, where)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8: {exc.reason} at byte {exc.start}"
                             ) from None
    # fewer openers than the limit cannot nest deeper than it: most bodies skip the scan
    depth = 0 if text.count("[") + text.count("{") <= max_depth else nesting_depth(text)
    if depth > max_depth:
        raise InvalidRequest(f"the request body nests arrays/objects {depth} deep; at most {max_depth} "
                             "levels are accepted", code="nesting_too_deep")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_int64)
    except InvalidRequest:
        raise
    except (ValueError, RecursionError) as exc:  # RecursionError: a depth limit above the parser's own
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if "\\u" in text:  # raw NUL is invalid JSON and UTF-8 has no surrogates: only escapes make them
        check_strings(value)
    return value


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (brackets in strings ignored).
    For malformed text this is a bound the parser will reject anyway."""
    brackets = _BRACKETS.sub("", _STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def check_strings(value: Any) -> None:
    """Refuse NUL and unpaired surrogates in any string or key of a decoded JSON value (iteratively)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_string(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{path}.{_visible(key)}" if path else _visible(key)
                _check_string(key, child_path)
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(item))


def _visible(key: str) -> str:
    """A key as it may appear in an error message: bad characters escaped, at most 100 characters."""
    return _BAD_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", key[:100])


def _check_string(text: str, path: str) -> None:
    if _BAD_CHARS.search(text):
        path = path[:300]
        where = f" in '{path}'" if path else ""
        raise InvalidRequest(f"invalid string{where}: NUL characters (\\u0000) and "
                             "unpaired UTF-16 surrogates are not accepted", param=path or None,
                             code="invalid_string")


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"the request body contains {name}, which is not a JSON number; send a finite "
                         "number", code="invalid_number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise InvalidRequest(f"the number {literal[:40]} is out of range", code="invalid_number")
    return value


def _int64(literal: str) -> int:
    if len(literal) > 20:  # cheaper than converting a huge literal; 20 covers "-9223372036854775808"
        raise InvalidRequest(f"the integer {literal[:40]}… is out of range", code="invalid_number")
    value = int(literal)
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidRequest(f"the integer {literal} is out of range (signed 64-bit)", code="invalid_number")
    return value
