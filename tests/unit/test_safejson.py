"""Decoding untrusted JSON bodies: what is refused, and that it is refused without recursion."""

from __future__ import annotations

import json

import pytest

from common.errors import InvalidRequest
from common.protocols.safejson import loads, nesting_depth


@pytest.mark.parametrize(("text", "depth"), [
    ("{}", 1), ("[]", 1), ("1", 0), ('"[[[["', 0), ('{"a": [[1]], "b": {}}', 3), ('["\\"[", [{}]]', 3),
    ("[" * 100_000 + "]" * 100_000, 100_000), ('{"a": "]]]]", "b": [[["}"]]]}', 4),
], ids=["object", "array", "scalar", "brackets-in-string", "mixed", "escaped-quote", "very-deep",
        "closing-in-string"])
def test_nesting_depth(text, depth):
    assert nesting_depth(text) == depth


@pytest.mark.parametrize(("raw", "code", "param"), [
    (b"[" * 5000 + b"]" * 5000, "nesting_too_deep", None),
    (b'{"a": NaN}', "invalid_number", None),
    (b'{"a": [Infinity]}', "invalid_number", None),
    (b'{"a": -Infinity}', "invalid_number", None),
    (b'{"a": 1e400}', "invalid_number", None),
    (b'{"a": ' + b"9" * 400 + b"}", "invalid_number", None),
    (b'{"a": 9223372036854775808}', "invalid_number", None),
    (b'{"a": -9223372036854775809}', "invalid_number", None),
    (b'{"a": {"b": "x\\u0000"}}', "invalid_string", "a.b"),
    (b'{"a": ["ok", "\\ud800"]}', "invalid_string", "a.1"),
    (b'{"\\udfff": 1}', "invalid_string", "\\udfff"),
    (b'{"a": "\\udc00\\ud800"}', "invalid_string", "a"),
    (b'\xff{"a": 1}', None, None),
    (b'{"a": 1', None, None),
    (b'{"a": "\x00"}', None, None),
], ids=["deep", "nan", "infinity", "minus-infinity", "float-overflow", "400-digits", "int64-max+1",
        "int64-min-1", "nul", "lone-high-surrogate", "surrogate-key", "reversed-pair", "not-utf8",
        "truncated",
        "raw-nul"])
def test_refused(raw, code, param):
    with pytest.raises(InvalidRequest) as err:
        loads(raw, max_depth=64)
    assert err.value.status == 400
    if code is not None:
        assert err.value.code == code
    assert err.value.param == param
    json.dumps({"message": err.value.message, "param": err.value.param})  # the error itself is serialisable
    err.value.message.encode("utf-8")


@pytest.mark.parametrize(("raw", "value"), [
    (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001F600"}),
    (b'{"a": 9223372036854775807, "b": -9223372036854775808}', {"a": 2**63 - 1, "b": -(2**63)}),
    (b'{"a": 1.5e300, "b": -0.0}', {"a": 1.5e300, "b": -0.0}),
    ("{\"a\": \"caf\u00e9 \\u00e9\"}".encode(), {"a": "caf\u00e9 \u00e9"}),
    (b"[" * 64 + b"]" * 64, json.loads("[" * 64 + "]" * 64)),
], ids=["surrogate-pair", "int64-bounds", "big-float", "unicode", "at-the-depth-limit"])
def test_accepted(raw, value):
    assert loads(raw, max_depth=64) == value
