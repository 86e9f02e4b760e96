"""``/admin/budgets``: create, list, get, update and delete budgets (JSON; admin key only).

    POST   /admin/budgets         {name, scope: key|global, key_id, period, limit_usd, limit_tokens,
                                   thresholds}                          -> 201 the budget and its figures
    GET    /admin/budgets         ?key_id=…                             -> {"object": "list", "data": [...]}
    GET    /admin/budgets/<id>                                          -> the budget, its figures, its alerts
    PATCH  /admin/budgets/<id>    any of the fields                     -> the budget
    DELETE /admin/budgets/<id>                                          -> {"id", "deleted": true}

A change reaches the budget's Redis state at once (a lowered limit refuses the next call on every
process; running calls are never cancelled) and every API process's list of budgets within a second.
"""

from __future__ import annotations

from flask import Response, jsonify, request

from api.admin import admin_blueprint
from api.requests import gateway, json_body
from common.budgets import validate_budget

bp = admin_blueprint("admin_budgets", __name__)


@bp.post("/budgets")
def create() -> tuple[Response, int]:
    gate = gateway().budgets
    budget = gate.rows.create(validate_budget(json_body()))
    gate.book.forget()
    return jsonify(gate.describe_all([budget])[0]), 201


@bp.get("/budgets")
def list_budgets() -> Response:
    gate = gateway().budgets
    budgets = gate.rows.all()
    if key_id := request.args.get("key_id"):
        budgets = [b for b in budgets if b.key_id == key_id]
    return jsonify({"object": "list", "data": gate.describe_all(budgets)})


@bp.get("/budgets/<budget_id>")
def get(budget_id: str) -> Response:
    gate = gateway().budgets
    budget = gate.rows.get(budget_id)
    body = gate.describe_all([budget])[0]
    body["alerts"] = [{"id": a.id, "threshold": a.threshold, "period_start": a.period_start.isoformat(),
                       "fired_at": a.fired_at.isoformat(), "delivery": a.delivery, "attempts": a.attempts,
                       "last_status": a.last_status} for a in gate.rows.alerts(budget_id)]
    return jsonify(body)


@bp.patch("/budgets/<budget_id>")
def update(budget_id: str) -> Response:
    gate = gateway().budgets
    before = gate.rows.get(budget_id)
    budget = gate.rows.update(budget_id, validate_budget(json_body(), before.fields()))
    if (budget.period, budget.scope, budget.key_id) != (before.period, before.scope, before.key_id):
        gate.state.drop(before)   # another period or scope: its state is rebuilt from Postgres
    gate.state.set_terms(budget)
    gate.book.forget()
    return jsonify(gate.describe_all([budget])[0])


@bp.delete("/budgets/<budget_id>")
def delete(budget_id: str) -> Response:
    gate = gateway().budgets
    budget = gate.rows.delete(budget_id)
    gate.state.drop(budget)
    gate.book.forget()
    return jsonify({"id": budget.id, "object": "budget", "deleted": True})
