"""Fault benchmark (issue 9): what the gateway does with accepted calls when a part of it breaks.

    .venv/bin/python bench/faults.py                        # every scenario, a few minutes
    .venv/bin/python bench/faults.py --only worker-kill     # one scenario (repeatable option)
    .venv/bin/python bench/faults.py --scale 4 --seed 7     # 4x the calls; another seed
    .venv/bin/python bench/faults.py --json                 # the rows as JSON instead of Markdown

Each scenario starts its own stack (``bench/_stack.py``: the fake upstream, a fresh database
``bench_faults_<prefix>`` migrated with ``llm-gateway migrate``, ``llm-gateway api --workers 1`` and one
``llm-gateway worker --provider fake``, its own Redis key prefix in DB 9 — or, for the Redis scenarios,
a private ``redis-server`` with AOF on a free loopback port), sends async jobs (``POST /v1/jobs``) and
synchronous chat calls spread over a few seconds, injects its fault, waits until every accepted call
has an answer or its recovery window (``--window``, 60 s) has passed, and stops the stack. Every call's
text is unique and asks the fake upstream to answer after 1–2 s (its ``sleep:`` prefix, seeded).

Scenarios (``--only``): ``worker-kill`` (SIGKILL the worker mid-load, start a new one), ``api-kill``
(SIGKILL the API mid-load, restart it 2 s later), ``redis-kill`` (SIGKILL Redis, restart it on its AOF
5 s later), ``redis-wipe`` (FLUSHALL mid-load), ``pg-cut-sync`` (Postgres cut for 15 s through
``tests/faults.TcpProxy`` with ``GATEWAY_AUTH=auto`` and one key, sync load throughout) and
``pg-cut-settle`` (async jobs finishing upstream while Postgres is cut).

Columns:

* sent — async jobs accepted (202) + sync calls that reached the API (a refused connection is not sent);
* served — sync 200s and async jobs ``succeeded``, each carrying the upstream's answer to its own text;
* lost — accepted async jobs not terminal at the end of the window + sync callers with no answer by
  then (callers whose connection died with a SIGKILLed API are counted in the notes as "cut off");
* stuck — async jobs still ``queued``/``running`` at the end (the async part of lost);
* run twice — texts the fake upstream received more than once (its ``by_content`` counter);
* billed twice — job ids with more than one ``usage`` row of outcome ``success``;
* 5xx — answers >= 500 except the documented 503s that told the truth, which have their own column:
  ``outcome_unknown`` always, and ``queue_unavailable``/``database_unavailable``/``job_lost``/
  ``service_unavailable`` (which say nothing ran, retry) only if the fake never received that text;
* time to recover — from the fault to the last accepted call's terminal state (async ``finished_at``,
  sync answer); "> window" when something was lost.

Usage rows of sync calls reach Postgres through a Redis stream: before counting, the run waits (up to
35 s, longer than the ledger's 30 s claim of a dead worker's entries) for that stream to empty.
Traffic goes only to 127.0.0.1. The machine's load matters: say what else ran when quoting numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import DEFAULT_ADMIN_DB_URL, DEFAULT_REDIS_URL, RedisServer, Stack

from common.contract import TERMINAL
from tests.faults import TcpProxy

SAYS_NOTHING_RAN = frozenset({"queue_unavailable", "database_unavailable", "job_lost", "service_unavailable"})
OUTCOME_UNKNOWN = "outcome_unknown"
USAGE_DRAIN_S = 35.0
POLL_S = 0.5


# ============================================================================ one call
@dataclass
class Call:
    """One request of the load and what became of it (wall-clock times)."""

    kind: str                      # "async" | "sync"
    prompt: str
    offset: float                  # seconds after the load's start at which it is sent
    sent_at: float | None = None
    done_at: float | None = None   # sync: answer received; async: the POST's answer
    status: int | None = None
    code: str | None = None        # the error code of a non-2xx answer
    job_id: str | None = None
    failure: str | None = None     # refused | cut off | timeout | <exception name>
    served: bool = False           # sync only: 200 with the upstream's answer to this prompt

    @property
    def echo(self) -> str:
        return "echo: " + self.prompt


def _classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                        http.client.IncompleteRead)):
        return "cut off"
    return type(exc).__name__


def _answer_text(body: dict[str, Any] | None) -> str | None:
    try:
        return body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None


def post(port: int, path: str, payload: dict[str, Any], headers: dict[str, str], timeout: float
         ) -> tuple[int, dict[str, str], dict[str, Any] | None]:
    """POST JSON to the API; returns (status, lower-case headers, JSON body or None). Raises OSError /
    http.client.HTTPException as the connection failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def send(call: Call, port: int, auth: dict[str, str], timeout: float) -> None:
    """Make ``call`` and record its outcome on it (never raises)."""
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": call.prompt}]}
    call.sent_at = time.time()
    try:
        status, headers, body = post(port, "/v1/jobs" if call.kind == "async" else "/v1/chat/completions",
                                     payload, auth, timeout)
    except (OSError, http.client.HTTPException) as exc:
        call.failure = _classify(exc)
        call.done_at = time.time()
        return
    call.status = status
    call.job_id = (body or {}).get("id") if call.kind == "async" else headers.get("x-gateway-job-id")
    error = (body or {}).get("error")
    call.code = error.get("code") if isinstance(error, dict) else None
    call.served = call.kind == "sync" and status == 200 and _answer_text(body) == call.echo
    call.done_at = time.time()


