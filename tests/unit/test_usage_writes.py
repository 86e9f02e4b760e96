"""How the usage flush writes a batch: one statement of typed arrays, and the lock order of outcomes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from common.contract import JobState
from common.outbox import RowOutcome
from workers.usage import _insert_arrays, _rollup_order


@pytest.mark.parametrize(("column", "cast"), [
    ("call_id", "CAST(:call_id AS text[])"),
    ("error", "CAST(:error AS text[])"),
    ("prompt_tokens", "CAST(CAST(:prompt_tokens AS text[]) AS bigint[])"),
    ("status_code", "CAST(CAST(:status_code AS text[]) AS integer[])"),
    ("cost_usd", "CAST(CAST(:cost_usd AS text[]) AS numeric[])"),
    ("created_at", "CAST(CAST(:created_at AS text[]) AS timestamptz[])"),
], ids=["varchar-stays-text", "text", "bigint", "integer", "numeric", "timestamptz"])
def test_each_column_is_an_array_cast_to_its_type(column, cast):
    sql = str(_insert_arrays(("call_id", column) if column != "call_id" else ("call_id",)))
    assert cast in sql
    assert sql.startswith("INSERT INTO usage (call_id") and sql.endswith("ON CONFLICT (call_id) DO NOTHING")


def outcome(**row: str) -> RowOutcome:
    return RowOutcome("job", JobState.SUCCEEDED, datetime(2026, 11, 30, tzinfo=UTC), usage_row=row or None)


@pytest.mark.parametrize(("outcomes", "order"), [
    ([outcome(api_key_id="key_b", model="m", provider="p", call_id="1"),
      outcome(api_key_id="key_a", model="m", provider="p", call_id="2")], ["2", "1"]),
    ([outcome(api_key_id="key_a", model="m", provider="q", call_id="1"),
      outcome(api_key_id="key_a", model="m", provider="p", call_id="2")], ["2", "1"]),
    ([outcome(api_key_id="key_a", model="m", provider="p", call_id="2"),
      outcome(api_key_id="key_a", model="m", provider="p", call_id="1")], ["1", "2"]),
    ([outcome(api_key_id="key_a", model="m", provider="p", call_id="1"),
      outcome(model="m", provider="p", call_id="2")], ["2", "1"]),
    ([outcome(api_key_id="key_a", model="m", provider="p", call_id="1"), outcome()], [None, "1"]),
    ([outcome(api_key_id="key_a", model="b", provider="p", call_id="1"),
      outcome(api_key_id="key_a", model="B", provider="p", call_id="2")], ["2", "1"]),
], ids=["by-key", "by-provider", "then-call-id", "no-key-is-anonymous", "no-usage-row-first",
        "byte-order-upper-first"])
def test_outcomes_settle_in_the_rollup_triggers_order(outcomes, order):
    settled = sorted(outcomes, key=_rollup_order)
    assert [o.usage_row.get("call_id") if o.usage_row else None for o in settled] == order
