"""Budgets' live state in Redis: what each budget has spent and holds reserved this period.

The check, the reservation, the settlement and the alerts are Lua (``common/lua/budget.lua``): a job's
worst case is reserved in the same script that creates and queues it (``create.lua``), and whatever ends
the job — its settle (``emit.lua``), a withdraw, an abandon, a claim that finds it expired or orphaned —
releases the reservation and charges its real cost exactly once (``bcharged`` on the job).

**Postgres is the truth for money.** A budget hash that is missing — a new period, or Redis lost it —
is rebuilt by :meth:`BudgetState.rebuild` before any call is admitted against it:

1. the live jobs that hold a reservation on it (their job hashes name it and are not charged yet);
2. the usage rows still on the usage stream (settled, not yet in Postgres);
3. in one Postgres snapshot, the usage rows of its scope in its period, leaving out those on the stream
   (a row flushed in between is counted once), and of them, those of the jobs in 1;
4. ``budget_seed.lua`` writes spent = 3 + 2 and the reservations of 1 — unless another process seeded
   it first — adding the charge of any job of 1 that settled meanwhile, less what 3 and 2 had counted of
   it (it found no hash to charge).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from common import lua
from common.apikeys import ANONYMOUS
from common.budgetrows import Budget, BudgetRows, Spent
from common.budgets import Window, to_units, window
from common.jobs import JobStore

REBUILD_LOCK_S = 10.0   # a rebuilding process holds the hash's lock at most this long
REBUILD_WAIT_S = 2.0    # a call that finds a rebuild under way waits this long for it, then tries again
KEY_GRACE_S = 86_400   # a period's hash outlives its end by this long (late settles still find it)
TERMINAL_STATES = (b"succeeded", b"failed", b"cancelled", b"expired")


@dataclass(frozen=True)
class Figures:
    """A budget's numbers this period (units of 1e-10 USD and tokens; limits -1 when unset)."""

    spent: int
    reserved: int
    limit: int
    tspent: int
    treserved: int
    tlimit: int

    @classmethod
    def of(cls, numbers: tuple[int, ...]) -> Figures:
        return cls(*numbers)

    @property
    def remaining(self) -> int | None:
        return None if self.limit < 0 else max(self.limit - self.spent - self.reserved, 0)

    @property
    def tremaining(self) -> int | None:
        return None if self.tlimit < 0 else max(self.tlimit - self.tspent - self.treserved, 0)