# ============================================================================ the load
@dataclass(frozen=True)
class Options:
    rng: random.Random
    scale: float
    window: float

    def n(self, base: int) -> int:
        return max(1, round(base * self.scale))


class Load:
    """``n_async`` jobs and ``n_sync`` calls, interleaved at random and sent evenly over ``spread``
    seconds, each from its own thread (a sync caller waits up to ``call_timeout`` for its answer)."""

    def __init__(self, stack: Stack, o: Options, name: str, *, n_async: int, n_sync: int, spread: float,
                 latency: tuple[float, float] = (1.0, 2.0)) -> None:
        self.stack = stack
        self.call_timeout = spread + o.window + 30.0    # past the window: a caller never gives up first
        rng = o.rng
        kinds = ["async"] * n_async + ["sync"] * n_sync
        rng.shuffle(kinds)
        step = spread / max(1, len(kinds))
        self.calls = [Call(kind, f"sleep:{rng.uniform(*latency):.2f} faults {name} {kind} {i} "
                                 f"{rng.getrandbits(64):016x}", i * step)
                      for i, kind in enumerate(kinds)]
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="load")
        self.started_at = 0.0

    def start(self) -> Load:
        self.started_at = time.time()
        self._dispatcher.start()
        return self

    def _dispatch(self) -> None:
        assert self.stack.api_port is not None
        for call in self.calls:
            time.sleep(max(0.0, self.started_at + call.offset - time.time()))
            timeout = 10.0 if call.kind == "async" else self.call_timeout
            threading.Thread(target=send, args=(call, self.stack.api_port, self.stack.auth, timeout),
                             daemon=True).start()

    def at(self, offset: float) -> None:
        """Wait until ``offset`` seconds after the load's start."""
        time.sleep(max(0.0, self.started_at + offset - time.time()))

    def sent_all(self, timeout: float) -> bool:
        self._dispatcher.join(timeout)
        return not self._dispatcher.is_alive()

    @property
    def accepted_jobs(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "async" and c.status == 202 and c.job_id]

    @property
    def sync(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "sync"]


# ============================================================================ reading the outcome
def db_url(stack: Stack) -> str:
    """The stack's database, directly (never through a fault proxy)."""
    return f"{stack.admin_db_url.rpartition('/')[0]}/{stack.db_name}"


