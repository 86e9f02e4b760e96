"""The dashboard's read-only pages: overview, queues (live), usage (+ CSV), requests, a job, playground.

Each view gathers its figures from the service code (see the package docstring) and renders a template;
the numbers are never computed twice in two places.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from flask import Response, current_app, render_template, request

from api.dashboard import bp
from api.dashboard.charts import Series, bar_chart, line_chart
from api.requests import gateway
from common.apikeys import PAGE_MAX, KeyService
from common.errors import InvalidRequest
from common.jobrows import JobRows
from common.limits import LIMIT_KINDS
from common.queueview import waiting
from common.requestlog import STATUSES, CallFilter, Minute, per_minute, recent_calls, summary
from common.routing import Candidate, Load, candidates
from common.usage import FILTERS, UsageQuery, as_csv, csv_filename, parse_query, report
from common.usage.query import ceil_hour, floor_hour, month_start

WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
USE_OF = {"concurrency": "in_flight", "rpm": "requests_last_60s", "tpm": "tokens_last_60s",
          "rpd": "requests_today", "tpd": "tokens_today"}


def _spent(since: datetime, now: datetime) -> Decimal:
    query = UsageQuery(since=floor_hour(since), until=ceil_hour(now))
    return report(gateway().sessions, query).total.cost_usd


@bp.get("/")
def overview() -> str:
    window = request.args.get("window", "hour")
    window = window if window in WINDOWS else "hour"
    now = datetime.now(UTC)
    sessions = gateway().sessions
    last5 = summary(sessions, now - timedelta(minutes=5), now)
    if window == "hour":   # percentiles from the last hour's usage rows
        total: Any = summary(sessions, now - WINDOWS[window], now)
        charts = _minute_charts(per_minute(sessions, now - timedelta(minutes=59), now))
    else:                  # a day of raw rows is too many to rank at every page view: the rollups' means
        day = UsageQuery(since=floor_hour(now) - timedelta(hours=23), until=ceil_hour(now))
        total = report(sessions, day).total
        charts = _hour_charts(now)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return render_template("overview.html", window=window, total=total, rps=last5.requests / 300,
                           spend_today=_spent(day_start, now), spend_month=_spent(month_start(now), now),
                           charts=charts, now=now, budgets=_budgets(), names=_key_names())


def _budgets() -> list[dict[str, Any]] | None:
    """Every budget with its figures this period, as ``/admin/budgets`` shows them — when the gateway
    has budgets (``Gateway.budgets``, the budget gate); None otherwise, and the page leaves them out."""
    gate = getattr(gateway(), "budgets", None)
    if gate is None:
        return None
    described: list[dict[str, Any]] = gate.describe_all(gate.rows.all())
    return described


def _minute_charts(minutes: list[Minute]) -> list[Any]:
    labels = [f"{m.start:%H:%M}" for m in minutes]
    return [
        bar_chart([Series("ok", [m.requests - m.errors for m in minutes]),
                   Series("errors", [m.errors for m in minutes])], labels, title="Calls per minute",
                  whole=True),
        line_chart([Series("p50", [m.p50_ms for m in minutes]), Series("p95", [m.p95_ms for m in minutes])],
                   labels, unit="ms", title="Latency, end to end (queue wait + upstream)"),
        line_chart([Series("p50", [m.wait_p50_ms for m in minutes]),
                    Series("p95", [m.wait_p95_ms for m in minutes])], labels, unit="ms", title="Queue wait"),
        bar_chart([Series("spend", [float(m.cost_usd) for m in minutes])], labels, unit="$",
                  title="Spend per minute"),
    ]


def _hour_charts(now: datetime) -> list[Any]:
    """The last 24 hours from the hourly rollups (means: the rollups keep sums, not percentiles)."""
    query = UsageQuery(since=floor_hour(now) - timedelta(hours=23), until=ceil_hour(now), group_by=("hour",))
    groups = {g.group["hour"]: g for g in report(gateway().sessions, query).groups}
    hours = [query.since + timedelta(hours=i) for i in range(24)]
    rows = [groups.get(f"{h:%Y-%m-%dT%H:00:00Z}") for h in hours]
    labels = [f"{h:%H}h" for h in hours]
    return [
        bar_chart([Series("ok", [g.requests - g.errors if g else 0 for g in rows]),
                   Series("errors", [g.errors if g else 0 for g in rows])], labels, title="Calls per hour",
                  whole=True),
        line_chart([Series("mean upstream", [g.mean_upstream_latency_ms if g else None for g in rows]),
                    Series("mean queue wait", [g.mean_queue_wait_ms if g else None for g in rows])],
                   labels, unit="ms", title="Latency and queue wait (hourly means)"),
        bar_chart([Series("spend", [float(g.cost_usd) if g else 0 for g in rows])], labels, unit="$",
                  title="Spend per hour"),
        bar_chart([Series("input", [g.input_tokens if g else 0 for g in rows]),
                   Series("output", [g.output_tokens if g else 0 for g in rows])], labels,
                  title="Tokens per hour", whole=True),
    ]


# queues --------------------------------------------------------------------------------------------
@bp.get("/queues")
def queues() -> str:
    return render_template("queues.html", **_queue_state())


@bp.get("/queues/live")
def queues_live() -> str:
    """The part of the Queues page that refreshes itself (static/dashboard.js fetches it)."""
    return render_template("queues_live.html", **_queue_state())


def _breakers() -> dict[str, list[tuple[str, Load]]]:
    """Each provider's deployments with their breaker as routing sees it now (``Router.observe``, what
    ``/admin/routing`` shows)."""
    gw = gateway()
    registry = gw.settings.registry
    own: dict[str, Candidate] = {}
    for alias in registry.models:
        for candidate in candidates(registry, alias):
            if candidate.alias == alias:
                own.setdefault(candidate.name, candidate)
    out: dict[str, list[tuple[str, Load]]] = {}
    for candidate, load in gw.router.observe(list(own.values())):
        out.setdefault(candidate.provider, []).append((candidate.name, load))
    return out


def _queue_state() -> dict[str, Any]:
    gw = gateway()
    breakers = _breakers()
    providers, idle = [], []
    for name, entry in gw.limits().items():
        if not entry["routable"]:
            idle.append((name, gw.settings.registry.providers[name].unroutable_reason))
            continue
        detail = waiting(gw.store, gw.limiter, name, gw.settings.queue_key(name))
        gauges = [(scope, kind.name, use.get(USE_OF[kind.name], 0), use["limits"][kind.name])
                  for scope, use in entry["scopes"].items() for kind in LIMIT_KINDS
                  if use["limits"].get(kind.name)]
        providers.append({"name": name, **entry, "line": detail["line"], "broker": detail["broker"],
                          "gauges": gauges, "breakers": breakers.get(name, [])})
    # the busiest first: where something waits is what an operator opens this page for
    providers.sort(key=lambda p: (-(p["line"].total + p["broker"].total), p["name"]))
    return {"providers": providers, "idle": idle, "now": datetime.now(UTC), "names": _key_names()}


# usage ---------------------------------------------------------------------------------------------
GROUPINGS = {"key": ("key",), "model": ("model",), "day": ("day",), "day,key": ("day", "key"),
             "day,model": ("day", "model")}


def _usage_query(fmt: str = "json") -> tuple[UsageQuery, dict[str, str]]:
    args = {name: request.args.get(name, "").strip() for name in ("from", "to", *FILTERS)}
    args["group_by"] = request.args.get("group_by", "day,model")
    if args["group_by"] not in GROUPINGS:
        raise InvalidRequest(f"group by one of: {', '.join(GROUPINGS)}", param="group_by")
    query = parse_query({k: v for k, v in {**args, "format": fmt}.items() if v}, datetime.now(UTC),
                        filters=FILTERS)
    return query, args


@bp.get("/usage")
def usage() -> str | tuple[str, int]:
    try:
        query, args = _usage_query()
    except InvalidRequest as exc:
        query, args = _default_usage(), {"group_by": "day,model"}
        error: str | None = exc.message
    else:
        error = None
    result = report(gateway().sessions, query)
    return render_template("usage.html", report=result, args=args, groupings=list(GROUPINGS), error=error,
                           charts=_usage_charts(result.groups, query), csv_args=request.query_string.decode())


def _default_usage() -> UsageQuery:
    now = datetime.now(UTC)
    return UsageQuery(since=floor_hour(month_start(now)), until=ceil_hour(now), group_by=("day", "model"))


def _usage_charts(groups: list[Any], query: UsageQuery) -> list[Any]:
    """Spend and tokens per day, a segment per key or model (the top 5; the rest as 'other')."""
    split = next((name for name in query.group_by if name != "day"), None)
    if "day" not in query.group_by:
        labels = [g.group[split] for g in groups] if split else ["total"]
        return [bar_chart([Series("spend", [float(g.cost_usd) for g in groups])], labels, unit="$",
                          title="Spend"),
                bar_chart([Series("input", [g.input_tokens for g in groups]),
                           Series("output", [g.output_tokens for g in groups])], labels, title="Tokens",
                          whole=True)]
    days = sorted({g.group["day"] for g in groups})
    totals: dict[str, Decimal] = {}
    for g in groups:
        totals[g.group.get(split, "total") if split else "total"] = totals.get(
            g.group.get(split, "total") if split else "total", Decimal(0)) + g.cost_usd
    top = sorted(totals, key=lambda name: -totals[name])[:5]
    names = top + (["other"] if len(totals) > len(top) else [])
    cost = {(d, n): 0.0 for d in days for n in names}
    tokens = {(d, n): 0 for d in days for n in names}
    for g in groups:
        name = (g.group.get(split, "total") if split else "total")
        name = name if name in top else "other"
        cost[(g.group["day"], name)] += float(g.cost_usd)
        tokens[(g.group["day"], name)] += g.input_tokens + g.output_tokens
    labels = [d[5:] for d in days]
    return [bar_chart([Series(n, [cost[(d, n)] for d in days]) for n in names], labels, unit="$",
                      title="Spend per day"),
            bar_chart([Series(n, [tokens[(d, n)] for d in days]) for n in names], labels,
                      title="Tokens per day (input + output)", whole=True)]


@bp.get("/usage.csv")
def usage_csv() -> Response | tuple[str, int]:
    """The Usage page's report as CSV, rendered by the same code as ``GET /admin/usage.csv``."""
    try:
        query, _ = _usage_query("csv")
    except InvalidRequest as exc:
        return exc.message, 400
    result = report(gateway().sessions, query)
    return Response(as_csv(result), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{csv_filename(result)}"'})


# requests and jobs ---------------------------------------------------------------------------------
@bp.get("/requests")
def requests_page() -> str:
    args = {name: request.args.get(name, "").strip() for name in ("key", "model", "status")}
    status = args["status"] if args["status"] in STATUSES else None
    flt = CallFilter(since=datetime.now(UTC) - timedelta(days=1), key=args["key"] or None,
                     model=args["model"] or None, status=status, limit=100)
    gw = gateway()
    return render_template("requests.html", calls=recent_calls(gw.sessions, flt), args=args,
                           models=sorted(gw.settings.registry.models), statuses=STATUSES, names=_key_names())


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> tuple[str, int] | str:
    """One job: its live state in Redis (while it is kept), its durable row (async jobs) and its calls."""
    gw = gateway()
    live = gw.store.state(job_id) if len(job_id) <= 64 else {}
    row = JobRows(gw.sessions).get(job_id) if len(job_id) <= 40 else None
    calls = recent_calls(gw.sessions, replace(CallFilter(since=datetime.now(UTC) - timedelta(days=1)),
                                              job=job_id))
    missing = not live and row is None and not calls
    return render_template("job.html", job_id=job_id, live=live, steps=_steps(live), row=row, calls=calls,
                           missing=missing, names=_key_names()), 404 if missing else 200


STEPS = (("queued", "created_at", "wait"), ("started", "started_at", "run"), ("done", "finished_at", "done"))


def _steps(live: dict[str, str]) -> list[dict[str, str]]:
    """The live hash's stamps (epoch seconds) as a timeline: each step's UTC time and how long after the
    previous step it came; and the deadline it had to start by."""
    def at(name: str) -> datetime | None:
        try:
            return datetime.fromtimestamp(float(live[name]), UTC)
        except (KeyError, ValueError):
            return None

    out, previous = [], None
    for label, name, css in STEPS:
        moment = at(name)
        if moment is None:
            continue
        after = "" if previous is None else f"+{(moment - previous).total_seconds() * 1000:,.0f} ms"
        state = live.get("state", "")
        if label == "done" and state not in ("succeeded", ""):
            label, css = state, "bad"
        out.append({"label": label, "time": f"{moment:%H:%M:%S.%f}"[:-3], "after": after, "css": css})
        previous = moment
    deadline = at("deadline")
    if deadline is not None:
        out.append({"label": "deadline", "time": f"{deadline:%H:%M:%S.%f}"[:-3],
                    "after": "to start by", "css": ""})
    return out


def _key_names() -> dict[str, str]:
    """Key id → name, to show names where rows hold ids (the first page of keys: ``PAGE_MAX``)."""
    keys: KeyService = current_app.extensions["keys"]
    return {row.id: row.name for row in keys.list(limit=PAGE_MAX).keys}


@bp.get("/playground")
def playground() -> str:
    gw = gateway()
    registry = gw.settings.registry
    models = [alias for alias, m in registry.models.items() if registry.providers[m.provider].routable]
    return render_template("playground.html", models=models, auth_open=gw.settings.auth_mode == "off")
