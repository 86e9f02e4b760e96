"""Closed-loop HTTP load driver: p50/p90/p99 latency, requests/s, status histogram, and its own CPU cost.

    .venv/bin/python bench/load.py http://127.0.0.1:8080/v1/chat/completions -c 32 -d 10 \\
        --body '{"model":"fake-model","messages":[{"role":"user","content":"hi"}]}' \\
        -H 'Authorization: Bearer bench' [--driver auto|wrk|gevent] [--json]

``-c`` connections each send one request, wait for the whole response, and send the next on the same
keep-alive connection, for ``-d`` seconds. Requests still in flight at the end are not counted (as in
wrk). A non-2xx answer counts as an error (and in the status histogram); so do socket errors and
timeouts.

Drivers:

* ``wrk`` (C, ``apt-get install wrk``): one thread, a Lua script that sets the POST body and counts
  statuses. Cheapest by far — use it whenever it is installed (``auto`` does).
* ``gevent``: pure Python, one greenlet per connection on raw keep-alive sockets. About 10-20x
  more CPU per request than wrk; fine at tens of requests/s, noticeable at thousands.

Both run in a child process, so the driver's CPU time is measured exactly (``os.wait4`` rusage) and
reported as ``driver_cpu_s`` and ``driver_cpu_pct`` (percent of one core over the run). On a 2-core
machine every core-percent the driver uses is taken from the system under test — read the numbers
with that in mind.

From Python::

    from load import run_load       # with bench/ on sys.path
    result = run_load(url, concurrency=32, duration=10, body=b"...", headers={"Authorization": "Bearer x"})
    result["p50_ms"], result["p99_ms"], result["rps"], result["errors"], result["status"]

The module also provides :class:`HttpConnection`, a minimal keep-alive HTTP/1.1 client for gevent
(used by ``bench/held.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit


# ============================================================================ tiny HTTP/1.1 client
class HttpError(Exception):
    pass


class HttpConnection:
    """One keep-alive HTTP/1.1 connection (blocking socket API; cooperative under gevent)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
                self.buf = b""

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise HttpError("connection closed by peer")
        self.buf += data

    def _read_until(self, marker: bytes) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out, self.buf = self.buf[:i], self.buf[i + len(marker):]
                return out
            if len(self.buf) > 1 << 20:
                raise HttpError("header too large")
            self._fill()

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def request(self, raw_request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send a complete, pre-built request; return (status, lower-case headers, body)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(raw_request)
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"bad status line {lines[0]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")  # trailers end (we send no TE: trailers)
                    break
                parts.append(self._read_exact(size))
                self._read_exact(2)
            body = b"".join(parts)
        else:  # read to EOF
            chunks = [self.buf]
            self.buf = b""
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
            body = b"".join(chunks)
            self.close()
            return status, headers, body
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body