def job_rows(stack: Stack, ids: list[str]) -> dict[str, dict[str, Any]]:
    import psycopg

    with psycopg.connect(db_url(stack), autocommit=True) as conn:
        rows = conn.execute("SELECT id, status, extract(epoch FROM finished_at), result FROM jobs "
                            "WHERE id = ANY(%s)", (ids,)).fetchall()
    return {r[0]: {"status": r[1], "finished_at": float(r[2]) if r[2] is not None else None, "result": r[3]}
            for r in rows}


def usage_rows(stack: Stack) -> list[tuple[str, str]]:
    """(job_id, outcome) of every usage row in Postgres."""
    import psycopg

    with psycopg.connect(db_url(stack), autocommit=True) as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT job_id, outcome FROM usage").fetchall()]


def drain_usage(stack: Stack, limit: float = USAGE_DRAIN_S) -> int:
    """Wait until the sync usage rows in transit (the Redis stream ``<prefix>:usage``) reached Postgres;
    returns how many were still in transit when ``limit`` ran out (0: all flushed)."""
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + limit
    try:
        while True:
            left = int(client.xlen(f"{stack.prefix}:usage"))
            if left == 0 or time.monotonic() > deadline:
                return left
            time.sleep(POLL_S)
    finally:
        client.close()


def settle(stack: Stack, load: Load, deadline: float) -> float:
    """Wait until every call is sent, every sync caller answered and every accepted job terminal, or
    until ``deadline`` (wall clock); returns when it stopped waiting."""
    load.sent_all(max(0.0, deadline - time.time()))
    while time.time() < deadline:
        waiting = any(c.done_at is None for c in load.calls)
        ids = [c.job_id for c in load.accepted_jobs if c.job_id]
        rows = job_rows(stack, ids) if ids else {}
        if not waiting and all(rows.get(i, {}).get("status") in TERMINAL for i in ids):
            break
        time.sleep(POLL_S)
    return time.time()


# ============================================================================ one row
@dataclass
class Row:
    scenario: str
    sent: int = 0
    served: int = 0
    lost: int = 0
    stuck: int = 0
    run_twice: int = 0
    billed_twice: int = 0
    http_5xx: int = 0
    told_truth_503: int = 0
    recover_s: float | None = None   # None: not everything was answered within the window
    window_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


def _truthful_503(call: Call, runs: dict[str, int]) -> bool:
    if call.status != 503:
        return False
    return call.code == OUTCOME_UNKNOWN or (call.code in SAYS_NOTHING_RAN and runs.get(call.prompt, 0) == 0)


def measure(name: str, stack: Stack, load: Load, t_fault: float, window: float,
            baseline_jobs: set[str]) -> Row:
    """Settle the load, then count everything the table reports (see the module docstring). The calls
    are judged as they stood when the window closed: a later answer does not count."""
    end = settle(stack, load, t_fault + window)
    calls = [replace(c) for c in load.calls]
    in_transit = drain_usage(stack)
    assert stack.fake is not None
    seen = stack.fake.stats()["by_content"]
    runs = {c.prompt: seen.get(c.prompt, 0) for c in calls}
    jobs = [c for c in calls if c.kind == "async" and c.status == 202 and c.job_id]
    rows = job_rows(stack, [c.job_id for c in jobs if c.job_id])
    usage = [(j, o) for j, o in usage_rows(stack) if j not in baseline_jobs]
    success = Counter(j for j, o in usage if o == "success")

    row = Row(name, window_s=window)
    reached = [c for c in calls if c.kind == "sync" and c.sent_at is not None and c.failure != "refused"]
    row.sent = len(jobs) + len(reached)
    async_state = Counter(rows.get(c.job_id or "", {}).get("status", "missing") for c in jobs)
    row.stuck = sum(n for state, n in async_state.items() if state not in TERMINAL)  # or "missing"
    row.lost = row.stuck + sum(1 for c in reached if c.done_at is None or c.failure == "timeout")
    row.served = sum(c.served for c in reached) + sum(
        1 for c in jobs if rows.get(c.job_id or "", {}).get("status") == "succeeded"
        and _answer_text(rows[c.job_id or ""]["result"]) == c.echo)
    row.run_twice = sum(1 for n in runs.values() if n > 1)
    row.billed_twice = sum(1 for n in success.values() if n > 1)
    answered = [c for c in calls if c.status is not None]
    row.told_truth_503 = sum(_truthful_503(c, runs) for c in answered)
    row.http_5xx = sum(1 for c in answered if c.status is not None and c.status >= 500
                       and not _truthful_503(c, runs))
    if row.lost == 0:
        finished = [r["finished_at"] or 0.0 for r in rows.values()] + [c.done_at or 0.0 for c in reached]
        row.recover_s = max([t_fault, *finished]) - t_fault
    row.notes += _notes(calls, async_state, runs, success, in_transit)
    row.detail = {"async_states": dict(async_state), "upstream_calls": sum(runs.values()),
                  "billed_calls": sum(success.values()), "settled_after_s": round(end - t_fault, 1),
                  "sync": _sync_summary(calls), "usage_rows_in_transit": in_transit}
    return row


