"""The dashboard's pure pieces: chart axes and labels, money and time formatting, the key form → the
admin API's body, and the session token (signed, expiring, tamper-evident)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from werkzeug.datastructures import MultiDict

from api.dashboard import fmt_ms, fmt_secs, fmt_usd
from api.dashboard.charts import Series, bar_chart, fmt, line_chart, nice_max
from api.dashboard.keys import body_of
from api.dashboard.session import Sessions
from common.errors import InvalidRequest


@pytest.mark.parametrize(("value", "minimum", "top"), [
    (0, 0, 1.0), (3, 0, 4), (5, 0, 6), (186, 0, 200), (0.0002, 0, 0.0002), (0.00021, 0, 0.0004),
    (1, 4, 4), (1000, 0, 1000), (float("nan"), 0, 1.0),
], ids=["nothing", "3", "5", "186", "exact-power", "just-over", "counts-minimum", "1000", "nan"])
def test_axis_top_has_round_quarters(value: float, minimum: float, top: float) -> None:
    assert nice_max(value, minimum=minimum) == pytest.approx(top)


@pytest.mark.parametrize(("value", "unit", "top", "text"), [
    (0, "$", 0.0002, "$0"), (0.00005, "$", 0.0002, "$0.000050"), (1.5, "$", 6, "$1.50"),
    (1234, "", 0, "1.2k"), (3, "", 0, "3"), (0.25, "", 0, "0.25"), (45, "ms", 0, "45 ms"),
], ids=["zero-dollars", "micro-dollars", "dollars", "thousands", "whole", "fraction", "unit"])
def test_labels(value: float, unit: str, top: float, text: str) -> None:
    assert fmt(value, unit, top=top) == text


@pytest.mark.parametrize(("value", "text"), [
    (Decimal(0), "$0.00"), (Decimal("0.000008"), "$0.000008"), (Decimal("12.5"), "$12.50"),
    (Decimal("1234.567"), "$1,234.57"), (1e-12, "<$0.0000000001"),
], ids=["zero", "fraction-of-a-cent", "dollars", "thousands", "dust"])
def test_money(value: Decimal | float, text: str) -> None:
    assert fmt_usd(value) == text


@pytest.mark.parametrize(("fn", "value", "text"), [
    (fmt_ms, None, "—"), (fmt_ms, 840, "840 ms"), (fmt_ms, 2400, "2.4 s"),
    (fmt_secs, None, "—"), (fmt_secs, 1.23, "1.2 s"), (fmt_secs, 600, "10 min"),
], ids=["ms-none", "ms", "ms-as-s", "secs-none", "secs", "minutes"])
def test_durations(fn: object, value: float | None, text: str) -> None:
    assert fn(value) == text  # type: ignore[operator]


def test_line_chart_draws_gaps_and_escapes_names() -> None:
    svg = str(line_chart([Series("<p50>", [1, 2, None, 4, 5])], ["a", "b", "c", "d", "e"], unit="ms"))
    assert svg.count("<polyline") == 2            # a gap splits the line in two
    assert "&lt;p50&gt;" in svg and "<p50>" not in svg


def test_bar_chart_stacks_series() -> None:
    svg = str(bar_chart([Series("ok", [3, 0]), Series("errors", [1, 0])], ["x", "y"], whole=True))
    assert svg.count("<rect") == 2                 # zero segments are not drawn
    assert ">4</text>" in svg                       # the axis reaches the stacked total


@pytest.mark.parametrize(("form", "body"), [
    ({"name": "a"}, {"name": "a", "role": "client", "team": None, "allowed_models": None, "limits": None,
                     "expires_at": None}),
    ({"name": "a", "role": "admin", "team": "t", "allowed_models": "x, y*,", "limit_rpm": "60"},
     {"name": "a", "role": "admin", "team": "t", "allowed_models": ["x", "y*"], "limits": {"rpm": 60},
      "expires_at": None}),
], ids=["minimal", "everything"])
def test_create_form_becomes_the_admin_body(form: dict[str, str], body: dict[str, object]) -> None:
    assert body_of(MultiDict(form), creating=True) == body


def test_edit_form_keeps_the_expiry_unless_told() -> None:
    assert "expires_at" not in body_of(MultiDict({"name": "a"}), creating=False)
    assert body_of(MultiDict({"name": "a", "clear_expiry": "1"}), creating=False)["expires_at"] is None


@pytest.mark.parametrize("raw", ["-1", "ten", "1.5"], ids=["negative", "word", "fraction"])
def test_a_bad_limit_names_its_field(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        body_of(MultiDict({"name": "a", "limit_tpm": raw}), creating=True)
    assert caught.value.param == "limits.tpm"


def test_session_tokens_are_signed() -> None:
    sessions = Sessions("secret-a")
    token = sessions.issue("key_1")
    assert sessions.read(token) == "key_1"
    assert Sessions("secret-b").read(token) is None          # another secret
    assert sessions.read(token[:-2] + "xx") is None           # tampered
    assert sessions.read(None) is None and sessions.read("") is None
