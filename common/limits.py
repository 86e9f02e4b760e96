"""Provider limits held across every worker process and machine, and the line jobs wait in.

Each limited provider has a *line*: a sorted set of the jobs its workers hold but have not started.
Only the head of the line may start, and only when every permit it needs is free — all taken in one
Lua script (``common/lua/acquire.lua``), timed by Redis ``TIME``, so any number of workers on any
number of machines agree. The line (``line.lua``: fair queue, key blocks, wakes) and the permits
(``permits.lua``: one step per limit kind) are separate Lua libraries; the job's claim is the same
``job.lua`` claim the unlimited path runs.

**Limit kinds are data**: :data:`LIMIT_KINDS` lists them with the per-scope keys each keeps; the Lua
side has one ``KINDS[name]`` entry (check / take / settle) per row. A kind is counted in every
scope that sets a limit of its ``counted_with`` group (that is what ``GET /v1/limits`` shows); a limit
of 0 is counted but never checked. Adding a
kind (a USD budget is next) is one row here, one field on ``Limits`` and one Lua entry.

Per scope (the provider; the model if it sets its own limits; ``key:<id>``, an API key's own quota
over all providers, if ``key_limits`` gives it one)::

    P:lim:<scope>:conc   zset  call id -> lease expiry (ms)  calls in flight; a dead worker's lease lapses
    P:lim:<scope>:rpm    zset  call id -> start (ms)         calls started in the last window
    P:lim:<scope>:tpm    zset  call id -> start (ms)         token reservations of the last window ...
    P:lim:<scope>:tok    hash  call id -> tokens, 'sum'      ... and their amounts
    P:lim:<scope>:rpd    hash  'd' (UTC day number), 'n'     requests today
    P:lim:<scope>:tpd    hash  'd' (UTC day number), 'n'     tokens today

Per provider::

    P:lim:<provider>:line      zset  job id -> fair-queue finish tag
    P:lim:<provider>:vt        hash  'V' (tag of the last started job), 'k:<key>' (a key's last tag)
    P:lim:<provider>:owner     hash  job id -> worker process id (whose heartbeat proves it still waits)
    P:lim:<provider>:keyof     hash  job id -> API key (only when some key has limits of its own)
    P:lim:<provider>:cooldown  key   set after an upstream 429; nobody starts until it expires
    P:lim:<provider>:next      key   when the head may next start (ms), while it waits for a window/day
    P:lim:keyblock             hash  API key -> until (ms): the key is at its own quota
    P:lim:proc:<id>            key   a worker process's heartbeat
    P:lim:wake                 pubsub  the job id that just became head of its line (or was withdrawn)

Guarantees (each stated where it is implemented):

* ``acquire``: all permits or none; rpm = calls started in any sliding window of ``WINDOW_MS``; tpm =
  tokens reserved in any sliding window (reservations are settled to the real count by ``release``,
  which also re-stamps the call's window entries with its end, so our window never frees a slot
  before the upstream's does).
* Fair share: a job's tag is ``max(V, last tag of its key) + 1/weight`` (start-time fair queueing), so
  jobs of one key start in arrival order, and a burst from one key is interleaved with the jobs of
  other keys instead of starving them: a job arriving while key A has n jobs waiting is overtaken by at
  most one job of each other key per turn of its own key (weight 1).
* A job that waits never consumes quota; a withdrawn or expired job leaves the line without starting.
* An API key at its own quota (``key_limits``) is *blocked* until its quota has room (the exact
  window/day time, or the release of one of its calls): its jobs keep their places but the turn
  passes over them to the first job of another key, so a key at its quota never holds up the others.
  Per-day limits (``rpd``/``tpd``) count per UTC calendar day.
* Whoever changes the head of a line publishes the new head's id (admission, a head leaving, stale
  heads dropped), so only the head needs a timer: the jobs behind it sleep until woken, and re-check
  only rarely, as a safety net for a wake lost while their worker's subscription reconnected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis

from common import lua
from common.contract import Start
from common.jobs import JobStore
from common.registry import Limits

WINDOW_MS = 60_000        # the sliding window of rpm / tpm
DAY_MS = 86_400_000       # rpd / tpd count per UTC day


@dataclass(frozen=True)
class LimitKind:
    """One kind of limit: ``name`` is its ``Limits`` field and its Lua entry (``permits.lua``
    ``KINDS[name]``, which takes ``len(keys)`` keys); ``keys`` are the per-scope key suffixes it keeps;
    ``unit`` is how a limit of this kind reads ("the 5 tokens per day ... allows"); ``counted_with``:
    the kind is counted only in scopes that set one of these limits (empty: in every scope)."""

    name: str
    keys: tuple[str, ...]
    unit: str
    counted_with: tuple[str, ...] = ()

    def counted_in(self, limits: Limits) -> bool:
        return not self.counted_with or any(getattr(limits, name) for name in self.counted_with)


LIMIT_KINDS: tuple[LimitKind, ...] = (
    LimitKind("concurrency", ("conc",), "calls in flight"),
    LimitKind("rpm", ("rpm",), "requests per minute"),
    LimitKind("tpm", ("tpm", "tok"), "tokens per minute"),
    # the day counters cost a little on every call: kept only where a daily limit is set
    LimitKind("rpd", ("rpd",), "requests per day", counted_with=("rpd", "tpd")),
    LimitKind("tpd", ("tpd",), "tokens per day", counted_with=("rpd", "tpd")),
)
KIND_BY_NAME = {kind.name: kind for kind in LIMIT_KINDS}


@dataclass(frozen=True)
class Scope:
    """One set of limits and the Redis keys that count against it: a provider's, a model's, or an API
    key's own quota (``key`` set: ``key:<id>``, shared by every provider's line)."""

    name: str
    limits: Limits
    key: str | None = None

    @classmethod
    def of_model(cls, provider: str, alias: str, limits: Limits) -> Scope:
        return cls(f"{provider}/{alias}", limits)

    @classmethod
    def of_key(cls, key_id: str, limits: Limits) -> Scope:
        return cls(f"key:{key_id}", limits, key=key_id)

    def kinds(self) -> list[LimitKind]:
        """The kinds counted in this scope, in table order."""
        return [kind for kind in LIMIT_KINDS if kind.counted_in(self.limits)]

    def steps(self) -> dict[str, Any]:
        """This scope as the Lua reads it: each counted kind with its limit (0 = counted, not checked);
        its keys follow in the same order (:meth:`Limiter._scope_keys`)."""
        return {"key": self.key is not None,
                "kinds": [[kind.name, getattr(self.limits, kind.name) or 0] for kind in self.kinds()]}


@dataclass(frozen=True)
class Attempt:
    outcome: Start                # run | wait | expired | gone | too_large
    attempt: int = 0              # run: the job's attempt number (0 when re-waiting after a 429)
    queue_wait_s: float = 0.0     # run: how long it waited since it was queued
    rank: int = 0                 # wait: position in line (0 = head)
    wait_ms: int = 0              # wait: when the head may try again (0 = when woken)
    detail: str = ""              # gone: the job's state; too_large: the limit it exceeds
    lost_attempt: int = 0         # gone: the attempt a dead worker lost (its job settled cancelled)


class Limiter:
    """``keyed``: some API key has limits of its own (the registry's ``key_limits``); only then does the
    line look past jobs of blocked keys — with none, the head is simply the first job."""

    def __init__(self, store: JobStore, *, keyed: bool = False) -> None:
        self.store = store
        self.keyed = keyed
        self.redis: redis.Redis = store.redis
        self.prefix = store.prefix
        self._acquire = lua.register(self.redis, "acquire")
        self._release = lua.register(self.redis, "release")
        self._renew = lua.register(self.redis, "renew_permits")
        self._leave = lua.register(self.redis, "leave")

    # keys ---------------------------------------------------------------------------------------
    def key(self, scope: str, kind: str) -> str:
        return f"{self.prefix}:lim:{scope}:{kind}"

    @property
    def wake_channel(self) -> str:
        return self.store.wake_channel

    def proc_key(self, proc_id: str) -> str:
        return f"{self.prefix}:lim:proc:{proc_id}"

    def _scope_keys(self, scopes: list[Scope]) -> list[str]:
        """Every scope's permit keys, in the order ``permits.lua`` ``permits_open`` consumes them."""
        return [self.key(s.name, suffix) for s in scopes for kind in s.kinds() for suffix in kind.keys]

    @property
    def _keyblock(self) -> str:
        return f"{self.prefix}:lim:keyblock"

    # operations ---------------------------------------------------------------------------------
    def heartbeat(self, proc_id: str, ttl_s: float) -> None:
        """This worker process is alive: the jobs it holds in lines keep their places."""
        self.redis.set(self.proc_key(proc_id), 1, px=int(ttl_s * 1000))

    def acquire(self, *, provider: str, scopes: list[Scope], job_id: str, execution: str, job_lease_s: float,
                call_id: str, call_lease_s: float, tokens: int, key: str, weight: float, proc_id: str,
                rewait: bool = False) -> Attempt:
        """Join the provider's line (once) and, if this job is its head and every scope has room,
        take all permits and claim the job — atomically. See the module docstring for guarantees."""
        keys = [self.key(provider, "line"), self.key(provider, "vt"), self.key(provider, "owner"),
                self.key(provider, "cooldown"), self.store.job_key(job_id), self.store.lease_key(job_id),
                self.key(provider, "keyof"), self._keyblock, self.key(provider, "next"),
                *self._scope_keys(scopes)]
        args = {"job_id": job_id, "execution": execution, "job_lease_ms": int(job_lease_s * 1000),
                "call": call_id, "lease_ms": int(call_lease_s * 1000), "tokens": tokens, "key": key,
                "weight": weight, "proc": proc_id, "rewait": rewait, "wake": self.wake_channel,
                "job_prefix": self.store.job_prefix, "proc_prefix": self.proc_key(""), "keyed": self.keyed,
                "window_ms": WINDOW_MS, "day_ms": DAY_MS, "scopes": [s.steps() for s in scopes]}
        reply = self._acquire(keys=keys, args=[json.dumps(args, separators=(",", ":"))])
        outcome = Start(_text(reply[0]))
        if outcome is Start.RUN:
            return Attempt(outcome, attempt=int(reply[1]), queue_wait_s=float(reply[2]))
        if outcome is Start.WAIT:
            return Attempt(outcome, rank=int(reply[1]), wait_ms=int(reply[2]))
        if outcome is Start.TOO_LARGE:
            kind, scope = KIND_BY_NAME[_text(reply[1])], scopes[int(reply[3])]
            whose = "your API key's quota" if scope.key is not None else f"'{scope.name}'"
            return Attempt(outcome, detail=f"the {int(reply[2])} {kind.unit} {whose} allows")
        if outcome is Start.GONE:
            lost = int(reply[2]) if len(reply) > 2 else 0
            return Attempt(outcome, detail=_text(reply[1]), lost_attempt=lost)
        return Attempt(outcome)

    def release(self, *, provider: str, scopes: list[Scope], call_id: str, tokens: int,
                actual_tokens: int | None, refund: bool = False) -> None:
        """Settle every permit of the call that reserved ``tokens``: give back its concurrency, settle its
        token reservations to ``actual_tokens`` (None: keep them), or refund the call (``refund``: the
        upstream did no work, e.g. it answered 429). Lifts the block of the call's API key, if it has
        limits of its own, and wakes the head of the line."""
        key = next((s.key for s in scopes if s.key is not None), "")
        args = {"call": call_id, "tokens": tokens, "actual": -1 if actual_tokens is None else actual_tokens,
                "refund": refund, "key": key, "keyed": self.keyed, "wake": self.wake_channel,
                "window_ms": WINDOW_MS, "day_ms": DAY_MS, "lease_ms": 0,
                "scopes": [s.steps() for s in scopes]}
        self._release(keys=[self.key(provider, "line"), self.key(provider, "keyof"), self._keyblock,
                            *self._scope_keys(scopes)], args=[json.dumps(args, separators=(",", ":"))])

    def leave(self, provider: str, job_id: str) -> None:
        """Take a waiting job out of its line (it gave up); if it was the head, wake the next."""
        keys = [self.key(provider, "line"), self.key(provider, "owner"), self.key(provider, "keyof"),
                self._keyblock]
        self._leave(keys=keys, args=[job_id, self.wake_channel, 1 if self.keyed else 0])

    def blocked_for(self, provider: str, key: str | None) -> float:
        """Seconds before this provider's line may start anything (its head was told when a window
        or a day frees), or — longer — before ``key``'s own quota has room: the floor of an honest
        Retry-After."""
        now_ms = _now_ms(self.redis)
        next_try, key_until = self.redis.get(self.key(provider, "next")), (
            self.redis.hget(self._keyblock, key) if key and self.keyed else None)
        until = max(float(next_try or 0), float(key_until or 0))
        return max(0.0, (until - now_ms) / 1000)

    def renew(self, scopes: list[Scope], call_id: str, lease_s: float) -> None:
        conc = [self.key(s.name, "conc") for s in scopes]
        if conc:
            self._renew(keys=conc, args=[call_id, int(lease_s * 1000)])

    def cool_down(self, provider: str, seconds: float) -> None:
        """Every worker of ``provider`` holds back for ``seconds`` (never shortens a longer cooldown)."""
        key = self.key(provider, "cooldown")
        ms = max(1, int(seconds * 1000))
        if self.redis.pttl(key) < ms:
            self.redis.set(key, 1, px=ms)

    def snapshot(self, provider: str, scopes: list[Scope]) -> dict[str, Any]:
        """Current use, for ``GET /v1/limits``."""
        now_ms = _now_ms(self.redis)
        pipe = self.redis.pipeline()
        scopes_out = self.use(scopes, now_ms, pipe)
        pipe.zcard(self.key(provider, "line"))
        pipe.pttl(self.key(provider, "cooldown"))
        values = pipe.execute()
        return {"scopes": scopes_out(values), "waiting_in_line": values[-2],
                "cooldown_ms": max(0, values[-1])}

    def use(self, scopes: list[Scope], now_ms: int, pipe: Any) -> Any:
        """Queue on ``pipe`` the reads of each scope's current use; returns the function that turns the
        pipeline's values into ``{scope: {limits, in_flight, requests_last_60s, ...}}``."""
        for s in scopes:
            pipe.zcount(self.key(s.name, "conc"), now_ms, "+inf")
            pipe.zcount(self.key(s.name, "rpm"), now_ms - WINDOW_MS, "+inf")
            pipe.hget(self.key(s.name, "tok"), "sum")
            pipe.hmget(self.key(s.name, "rpd"), "d", "n")
            pipe.hmget(self.key(s.name, "tpd"), "d", "n")

        def today(counter: list[Any]) -> int:
            day, count = counter
            return int(count) if day is not None and int(day) == now_ms // DAY_MS else 0

        def render(values: list[Any]) -> dict[str, Any]:
            out = {}
            for i, s in enumerate(scopes):
                conc, rpm, tok, requests, tokens = values[5 * i: 5 * i + 5]
                entry = {"limits": s.limits.model_dump(exclude_none=True), "in_flight": conc,
                         "requests_last_60s": rpm, "tokens_last_60s": int(tok or 0)}
                if s.limits.rpd or s.limits.tpd:
                    entry["requests_today"] = today(requests)
                    entry["tokens_today"] = today(tokens)
                out[s.name] = entry
            return out
        return render

    def key_use(self, key_id: str, limits: Limits) -> dict[str, Any]:
        """An API key's own quota and its use (``GET /v1/limits``, for the calling key)."""
        scope = Scope.of_key(key_id, limits)
        now_ms = _now_ms(self.redis)
        pipe = self.redis.pipeline()
        render = self.use([scope], now_ms, pipe)
        pipe.hget(self._keyblock, key_id)
        values = pipe.execute()
        entry: dict[str, Any] = render(values)[scope.name]
        blocked = max(0, int(float(values[-1] or 0)) - now_ms)
        entry["blocked_ms"] = blocked
        return entry

    def window_start_in(self, scope: str, rpm: int, ahead: int) -> float | None:
        """Seconds until the call behind ``ahead`` others may start, if ``scope``'s RPM window is what
        holds them back; None while the window still has room for all of them (then something else —
        concurrency, TPM — paces the line).

        Every call ahead takes the next slot to free: the ones free now first, then slot ``j`` (0-based)
        frees 60 s after the start of the ``j``-th call in the current window (or, past those, 60 s
        after now, when the slots used now free again), ``j // rpm`` whole windows later — the line
        moves in one burst per window, which a rate over the last minute cannot describe."""
        now_ms = _now_ms(self.redis)
        rpm_key = self.key(scope, "rpm")
        in_window = int(self.redis.zcount(rpm_key, now_ms - WINDOW_MS, "+inf"))
        slot = ahead - (rpm - in_window)
        if slot < 0:
            return None
        cycles, index = divmod(slot, rpm)
        base = float(now_ms)
        if index < in_window:
            starts = self.redis.zrangebyscore(rpm_key, now_ms - WINDOW_MS, "+inf", start=index, num=1,
                                              withscores=True)
            if starts:
                base = float(cast(list[tuple[bytes, float]], starts)[0][1])
        frees_at = base + WINDOW_MS * (cycles + 1)
        return max(0.0, (frees_at - now_ms) / 1000)

    def line_length(self, provider: str) -> int:
        return int(self.redis.zcard(self.key(provider, "line")))

    def position(self, provider: str, job_id: str) -> int | None:
        rank = cast(int | None, self.redis.zrank(self.key(provider, "line"), job_id))
        return None if rank is None else int(rank)


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