def _sync_summary(calls: list[Call]) -> dict[str, int]:
    """Sync calls by HTTP status, or by how the connection failed ("no answer": still waiting)."""
    return dict(Counter(str(c.status) if c.status is not None else (c.failure or "no answer")
                        for c in calls if c.kind == "sync" and c.sent_at is not None))


def _notes(calls: list[Call], async_state: Counter[str], runs: dict[str, int], success: Counter[str],
           in_transit: int) -> list[str]:
    notes = []
    if async_state:
        notes.append(f"async {dict(async_state)}")
    if any(c.kind == "sync" for c in calls):
        notes.append(f"sync {_sync_summary(calls)}")
    twice_sync = sum(1 for c in calls if c.kind == "sync" and runs.get(c.prompt, 0) > 1)
    if twice_sync:
        notes.append(f"{twice_sync} of the texts run twice were sync calls")
    notes.append(f"{sum(runs.values())} upstream calls, {sum(success.values())} billed")
    if in_transit:
        notes.append(f"{in_transit} usage rows still in Redis after {USAGE_DRAIN_S:g} s")
    refused = sum(1 for c in calls if c.failure == "refused")
    if refused:
        notes.append(f"{refused} connections refused")
    return notes


# ============================================================================ stacks
@contextmanager
def stack_for(name: str, *, redis_url: str = DEFAULT_REDIS_URL, extra_env: dict[str, str] | None = None,
              api_key: bool = False, db_proxy: TcpProxy | None = None) -> Iterator[tuple[Stack, set[str]]]:
    """A started stack of its own (database ``bench_faults_<prefix>``; with ``db_proxy`` its API and
    worker reach Postgres only through that proxy) and the job ids already in its usage table after
    its warm-up call (they are not the load's)."""
    stack = Stack(redis_url=redis_url, extra_env=dict(extra_env or {}), api_key=api_key)
    stack.db_name = f"bench_faults_{stack.prefix}"
    if db_proxy is not None:
        stack.extra_env["DATABASE_URL"] = db_proxy.url(db_url(stack))
    print(f"[{name}] starting the stack ...", file=sys.stderr, flush=True)
    try:
        stack.start()
        drain_usage(stack, 10.0)
        yield stack, {j for j, _ in usage_rows(stack)}
    finally:
        stack.stop()


def postgres_proxy() -> TcpProxy:
    """A proxy to the Postgres of ``DEFAULT_ADMIN_DB_URL``."""
    netloc = DEFAULT_ADMIN_DB_URL.split("//", 1)[1].split("/", 1)[0].rpartition("@")[2]
    host, _, port = netloc.partition(":")
    return TcpProxy(host, int(port or 5432))


def log(name: str, what: str) -> None:
    print(f"[{name}] {what}", file=sys.stderr, flush=True)


