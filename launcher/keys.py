"""``llm-gateway keys create|list|get|update|revoke``: the admin API's key operations from a shell.

The flags become the same JSON body the admin API takes, validated by the same models
(``common/keyschema.py``) and applied by the same service (``common/apikeys.py``): no SQL here.
With ``REDIS_URL`` set, a change reaches every running API process within about a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from common.apikeys import KeyService, key_view
from common.budgetrows import BudgetRows
from common.db import make_session_factory
from common.errors import GatewayError, InvalidRequest
from common.keybudgets import KeyBudgets
from common.keyschema import KeyCreate, KeyUpdate, parse_body, parse_expiry
from common.settings import Settings

# on update, these words clear a field (null in the admin API)
_CLEAR = {"models": "all", "expires": "never", "team": "none", "limits": "default"}


def run_keys(settings: Settings, args: argparse.Namespace) -> int:
    assert settings.database_url is not None
    redis_client = None
    if settings.redis_url is not None:
        import redis

        redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    keys = KeyService(make_session_factory(settings.database_url, pool_size=1), redis_client,
                      settings.key_prefix)
    try:
        return _run(keys, args)
    except GatewayError as exc:
        print(f"llm-gateway keys {args.action}: {exc.message}", file=sys.stderr)
        return 2


def _run(keys: KeyService, args: argparse.Namespace) -> int:
    if args.action == "create":
        body = parse_body(KeyCreate, body_of(args, creating=True))
        row, secret = KeyBudgets(keys, BudgetRows(keys.sessions)).create(body)
        also = "".join(f", budget {b.name}" for b in body.budgets or ())
        print(f"created key {row.id} ({row.name}, role {row.role}{also}). It is shown only once:\n{secret}")
    elif args.action == "list":
        page = keys.list(limit=args.limit, after=args.after)
        for row in page.keys:
            if args.json:
                print(json.dumps(key_view(row)))
            else:
                state = "revoked" if row.revoked_at else "active"
                print(f"{row.id}\t{row.name}\t{row.prefix}…\t{row.role}\t{state}")
        if page.next_cursor:
            print(f"more: --after {page.next_cursor}", file=sys.stderr)
    elif args.action == "get":
        print(json.dumps(key_view(keys.get(args.key_id)), indent=2))
    elif args.action == "update":
        row = keys.update(args.key_id, parse_body(KeyUpdate, body_of(args, creating=False)))
        print(json.dumps(key_view(row), indent=2))
    else:
        row = keys.revoke(args.key_id)
        print(f"revoked {row.id}")
    return 0


def body_of(args: argparse.Namespace, *, creating: bool) -> dict[str, Any]:
    """The admin API body the flags spell (only the flags given)."""
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.role is not None:
        body["role"] = args.role
    for flag, field, parse in (("models", "allowed_models", _models), ("expires", "expires_at", _expiry),
                               ("team", "team", str), ("limits", "limits", parse_limits),
                               ("metadata", "metadata", _json_object)):
        raw = getattr(args, flag)
        if raw is None:
            continue
        body[field] = None if not creating and raw == _CLEAR.get(flag) else parse(raw)
    if getattr(args, "budget", None):
        body["budgets"] = [parse_budget(text) for text in args.budget]
    return body


_BUDGET_FIELDS = {"usd": "limit_usd", "tokens": "limit_tokens", "name": "name"}


def parse_budget(text: str) -> dict[str, Any]:
    """``--budget PERIOD:usd=5[,tokens=N][,name=NAME]`` → one entry of a key body's ``budgets`` (named
    after its period unless ``name=`` says otherwise; validated as the admin API validates it)."""
    period, sep, terms = text.strip().partition(":")
    if not sep or not period.strip():
        raise InvalidRequest(f"--budget {text!r}: expected PERIOD:usd=N and/or tokens=N, e.g. daily:usd=5",
                             param="budgets")
    budget: dict[str, Any] = {"name": period.strip(), "period": period.strip()}
    for part in filter(None, (p.strip() for p in terms.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in _BUDGET_FIELDS:
            raise InvalidRequest(f"--budget {text!r}: {part!r} is not usd=N, tokens=N or name=NAME",
                                 param="budgets")
        budget[_BUDGET_FIELDS[name.strip()]] = value.strip()
    return budget


def parse_limits(text: str) -> dict[str, Any]:
    """``concurrency=1,rpm=60`` or a JSON object (validated as the admin API validates it)."""
    if text.strip().startswith("{"):
        return _json_object(text)
    limits: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise InvalidRequest(f"limits: {part!r} is not name=value", param="limits")
        limits[name.strip()] = value.strip()
    return limits


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _expiry(text: str) -> str:
    return parse_expiry(text, datetime.now(UTC)).isoformat()


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidRequest(f"{text!r} is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("expected a JSON object")
    return value
