"""The dashboard's pure pieces: chart axes and labels, money and time formatting, the key form → the
admin API's body, and the session token (signed, expiring, tamper-evident)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from flask import Flask, render_template
from werkzeug.datastructures import MultiDict

import api.dashboard.pages  # noqa: F401  (the pages' routes join the blueprint before any app has it)
from api.dashboard import bp, fmt_ms, fmt_secs, fmt_usd
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


def _render(template: str, **context: object) -> str:
    """A dashboard template rendered in a bare Flask app (no gateway, no stores)."""
    app = Flask(__name__)
    app.extensions.update(dashboard_flower=None, dashboard_flower_port=5555)
    app.register_blueprint(bp)
    with app.test_request_context("/dashboard/"):
        return render_template(template, **context)


OVERVIEW = {"window": "hour", "rps": 0.5, "spend_today": Decimal("0.5"), "spend_month": Decimal("2"),
            "charts": [], "names": {"key_1": "team-a"},
            "total": type("T", (), {"requests": 10, "errors": 1, "p50_ms": 120.0, "p95_ms": 900.0,
                                     "wait_p50_ms": None, "wait_p95_ms": None})()}


def test_overview_shows_budgets_when_the_gateway_has_them() -> None:
    budgets = [{"name": "monthly", "scope": "key", "key_id": "key_1", "period": "monthly", "limit_usd": "10",
                "spent_usd": "8.5", "limit_tokens": None, "spent_tokens": 0,
                "resets_at": "2026-12-01T00:00:00Z"},
               {"name": "tokens", "scope": "global", "key_id": None, "period": "daily", "limit_usd": None,
                "spent_usd": "0", "limit_tokens": 1000, "spent_tokens": 1200, "resets_at": None}]
    page = _render("overview.html", budgets=budgets, **OVERVIEW)
    assert "monthly · team-a · monthly" in page and "$8.50 / $10.00" in page
    assert 'style="width: 85.0%" class="high"' in page
    assert "gateway · daily" in page and "1200 / 1000 tokens" in page and 'class="full"' in page


def test_overview_leaves_budgets_out_without_them() -> None:
    page = _render("overview.html", budgets=None, **OVERVIEW)
    assert "Budgets" not in page and "10.0%" in page   # the error rate of 1 in 10


@pytest.mark.parametrize(("no_admin_key", "hinted"), [(True, True), (False, False)],
                         ids=["without-GATEWAY_ADMIN_KEY", "with-it"])
def test_login_says_how_to_get_in_without_an_admin_key(no_admin_key: bool, hinted: bool) -> None:
    page = _render("login.html", error=None, next="", no_admin_key=no_admin_key)
    assert ("llm-gateway keys create --name ops --role admin" in page) is hinted
    assert 'type="password" name="key"' in page


def test_queues_show_tripped_breakers_and_otherwise_one_closed_pill() -> None:
    from common.queueview import Waiting
    from common.routing import BreakerState, Load

    def provider(name: str, breakers: list[tuple[str, Load]]) -> dict[str, object]:
        return {"name": name, "queue": f"llm.{name}", "cooldown_ms": 0, "completions_per_s": 0.0,
                "line": Waiting(), "broker": Waiting(), "gauges": [], "breakers": breakers}

    page = _render("queues_live.html", now=datetime.now(UTC), idle=[], names={}, providers=[
        provider("a", [("a-1", Load(breaker=BreakerState.OPEN, reopens_in_s=12.0, reason="failures")),
                       ("a-2", Load())]),
        provider("b", [("b-1", Load()), ("b-2", Load())])])
    assert "a-1: breaker open, probes in 12.0 s" in page and "a-2" not in page.split("a-1")[1][:200]
    assert "breakers closed" in page


def _call(first_token_at: datetime | None) -> object:
    from datetime import timedelta

    from common.requestlog import Call

    queued = datetime(2026, 11, 30, 6, 0, 0, tzinfo=UTC)
    return Call("job_1", None, "m", "p", "pm", 1, 3, 5, Decimal("0.01"), 100, 900, "success", 200, None,
                queued, queued + timedelta(milliseconds=100), queued + timedelta(milliseconds=1000),
                first_token_at=first_token_at)


@pytest.mark.parametrize(("first_token_at", "shown"), [
    (datetime(2026, 11, 30, 6, 0, 0, 350_000, tzinfo=UTC), ("first token +250 ms",
                                                             "→ first token 06:00:00.350 →")),
    (None, ()),
], ids=["streamed", "not-streamed"])
def test_a_call_timeline_shows_its_first_token(first_token_at: datetime | None,
                                               shown: tuple[str, ...]) -> None:
    page = _render("_calls.html", calls=[_call(first_token_at)], names={})
    assert all(text in page for text in shown), page
    assert ("first token" in page) is bool(shown)