# ============================================================================ scenarios
def worker_kill(o: Options) -> Row:
    """SIGKILL the only worker mid-load; a new one starts at once."""
    name = "worker-kill"
    with stack_for(name) as (stack, baseline):
        load = Load(stack, o, name, n_async=o.n(100), n_sync=o.n(50), spread=6.0).start()
        load.at(3.0)
        assert stack.worker is not None
        stack.worker.kill()
        t_fault = time.time()
        stack.spawn_worker()
        log(name, "worker SIGKILLed, a new one started")
        return measure(name, stack, load, t_fault, o.window, baseline)


def api_kill(o: Options) -> Row:
    """SIGKILL the API mid-load (its sync callers are cut off); restart it 2 s later."""
    name = "api-kill"
    with stack_for(name) as (stack, baseline):
        load = Load(stack, o, name, n_async=o.n(100), n_sync=o.n(50), spread=6.0).start()
        load.at(3.0)
        assert stack.api is not None and stack.fake is not None
        stack.api.kill()
        t_fault = time.time()
        seen_at_kill = stack.fake.stats()["by_content"]
        log(name, "API SIGKILLed")
        time.sleep(2.0)   # the outage itself: how long the API is down
        stack.spawn_api()
        log(name, "API restarted")
        row = measure(name, stack, load, t_fault, o.window, baseline)
        row.notes.append(_cut_off_note(stack, load, seen_at_kill, row, baseline))
        return row


def _cut_off_note(stack: Stack, load: Load, seen_at_kill: dict[str, int], row: Row,
                  baseline: set[str]) -> str:
    """What became of the sync callers the crash cut off: did their text reach the upstream after it,
    and how many calls were billed under a job id no caller ever learned (theirs, or that of an async
    POST the crash cut before its 202)?"""
    assert stack.fake is not None
    now = stack.fake.stats()["by_content"]
    cut = [c for c in load.sync if c.failure == "cut off"]
    after = [c for c in cut if now.get(c.prompt, 0) > seen_at_kill.get(c.prompt, 0)]
    known = {c.job_id for c in load.calls if c.job_id} | baseline
    billed = sum(1 for j, o in usage_rows(stack) if o == "success" and j not in known)
    row.detail.update(cut_off=len(cut), cut_off_run_after_crash=len(after), cut_off_billed=billed)
    return (f"{len(cut)} sync callers cut off by the crash: {len(after)} of their texts reached the upstream "
            f"after it, {billed} billed")


def redis_kill(o: Options) -> Row:
    """SIGKILL a private Redis (AOF, fsync every second) mid-load; restart it on its data 5 s later."""
    name = "redis-kill"
    redis = RedisServer().start()
    try:
        with stack_for(name, redis_url=redis.url) as (stack, baseline):
            load = Load(stack, o, name, n_async=o.n(100), n_sync=o.n(50), spread=10.0).start()
            load.at(3.0)
            redis.kill()
            t_fault = time.time()
            log(name, "Redis SIGKILLed")
            time.sleep(5.0)   # the outage itself
            redis.start()
            log(name, "Redis restarted from its AOF")
            return measure(name, stack, load, t_fault, o.window, baseline)
    finally:
        redis.stop()


def redis_wipe(o: Options) -> Row:
    """FLUSHALL on a private Redis mid-load: queue, live job state and usage rows in transit gone."""
    import redis as redis_client

    name = "redis-wipe"
    server = RedisServer().start()
    try:
        with stack_for(name, redis_url=server.url) as (stack, baseline):
            load = Load(stack, o, name, n_async=o.n(100), n_sync=o.n(50), spread=6.0).start()
            load.at(3.0)
            client = redis_client.Redis.from_url(server.url)
            client.flushall()
            client.close()
            t_fault = time.time()
            log(name, "Redis wiped")
            return measure(name, stack, load, t_fault, o.window, baseline)
    finally:
        server.stop()