class BudgetState:
    """Every Redis operation on budgets. Thread/greenlet-safe (it holds only a client)."""

    def __init__(self, store: JobStore, rows: BudgetRows, *, lapse_after_s: float = 3600.0) -> None:
        """``lapse_after_s``: how long past its deadline a job may still be running (the task time
        limit and a margin): a rebuilt reservation lapses then."""
        self.lapse_after_s = lapse_after_s
        self.store = store
        self.redis = store.redis
        self.rows = rows
        self._seed = lua.register(self.redis, "budget_seed")

    def key(self, budget: Budget, period: Window) -> str:
        return f"{self.store.prefix}:budget:{budget.id}:{period.tag}"

    @property
    def alerts_key(self) -> str:
        return f"{self.store.prefix}:budget:alerts"

    def figures(self, budgets: list[Budget], now: datetime | None = None) -> list[Figures]:
        """Each budget's figures this period (a missing hash is rebuilt first): one round trip."""
        now = now or datetime.now(UTC)
        keys = [self.key(b, window(b.period, now)) for b in budgets]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "spent", "reserved", "limit", "tspent", "treserved", "tlimit")
        out = []
        for budget, raw in zip(budgets, pipe.execute(), strict=True):
            if raw[2] is None:
                self.rebuild(budget, window(budget.period, now))
                raw = self.redis.hmget(self.key(budget, window(budget.period, now)),
                                       "spent", "reserved", "limit", "tspent", "treserved", "tlimit")
            out.append(Figures.of(tuple(int(v) if v is not None else d
                                        for v, d in zip(raw, (0, 0, -1, 0, 0, -1), strict=True))))
        return out

    def set_terms(self, budget: Budget, now: datetime | None = None) -> None:
        """A budget's limits or thresholds changed: its current hash takes them at once (a lowered
        limit refuses the next call everywhere; calls already running are not touched)."""
        key = self.key(budget, window(budget.period, now or datetime.now(UTC)))
        if self.redis.exists(key):
            self.redis.hset(key, mapping=cast(dict[Any, Any], _terms(budget)))

    def drop(self, budget: Budget, now: datetime | None = None) -> None:
        key = self.key(budget, window(budget.period, now or datetime.now(UTC)))
        self.redis.delete(key, key + ":exp")

    def rebuild(self, budget: Budget, period: Window) -> bool:
        """Seed the budget's missing hash for ``period`` from Postgres, the usage stream and the live
        jobs (see the module's docstring); True if this call seeded it. One process rebuilds a hash at
        a time (a Redis lock): the calls that find it missing meanwhile — at midnight, all of them —
        wait up to ``REBUILD_WAIT_S`` for it instead of each scanning and summing again."""
        key = self.key(budget, period)
        lock = key + ":rebuilding"
        if not self.redis.set(lock, 1, nx=True, px=int(REBUILD_LOCK_S * 1000)):
            give_up = time.monotonic() + REBUILD_WAIT_S
            while time.monotonic() < give_up and not self.redis.exists(key):
                time.sleep(0.02)
            return False   # the caller tries again: seeded by the holder, or (it died) the lock lapses
        try:
            return self._rebuild(budget, period, key)
        finally:
            self.redis.delete(lock)

    def _rebuild(self, budget: Budget, period: Window, key: str) -> bool:
        live = self._live_reservations(key)
        in_transit = self._in_transit(budget)
        total, per_job = self.rows.spent(budget, period, excluding=in_transit.keys(),
                                         jobs=[job_id for job_id, _ in live])
        spent = Spent(total.units + sum(u for _, u, _ in in_transit.values()),
                      total.tokens + sum(t for _, _, t in in_transit.values()))
        args: list[Any] = [spent.units, spent.tokens, *_terms(budget).values(), self.alerts_key,
                           _ttl(period), len(live)]
        for job_id, (units, tokens, deadline) in live:
            counted = per_job.get(job_id, Spent(0, 0))
            transit = [(u, t) for j, u, t in in_transit.values() if j == job_id]
            args += [self.store.job_key(job_id), units, tokens, int((deadline + self.lapse_after_s) * 1000),
                     counted.units + sum(u for u, _ in transit), counted.tokens + sum(t for _, t in transit)]
        return bool(self._seed(keys=[key], args=args))

    def _live_reservations(self, key: str) -> list[tuple[str, tuple[int, int, float]]]:
        """Jobs whose hash names budget hash ``key`` and which are not charged yet: (job id, (units,
        tokens, deadline))."""
        prefix = self.store.job_prefix
        found = []
        batch: list[str] = []

        def flush() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for job_key in batch:
                pipe.hmget(job_key, "budgets", "bres", "bcharged", "state", "deadline")
            for job_key, (names, bres, charged, state, deadline) in zip(batch, pipe.execute(), strict=True):
                if (names and charged is None and state not in TERMINAL_STATES
                        and key in names.decode().split()):
                    units, tokens = (int(x) for x in bres.decode().split())
                    found.append((job_key[len(prefix):], (units, tokens, float(deadline or 0))))
            batch.clear()

        for raw in self.redis.scan_iter(match=f"{prefix}*", count=1000, _type="HASH"):
            batch.append(raw.decode())
            if len(batch) >= 500:
                flush()
        if batch:
            flush()
        return found

    def _in_transit(self, budget: Budget) -> dict[str, tuple[str, int, int]]:
        """Usage rows of the budget's scope still on the usage stream: call_id -> (job, units, tokens)."""
        rows: dict[str, tuple[str, int, int]] = {}
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.redis.xrange(self.store.usage_key()))
        for _, fields in entries:
            row = _usage_row(fields)
            if row is None or (budget.scope == "key"
                               and (row.get("api_key_id") or ANONYMOUS) != budget.key_id):
                continue
            tokens = int(row.get("prompt_tokens") or 0) + int(row.get("completion_tokens") or 0)
            rows[str(row["call_id"])] = (str(row["job_id"]), to_units(Decimal(str(row.get("cost_usd") or 0))),
                                         tokens)
        return rows


def _usage_row(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    if b"u" in fields:
        return cast(dict[str, Any], json.loads(fields[b"u"]))
    if b"j" in fields:
        return cast(dict[str, Any] | None, json.loads(fields[b"j"]).get("usage_row"))
    return None


def _terms(budget: Budget) -> dict[str, str | int]:
    return {"limit": to_units(budget.limit_usd) if budget.limit_usd is not None else -1,
            "tlimit": budget.limit_tokens if budget.limit_tokens is not None else -1,
            "th": ",".join(str(p) for p in budget.thresholds)}


def _ttl(period: Window) -> int:
    if period.end is None:
        return 0
    return max(int((period.end - datetime.now(UTC)).total_seconds()) + KEY_GRACE_S, 1)

