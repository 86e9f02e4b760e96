"""Where the gateway's CPU goes under load: py-spy on the API and the worker while the driver runs.

    .venv/bin/pip install py-spy          # a profiling tool only; not a project dependency
    .venv/bin/python bench/profile.py --concurrency 32 --duration 20 [--latency-ms 0] [--top 25]

Starts the same stack as ``bench/overhead.py`` (fake upstream, fresh database, ``llm-gateway api`` and
``llm-gateway worker --provider fake``), drives ``--concurrency`` closed-loop callers at the gateway for
``--duration`` seconds, and meanwhile samples the gunicorn worker process and the Celery worker with
``py-spy record --nonblocking --function --format raw`` (idle time in epoll is not sampled). Prints,
for each process, the functions with the most samples *inclusive* (the function or anything it calls)
and *self* (the function itself), as a share of that process's on-CPU samples, plus the run's
requests/s. The collapsed stacks are kept in ``bench/results/profile-<time>-{api,worker}.txt``
(git-ignored; load them into speedscope or flamegraph.pl for a flame graph).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _stack import AUTH, CHAT_BODY, DEFAULT_REDIS_URL, Stack
from load import format_result, run_load


def summarize(path: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        frames = frames[1:] if frames[0].startswith(("process ", "thread ")) else frames
        total += n
        self_[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return f"(no samples in {path})"

    def short(f: str) -> str:
        root = str(Path(__file__).resolve().parent.parent)
        return f.replace(str(Path(sys.prefix)), "<venv>").replace(root, ".")

    lines = [f"{total} on-CPU samples", "", "inclusive:"]
    lines += [f"  {100 * c / total:5.1f}%  {short(f)}" for f, c in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {100 * c / total:5.1f}%  {short(f)}" for f, c in self_.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--driver", choices=("auto", "wrk", "gevent"), default="auto")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = Path(__file__).resolve().parent / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(latency_ms=args.latency_ms, redis_url=args.redis_url)
    spies: list[subprocess.Popen] = []
    try:
        stack.start()
        run_load(stack.url, concurrency=args.concurrency, duration=2, body=CHAT_BODY, headers=AUTH,
                 driver=args.driver)  # warm-up
        api_procs = stack.api_processes()
        targets = {"api": api_procs[-1].pid, "worker": stack.worker_processes()[0].pid}
        files = {}
        for name, pid in targets.items():
            files[name] = outdir / f"profile-{stamp}-{name}.txt"
            spies.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--rate", str(args.rate), "--nonblocking", "--function",
                 "--format", "raw", "--duration", str(int(args.duration) + 1), "--output", str(files[name])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(1.0)
        result = run_load(stack.url, concurrency=args.concurrency, duration=args.duration, body=CHAT_BODY,
                          headers=AUTH, driver=args.driver)
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=10)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        stack.stop()
    print(format_result(result))
    for name, path in files.items():
        print(f"\n=== {name} (pid {targets[name]}) — {path}")
        print(summarize(path, args.top) if path.exists() else "(py-spy wrote nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
