"""The gateway as users run it: ``llm-gateway up`` (embedded Redis and PostgreSQL, a worker per
provider, Flower) in front of the fake upstream, against the same fake called directly — interleaved.

    .venv/bin/python bench/users.py                       # 3 rounds, 4 s per cell
    .venv/bin/python bench/users.py --rounds 5 --duration 6 --ttft-calls 100
    .venv/bin/python bench/users.py --env GATEWAY_TASK_EVENTS=off   # a setting's effect

It starts ``python -m launcher.cli up`` from this checkout (the code measured is the code next to this
file) in a throw-away state directory, on free ports, with ``GATEWAY_AUTH=off`` and a registry whose one
provider ``fake`` (kind ``openai``) is ``tests/fakeprovider.py`` — so ``up`` runs the API, one worker
(``worker-fake``) and Flower, exactly as for a user. Each round measures every cell twice, direct to
the fake and through the gateway, one right after the other (the machine is shared; only side-by-side
ratios mean anything):

* c=1 non-streamed chat: p50/p99 both ways, the latency the gateway adds, and the ratio;
* c=32 and c=128: calls/s both ways and the ratio gateway/direct;
* TTFT (time to the first content chunk) of streamed calls at concurrency 4, in the caller's three
  protocols — OpenAI ``/v1/chat/completions``, Anthropic ``/v1/messages``, Ollama ``/api/chat`` —
  each against a direct OpenAI stream from the fake, alternating call by call.

Across rounds the per-round values are pooled (latencies) or their median taken (calls/s). With
``--redis-ops`` it also counts the Redis commands per gateway call (``INFO commandstats`` deltas over
the c=32 cells). Load driver: ``bench/load.py`` (wrk if installed, else gevent).
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    chat = json.dumps(CHAT).encode()
    extra = dict(kv.split("=", 1) for kv in args.env)
    res: dict[str, Any] = {"lat": {"direct": [], "gateway": []}, "rps": {}, "ttft": {}, "ops": []}
    with FakeProvider() as fake, temporary_directory("bench-users-") as state:
        config = state / "registry.yaml"
        config.write_text(registry(fake.base_url))
        up = Up(state, env={"GATEWAY_CONFIG": str(config), "FAKE_API_KEY": "sk-bench-upstream", **extra})
        try:
            up.wait_ready(120)
            gw_root = f"http://127.0.0.1:{up.api_port}"
            direct_chat = fake.base_url + "/chat/completions"
            gw_chat = gw_root + "/v1/chat/completions"
            import redis

            rurl = embedded_url(state, STORES["redis"])
            rclient = redis.Redis.from_url(rurl) if rurl else None
            for url in (direct_chat, gw_chat):  # warm both paths, unrecorded
                run_load(url, concurrency=8, duration=2, body=chat, driver=args.driver)
            groups = parts(up)
            if args.profile:
                res["profile"] = profile(gw_chat, chat, groups, args)
                return res
            bodies = stream_bodies(args.words)
            direct_stream = bodies["openai"][1]
            for rnd in range(args.rounds):
                for url, who in ((direct_chat, "direct"), (gw_chat, "gateway")):
                    r = run_load(url, concurrency=1, duration=args.duration, body=chat, driver=args.driver)
                    res["lat"][who].append(r)
                for c in args.concurrency:
                    for url, who in ((direct_chat, "direct"), (gw_chat, "gateway")):
                        before = commandstats(rclient) if (rclient and who == "gateway") else None
                        cpu0 = {k: cpu_seconds(v) for k, v in groups.items()}
                        r = run_load(url, concurrency=c, duration=args.duration, body=chat,
                                     driver=args.driver)
                        r["cpu_s"] = {k: cpu_seconds(v) - cpu0[k] for k, v in groups.items()}
                        if before is not None and rclient is not None:
                            after = commandstats(rclient)
                            delta = {k: after[k] - before.get(k, 0) for k in after
                                     if after[k] != before.get(k, 0)}
                            res["ops"].append({"c": c, "requests": r["requests"], "delta": delta})
                        res["rps"].setdefault(f"{who}{c}", []).append(r)
                for proto, (path, body) in bodies.items():
                    d, g = ttft_pairs(fake.base_url, gw_root, path, body, direct_stream, args.ttft_calls, 4)
                    slot = res["ttft"].setdefault(proto, {"direct": [], "gateway": []})
                    slot["direct"] += d
                    slot["gateway"] += g
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            up.proc.terminate()
            try:
                up.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                up.proc.kill()
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
    def pooled(rs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    if "profile" in res:
        return "\n\n".join(f"=== {k}\n{v}" for k, v in res["profile"].items())
    d, g = res["lat"]["direct"], res["lat"]["gateway"]
    cpu_lines: list[str] = []
    dp50, gp50 = pooled(d, "p50_ms"), pooled(g, "p50_ms")
    dp99, gp99 = pooled(d, "p99_ms"), pooled(g, "p99_ms")
    out = [f"`up` vs direct, {args.rounds} interleaved rounds of {args.duration:g} s per cell "
           f"(medians over rounds; driver {d[0]['driver']})", "",
           "| measure | direct | gateway | added | ratio gw/direct | goal |",
           "|---|---:|---:|---:|---:|---|",
           f"| c=1 p50 ms | {dp50:.2f} | {gp50:.2f} | {gp50 - dp50:.2f} | {gp50 / dp50:.2f} | added ≤ 3 |",
           f"| c=1 p99 ms | {dp99:.2f} | {gp99:.2f} | {gp99 - dp99:.2f} | {gp99 / dp99:.2f} | added ≤ 6 |"]
    for c in args.concurrency:
        dr, gr = pooled(res["rps"][f"direct{c}"], "rps"), pooled(res["rps"][f"gateway{c}"], "rps")
        errs = sum(r["errors"] for r in res["rps"][f"gateway{c}"])
        out.append(f"| c={c} calls/s | {dr:.0f} | {gr:.0f} (errors {errs}) | | {gr / dr:.3f} | "
                   f"{'≥ 500' if c == 32 else ''} |")
        runs = res["rps"][f"gateway{c}"]
        n = sum(r["requests"] for r in runs)
        cpu_lines.append(f"c={c}: " + ", ".join(
            f"{k} {1000 * sum(r['cpu_s'][k] for r in runs) / n:.2f}" for k in runs[0]["cpu_s"]))
    for proto, slot in res["ttft"].items():
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            dv, gv = pct(slot["direct"], q) * 1000, pct(slot["gateway"], q) * 1000
            out.append(f"| TTFT {proto} {name} ms (c=4, n={len(slot['gateway'])}) | {dv:.2f} | {gv:.2f} | "
                       f"{gv - dv:.2f} | {gv / dv:.2f} | {'added ≤ 5' if name == 'p50' else ''} |")
    out += ["", "CPU ms per gateway call, by part (gateway cells): " + "; ".join(cpu_lines)]
    if res["ops"]:
        total: dict[str, int] = {}
        calls = 0
        for o in res["ops"]:
            calls += o["requests"]
            for k, v in o["delta"].items():
                total[k] = total.get(k, 0) + v
        per = {k.removeprefix("cmdstat_"): v / calls for k, v in sorted(total.items(), key=lambda kv: -kv[1])}
        out += ["", f"Redis commands per gateway call (c=32/128 cells, {calls} calls): "
                f"{sum(per.values()):.1f} — "
                + ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v >= 0.05)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per cell per round")
    p.add_argument("--concurrency", default="32,128")
    p.add_argument("--ttft-calls", type=int, default=60, help="streamed calls per protocol each way, per round")
    p.add_argument("--words", type=int, default=20)
    p.add_argument("--driver", default="auto")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for `up` (repeatable)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="instead of the table: py-spy the API and the worker under c=32 for SECONDS")
    p.add_argument("--top", type=int, default=22, help="frames per list in --profile")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    res = run(args)
    print(report(res, args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
