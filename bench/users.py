"""The gateway as users run it: ``llm-gateway up`` (embedded Redis and PostgreSQL, a worker per
provider, Flower) in front of the fake upstream, against the same fake called directly — interleaved.

    .venv/bin/python bench/users.py                       # 3 rounds, 4 s per cell
    .venv/bin/python bench/users.py --rounds 5 --duration 6 --ttft-calls 100
    .venv/bin/python bench/users.py --baseline ../main      # before (that checkout) / after, one run
    .venv/bin/python bench/users.py --baseline . --env GATEWAY_TASK_EVENTS=off   # a setting's effect

It starts ``python -m launcher.cli up`` from this checkout (the code measured is the code next to this
file) in a throw-away state directory, on free ports, with ``GATEWAY_AUTH=off`` and a registry whose one
provider ``fake`` (kind ``openai``) is ``tests/fakeprovider.py`` — so ``up`` runs the API, one worker
(``worker-fake``) and Flower, exactly as for a user. With ``--baseline CHECKOUT`` a second ``up``
runs from that checkout (``--env`` applies to this one only). Each round runs every cell direct to the
fake and then through each gateway, one right after the other (the machine is shared; only
side-by-side ratios mean anything):

* c=1 non-streamed chat: p50/p99, the latency the gateway adds, and the ratio gateway/direct;
* c=32 and c=128: calls/s and the ratio gateway/direct;
* TTFT (time to the first content chunk) of streamed calls at concurrency 4, in the caller's three
  protocols — OpenAI ``/v1/chat/completions``, Anthropic ``/v1/messages``, Ollama ``/api/chat`` —
  each against a direct OpenAI stream from the fake, alternating call by call.

Per cell the median over rounds is reported (TTFT: percentiles over the pooled calls), with each
gateway's CPU per call by part (API, worker, Flower, Redis, PostgreSQL) and its Redis commands per call
(``INFO commandstats`` deltas; commands inside Lua scripts count too). Load driver: ``bench/load.py``
(wrk if installed, else gevent).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _stack import cpu_seconds  # noqa: E402
from load import run_load  # noqa: E402

from bench.profile import summarize  # noqa: E402
from launcher.discovery import STORES, embedded_url  # noqa: E402
from tests.fakeprovider import FakeProvider  # noqa: E402
from tests.integration.uprun import Up, temporary_directory  # noqa: E402

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello from the benchmark"}]}
GOALS = {"added_p50_ms": 3.0, "added_p99_ms": 6.0, "rps_c32": 500.0, "added_ttft_p50_ms": 5.0}


def registry(base_url: str) -> str:
    return ("providers:\n  fake:\n    kind: openai\n"
            f"    base_url: {base_url}\n    api_key_env: FAKE_API_KEY\n    pool: 256\n    timeout: 120\n"
            "models:\n  fake-model:\n    provider: fake\n    model: fake-model\n"
            "    price: {input: 1.0, output: 2.0}\n")


# ------------------------------------------------------------------ streams
def stream_bodies(words: int) -> dict[str, tuple[str, bytes]]:
    """Per protocol: the path and body of one streamed call answering ``words`` words."""
    content = " ".join(f"w{i}" for i in range(words))
    msgs = [{"role": "user", "content": content}]
    return {
        "openai": ("/v1/chat/completions", json.dumps({"model": "fake-model", "stream": True,
                                                       "messages": msgs}).encode()),
        "anthropic": ("/v1/messages", json.dumps({"model": "fake-model", "stream": True, "max_tokens": 256,
                                                  "messages": msgs}).encode()),
        "ollama": ("/api/chat", json.dumps({"model": "fake-model", "stream": True,
                                            "messages": msgs}).encode()),
    }


def _has_content(line: bytes) -> bool:
    """A line carrying answer text in any of the three protocols (an SSE data line or an NDJSON line)."""
    for marker in (b'"content":"', b'"text":"'):
        i = line.find(marker)
        if i >= 0 and line[i + len(marker):i + len(marker) + 1] != b'"':
            return True
    return False


def first_token_s(conn: http.client.HTTPConnection, path: str, body: bytes) -> float:
    """Seconds from sending the request to reading the first line with answer text; reads the rest."""
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                   "Authorization": "Bearer sk-bench"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {response.read()[:300]!r}")
    first = None
    while True:
        line = response.readline()
        if not line:
            break
        if first is None and _has_content(line):
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{path}: no content in the stream")
    return first


def ttft_pairs(direct: str, gateway: str, path: str, body: bytes, direct_body: bytes, calls: int,
               concurrency: int) -> tuple[list[float], list[float]]:
    """``concurrency`` threads, each alternating one direct and one gateway streamed call."""
    d_url, g_url = urlsplit(direct), urlsplit(gateway)
    d_out: list[float] = []
    g_out: list[float] = []
    per = max(1, calls // concurrency)

    def run() -> None:
        dc = http.client.HTTPConnection(d_url.netloc, timeout=30)
        gc = http.client.HTTPConnection(g_url.netloc, timeout=30)
        for _ in range(per):
            d_out.append(first_token_s(dc, d_url.path + "/chat/completions", direct_body))
            g_out.append(first_token_s(gc, path, body))
        dc.close()
        gc.close()

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return d_out, g_out


# ------------------------------------------------------------------ helpers
def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def parts(up: Up) -> dict[str, list[Any]]:
    """``up``'s processes by part: api (gunicorn), worker (celery worker), flower, redis, postgres."""
    import psutil

    groups: dict[str, list[Any]] = {k: [] for k in ("api", "worker", "flower", "redis", "postgres")}
    for proc in psutil.Process(up.proc.pid).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for name, marker in (("api", "gunicorn"), ("flower", " flower"), ("worker", "celery"),
                             ("redis", "redis-server"), ("postgres", "postgres")):
            if marker in cmd or proc.name().startswith(marker.strip()):
                groups[name].append(proc)
                break
    return groups