def pg_cut_sync(o: Options) -> Row:
    """Postgres cut for 15 s (connections reset, new ones refused) under sync load, with
    ``GATEWAY_AUTH=auto`` and one key: the API must keep checking keys against the last good set."""
    name = "pg-cut-sync"
    with postgres_proxy() as proxy, stack_for(name, api_key=True, db_proxy=proxy,
                                              extra_env={"GATEWAY_AUTH": "auto"}) as (stack, baseline):
        load = Load(stack, o, name, n_async=0, n_sync=o.n(150), spread=25.0).start()
        load.at(5.0)
        proxy.cut()
        t_fault = time.time()
        log(name, "Postgres cut")
        load.at(20.0)
        proxy.restore()
        log(name, "Postgres restored")
        return measure(name, stack, load, t_fault, o.window, baseline)


def pg_cut_settle(o: Options) -> Row:
    """Async jobs whose upstream call is under way when Postgres is cut (15 s): their results must
    not be lost, and no job may stay ``running``."""
    name = "pg-cut-settle"
    with postgres_proxy() as proxy, stack_for(name, db_proxy=proxy) as (stack, baseline):
        load = Load(stack, o, name, n_async=o.n(50), n_sync=0, spread=1.0, latency=(3.0, 4.0)).start()
        _wait_all_upstream(stack, load, limit=30.0)
        proxy.cut()
        t_fault = time.time()
        log(name, "Postgres cut with the jobs' upstream calls under way")
        time.sleep(15.0)   # the outage itself
        proxy.restore()
        log(name, "Postgres restored")
        return measure(name, stack, load, t_fault, o.window, baseline)


def _wait_all_upstream(stack: Stack, load: Load, limit: float) -> None:
    """Until the fake upstream has received every accepted job's text (or ``limit`` s passed)."""
    assert stack.fake is not None
    deadline = time.monotonic() + limit
    load.sent_all(limit)
    while time.monotonic() < deadline:
        seen = stack.fake.stats()["by_content"]
        posted = all(c.done_at is not None for c in load.calls)   # every POST answered: 202 or not
        if posted and all(c.prompt in seen for c in load.accepted_jobs):
            return
        time.sleep(0.1)
    log("pg-cut-settle", f"not every job reached the upstream within {limit:g}s; cutting anyway")


SCENARIOS: dict[str, Callable[[Options], Row]] = {
    "worker-kill": worker_kill, "api-kill": api_kill, "redis-kill": redis_kill, "redis-wipe": redis_wipe,
    "pg-cut-sync": pg_cut_sync, "pg-cut-settle": pg_cut_settle,
}


# ============================================================================ output
HEADER = ("| scenario | sent | served | lost | stuck | run twice | billed twice | 5xx | 503 (told the truth) "
          "| time to recover | notes |")


def markdown(rows: list[Row]) -> str:
    out = [HEADER, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        recover = f"{r.recover_s:.1f} s" if r.recover_s is not None else f"> {r.window_s:g} s"
        out.append(f"| {r.scenario} | {r.sent} | {r.served} | {r.lost} | {r.stuck} | {r.run_twice} | "
                   f"{r.billed_twice} | {r.http_5xx} | {r.told_truth_503} | {recover} | "
                   f"{'; '.join(r.notes)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run just this scenario")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every scenario's number of calls")
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--window", type=float, default=60.0, help="recovery window after the fault (s)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of Markdown")
    args = p.parse_args(argv)
    if args.scale * 150 > 9000:
        p.error("--scale too large: the fake upstream counts at most 10,000 distinct texts")
    rows = []
    for name in args.only or list(SCENARIOS):
        options = Options(random.Random(f"{args.seed}:{name}"), args.scale, args.window)
        rows.append(SCENARIOS[name](options))
        log(name, "done")
    load1, load5, _ = os.getloadavg()
    command = shlex.join(["python", "bench/faults.py", *(sys.argv[1:] if argv is None else argv)])
    if args.json:
        print(json.dumps({"command": command, "load_average": [load1, load5],
                          "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    else:
        print(f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
              f"load average at the end {load1:.2f} / {load5:.2f}\n")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