def build_request(url: str, body: bytes | None, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise SystemExit("only http:// URLs are supported")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    has_ct = any(k.lower() == "content-type" for k in headers)
    if body is not None:
        if not has_ct:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    return host, port, raw


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


# ============================================================================ gevent driver (child)
def _gevent_main(url: str, concurrency: int, duration: float, body: bytes | None, headers: dict[str, str],
                 timeout: float) -> dict[str, Any]:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    _raise_nofile()
    host, port, raw = build_request(url, body, headers)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    perf = time.perf_counter
    start = perf()
    deadline = start + duration

    def worker() -> None:
        conn = HttpConnection(host, port, timeout)
        try:
            while True:
                t0 = perf()
                if t0 >= deadline:
                    return
                try:
                    status, _, _ = conn.request(raw)
                except TimeoutError:
                    errors["timeout"] += 1
                    conn.close()
                    continue
                except (OSError, HttpError) as exc:
                    errors["connect" if isinstance(exc, ConnectionRefusedError) else "read"] += 1
                    conn.close()
                    gevent.sleep(0.01)
                    continue
                t1 = perf()
                if t1 > deadline:
                    return
                latencies.append(t1 - t0)
                statuses[str(status)] += 1
        finally:
            conn.close()

    workers = [gevent.spawn(worker) for _ in range(concurrency)]
    gevent.sleep(max(0.0, deadline - perf()))
    gevent.killall(workers, timeout=5)
    elapsed = perf() - start
    latencies.sort()
    n = len(latencies)
    non_2xx = sum(v for k, v in statuses.items() if not k.startswith("2"))
    return {
        "driver": "gevent", "requests": n, "elapsed_s": elapsed, "rps": n / elapsed if elapsed else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000, "max_ms": (latencies[-1] * 1000) if n else float("nan"),
        "mean_ms": (sum(latencies) / n * 1000) if n else float("nan"),
        "status": dict(statuses), "socket_errors": dict(errors),
        "errors": non_2xx + sum(errors.values()),
    }


# ============================================================================ wrk driver
_LUA = r"""
wrk.method = "POST"
local f = assert(io.open(%(body_path)s, "rb"))
wrk.body = f:read("*a")
f:close()
%(headers)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local st = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then for k, v in pairs(s) do st[k] = (st[k] or 0) + v end end
  end
  local parts = {}
  for k, v in pairs(st) do table.insert(parts, string.format('"%%d":%%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"errors":{"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d},"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d,"mean":%%f,"status":{%%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    table.concat(parts, ",")))
end
"""


def _lua_str(value: str) -> str:
    out = []
    for b in value.encode():
        ch = chr(b)
        out.append(ch if (ch.isalnum() or ch in " -_/.:;=,+*@") and b < 128 else f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def _wrk_cmd(url: str, concurrency: int, duration: float, body: bytes | None, headers: dict[str, str],
             timeout: float, workdir: str) -> list[str]:
    body_path = os.path.join(workdir, "body")
    with open(body_path, "wb") as fh:
        fh.write(body or b"")
    hdrs = dict(headers)
    if body is not None and not any(k.lower() == "content-type" for k in hdrs):
        hdrs["Content-Type"] = "application/json"
    header_lines = "\n".join(f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in hdrs.items())
    script = _LUA % {"body_path": _lua_str(body_path), "headers": header_lines}
    if body is None:
        script = script.replace('wrk.method = "POST"', 'wrk.method = "GET"')
    script_path = os.path.join(workdir, "script.lua")
    with open(script_path, "w") as fh:
        fh.write(script)
    return ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s", "-s", script_path, url]


def _parse_wrk(stdout: str) -> dict[str, Any]:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{stdout}")
    d = json.loads(line[len("WRKJSON "):])
    elapsed = d["duration_us"] / 1e6
    socket_errors = {k: v for k, v in d["errors"].items() if k != "status" and v}
    status = d["status"]
    non_2xx = sum(v for k, v in status.items() if not k.startswith("2"))
    n = d["requests"]
    return {
        "driver": "wrk", "requests": n, "elapsed_s": elapsed, "rps": n / elapsed if elapsed else 0.0,
        "p50_ms": d["p50"] / 1000, "p90_ms": d["p90"] / 1000, "p99_ms": d["p99"] / 1000,
        "max_ms": d["max"] / 1000, "mean_ms": d["mean"] / 1000,
        "status": status, "socket_errors": socket_errors, "errors": non_2xx + sum(socket_errors.values()),
    }


# ============================================================================ public entry point
def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_load(url: str, *, concurrency: int, duration: float, body: bytes | str | None = None,
             headers: dict[str, str] | None = None, driver: str = "auto",
             timeout: float = 60.0) -> dict[str, Any]:
    """Run one closed-loop load test in a child process and return its measurements (see module doc)."""
    if isinstance(body, str):
        body = body.encode()
    headers = dict(headers or {})
    if driver == "auto":
        driver = "wrk" if have_wrk() else "gevent"
    with tempfile.TemporaryDirectory(prefix="bench-load-") as workdir:
        if driver == "wrk":
            cmd = _wrk_cmd(url, concurrency, duration, body, headers, timeout, workdir)
        elif driver == "gevent":
            spec = {"url": url, "concurrency": concurrency, "duration": duration, "headers": headers,
                    "body": None if body is None else body.decode("latin-1"), "timeout": timeout}
            spec_path = os.path.join(workdir, "spec.json")
            with open(spec_path, "w") as fh:
                json.dump(spec, fh)
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", spec_path]
        else:
            raise ValueError(f"unknown driver {driver!r}")
        out_path = os.path.join(workdir, "out")
        t0 = time.perf_counter()
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            _, wait_status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
        wall = time.perf_counter() - t0
        with open(out_path) as fh:
            stdout = fh.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{driver} driver failed ({proc.returncode}):\n{stdout[-4000:]}")
        if driver == "wrk":
            result = _parse_wrk(stdout)
        else:
            line = next((ln for ln in stdout.splitlines() if ln.startswith("GEVENTJSON ")), None)
            if line is None:
                raise RuntimeError(f"gevent driver printed no result:\n{stdout[-4000:]}")
            result = json.loads(line[len("GEVENTJSON "):])
    cpu = rusage.ru_utime + rusage.ru_stime
    result.update({"url": url, "concurrency": concurrency, "duration_s": duration,
                   "driver_cpu_s": cpu, "driver_cpu_pct": 100.0 * cpu / wall if wall else 0.0,
                   "driver_cpu_us_per_req": (1e6 * cpu / result["requests"]) if result["requests"] else None})
    return result


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def format_result(r: dict[str, Any]) -> str:
    return (f"{r['driver']:6s} c={r['concurrency']:<4d} {r['requests']:>7d} req in {r['elapsed_s']:.1f}s  "
            f"{r['rps']:9.1f} req/s  p50 {r['p50_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms  "
            f"p99 {r['p99_ms']:8.2f} ms  max {r['max_ms']:8.2f} ms  errors {r['errors']} {r['status']} "
            f"{r['socket_errors'] or ''}  driver CPU {r['driver_cpu_pct']:.0f}% of a core")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"]:
        with open(argv[1]) as fh:
            spec = json.load(fh)
        body = None if spec["body"] is None else spec["body"].encode("latin-1")
        res = _gevent_main(spec["url"], spec["concurrency"], spec["duration"], body, spec["headers"],
                           spec["timeout"])
        print("GEVENTJSON " + json.dumps(res), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", help="request body (makes it a POST)")
    body.add_argument("--body-file", help="file with the request body")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("--driver", choices=("auto", "wrk", "gevent"), default="auto")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    data: bytes | None = None
    if args.body is not None:
        data = args.body.encode()
    elif args.body_file:
        with open(args.body_file, "rb") as fh:
            data = fh.read()
    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    res = run_load(args.url, concurrency=args.concurrency, duration=args.duration, body=data, headers=headers,
                   driver=args.driver, timeout=args.timeout)
    print(json.dumps(res, indent=2) if args.json else format_result(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