def profile_targets(groups: dict[str, list[Any]]) -> dict[str, int]:
    """The pids to sample: gunicorn's worker (the last gunicorn process) and the Celery worker."""
    return {"api": groups["api"][-1].pid, "worker": groups["worker"][0].pid}


def commandstats(client: Any) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in client.info("commandstats").items()}


class UpAt(Up):
    """``up`` run from ``checkout`` (its code on PYTHONPATH), else as :class:`Up`."""

    def __init__(self, state_dir: Path, checkout: Path, env: dict[str, str]) -> None:
        import tests.integration.uprun as uprun

        saved, uprun.ROOT = uprun.ROOT, checkout  # Up puts ROOT on the children's PYTHONPATH
        try:
            super().__init__(state_dir, cwd=checkout, env=env)
        finally:
            uprun.ROOT = saved


class Side:
    """One gateway under test: its ``up``, its processes by part, its Redis."""

    def __init__(self, name: str, up: Up, state: Path) -> None:
        import redis

        self.name, self.up = name, up
        up.wait_ready(120)
        self.root = f"http://127.0.0.1:{up.api_port}"
        self.chat = self.root + "/v1/chat/completions"
        self.groups = parts(up)
        url = embedded_url(state, STORES["redis"])
        self.redis = redis.Redis.from_url(url) if url else None

    def stop(self) -> None:
        self.up.proc.terminate()
        try:
            self.up.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.up.proc.kill()


def measure(side: Side | None, url: str, c: int, body: bytes, args: argparse.Namespace,
            res: dict[str, Any]) -> None:
    """One load cell; for a gateway also the CPU its parts used and the Redis commands it ran."""
    before = commandstats(side.redis) if side is not None and side.redis is not None else None
    cpu0 = {k: cpu_seconds(v) for k, v in side.groups.items()} if side is not None else {}
    r = run_load(url, concurrency=c, duration=args.duration, body=body, driver=args.driver)
    if side is not None:
        r["cpu_s"] = {k: cpu_seconds(v) - cpu0[k] for k, v in side.groups.items()}
        if before is not None and side.redis is not None and c > 1:
            after = commandstats(side.redis)
            r["ops"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    res.setdefault(f"{side.name if side else 'direct'}{c}", []).append(r)


def run(args: argparse.Namespace) -> dict[str, Any]:
    chat = json.dumps(CHAT).encode()
    extra = dict(kv.split("=", 1) for kv in args.env)
    res: dict[str, Any] = {"cells": {}, "ttft": {}, "sides": [], "stream_cost": {}}
    sides: list[Side] = []
    with FakeProvider() as fake, temporary_directory("bench-users-") as workdir:
        config = workdir / "registry.yaml"
        config.write_text(registry(fake.base_url))
        base_env = {"GATEWAY_CONFIG": str(config), "FAKE_API_KEY": "sk-bench-upstream"}
        try:
            if args.baseline:
                state = workdir / "baseline"
                env = {**base_env, **dict(kv.split("=", 1) for kv in args.baseline_env)}
                sides.append(Side("baseline", UpAt(state, Path(args.baseline).resolve(), env), state))
            state = workdir / "gateway"
            sides.append(Side("gateway", UpAt(state, ROOT, {**base_env, **extra}), state))
            res["sides"] = [s.name for s in sides]
            direct_chat = fake.base_url + "/chat/completions"
            for url in (direct_chat, *(s.chat for s in sides)):  # warm every path, unrecorded
                run_load(url, concurrency=8, duration=2, body=chat, driver=args.driver)
            if args.profile:
                body = stream_bodies(args.words)["openai"][1] if args.profile_stream else chat
                res["profile"] = profile(sides[-1].chat, body, sides[-1].groups, args)
                return res
            bodies = stream_bodies(args.words)
            for rnd in range(args.rounds):
                order = sides if rnd % 2 == 0 else sides[::-1]  # neither gateway always runs first
                for c in (1, *args.concurrency):
                    measure(None, direct_chat, c, chat, args, res["cells"])
                    for side in order:
                        measure(side, side.chat, c, chat, args, res["cells"])
                for proto, (path, body) in bodies.items():
                    for side in order:
                        cpu0 = {k: cpu_seconds(v) for k, v in side.groups.items()}
                        ops0 = commandstats(side.redis) if side.redis is not None else {}
                        d, g = ttft_pairs(fake.base_url, side.root, path, body, bodies["openai"][1],
                                          args.ttft_calls, 4)
                        cost = res["stream_cost"].setdefault(side.name, {"calls": 0, "cpu": {}, "ops": 0})
                        cost["calls"] += len(g)
                        for k, v in side.groups.items():
                            cost["cpu"][k] = cost["cpu"].get(k, 0.0) + cpu_seconds(v) - cpu0[k]
                        if side.redis is not None:  # the direct calls in between cost the gateway nothing
                            ops1 = commandstats(side.redis)
                            cost["ops"] += sum(ops1.values()) - sum(ops0.values())
                            for k in ("cmdstat_evalsha", "cmdstat_publish"):
                                cost[k] = cost.get(k, 0) + ops1.get(k, 0) - ops0.get(k, 0)
                        slot = res["ttft"].setdefault(proto, {})
                        slot.setdefault(f"direct-{side.name}", []).extend(d)
                        slot.setdefault(side.name, []).extend(g)
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for side in sides:
                side.stop()
    return res


def profile(url: str, body: bytes, groups: dict[str, list[Any]], args: argparse.Namespace) -> dict[str, str]:
    """py-spy on the API's gunicorn worker and the Celery worker during a c=32 gateway run."""
    import subprocess

    pyspy = str(Path(sys.executable).with_name("py-spy"))
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    spies, files = [], {}
    for name, pid in profile_targets(groups).items():
        files[name] = outdir / f"users-profile-{stamp}-{name}.txt"
        spies.append(subprocess.Popen(
            [pyspy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--function", "--format",
             "raw", "--duration", str(int(args.profile) + 1), "--output", str(files[name])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)
    result = run_load(url, concurrency=32, duration=args.profile, body=body, driver=args.driver)
    for spy in spies:
        spy.wait(timeout=60)
    out = {"load": f"{result['rps']:.0f} calls/s, p50 {result['p50_ms']:.1f} ms, errors {result['errors']}"}
    for name, path in files.items():
        out[name] = summarize(path, args.top) if path.exists() else "(py-spy wrote nothing)"
    return out


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    if "profile" in res:
        return "\n\n".join(f"=== {k}\n{v}" for k, v in res["profile"].items())
    cells, names = res["cells"], res["sides"]

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in cells[key])

    head = "| measure | direct | " + " | ".join(f"{n} | {n} added | {n} ratio" for n in names) + " | goal |"
    out = [f"`up` vs direct, {args.rounds} interleaved rounds of {args.duration:g} s per cell (medians over "
           f"rounds; driver {cells['direct1'][0]['driver']}); ratio = gateway / direct", "", head,
           "|---|---:|" + "---:|---:|---:|" * len(names) + "---|"]
    for q, goal in (("p50_ms", "added ≤ 3"), ("p99_ms", "added ≤ 6")):
        d = med("direct1", q)
        row = [f"| c=1 {q[:3]} ms | {d:.2f}"]
        for n in names:
            g = med(f"{n}1", q)
            row.append(f"{g:.2f} | {g - d:.2f} | {g / d:.1f}")
        out.append(" | ".join(row) + f" | {goal} |")
    for c in args.concurrency:
        d = med(f"direct{c}", "rps")
        row = [f"| c={c} calls/s | {d:.0f}"]
        for n in names:
            g = med(f"{n}{c}", "rps")
            errs = sum(r["errors"] for r in cells[f"{n}{c}"])
            row.append(f"{g:.0f}{f' ({errs} errors)' if errs else ''} | | {g / d:.3f}")
        out.append(" | ".join(row) + f" | {'≥ 500' if c == 32 else ''} |")
    for proto, slot in res["ttft"].items():
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            row = [f"| TTFT {proto} {name} ms (c=4) | {pct(slot[f'direct-{names[0]}'], q) * 1000:.2f}"]
            for n in names:
                dv, gv = pct(slot[f"direct-{n}"], q) * 1000, pct(slot[n], q) * 1000
                row.append(f"{gv:.2f} | {gv - dv:.2f} | {gv / dv:.1f}")
            out.append(" | ".join(row) + f" | {'added ≤ 5' if name == 'p50' else ''} |")
    out.append("")
    for n, cost in res["stream_cost"].items():
        calls = cost["calls"]
        cpu = {k: 1000 * v / calls for k, v in cost["cpu"].items()}
        out.append(f"- {n}, streamed calls ({args.words} words, c=4): CPU ms per call: "
                   + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) + f" (total {sum(cpu.values()):.2f}); "
                   f"Redis commands per call {cost['ops'] / calls:.1f} (evalsha "
                   f"{cost.get('cmdstat_evalsha', 0) / calls:.1f}, "
                   f"publish {cost.get('cmdstat_publish', 0) / calls:.1f})")
    for n in names:
        for c in args.concurrency:
            runs = cells[f"{n}{c}"]
            calls = sum(r["requests"] for r in runs)
            cpu = {k: 1000 * sum(r["cpu_s"][k] for r in runs) / calls for k in runs[0]["cpu_s"]}
            out.append(f"- {n}, c={c}: CPU ms per call: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                       + f" (total {sum(cpu.values()):.2f})")
            if "ops" in runs[0]:
                total: dict[str, int] = {}
                for r in runs:
                    for k, v in r["ops"].items():
                        total[k] = total.get(k, 0) + v
                per = sorted(((k.removeprefix("cmdstat_"), v / calls) for k, v in total.items()),
                             key=lambda kv: -kv[1])
                out.append(f"  Redis commands per call {sum(v for _, v in per):.1f}: "
                           + ", ".join(f"{k} {v:.2f}" for k, v in per if v >= 0.05))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per cell per round")
    p.add_argument("--concurrency", default="32,128")
    p.add_argument("--ttft-calls", type=int, default=60,
                   help="streamed calls per protocol each way, per round")
    p.add_argument("--words", type=int, default=20)
    p.add_argument("--driver", default="auto")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for `up` (repeatable)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--baseline-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the baseline's `up` (repeatable)")
    p.add_argument("--baseline", default=None, metavar="CHECKOUT",
                   help="also run `up` from this checkout (e.g. main), interleaved: before/after in one run")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="instead of the table: py-spy the API and the worker under c=32 for SECONDS")
    p.add_argument("--top", type=int, default=22, help="frames per list in --profile")
    p.add_argument("--profile-stream", action="store_true", help="--profile streamed calls (--words long)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    res = run(args)
    print(report(res, args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
