"""The worker's stream relay alone: CPU of the relaying process and of Redis per streamed call.

    .venv/bin/python bench/stream_relay.py --baseline ../main --rounds 4

Each side is a child process (gevent-patched, as the worker's pool is) that imports the relay of its
checkout (``workers/relay.py`` → ``workers/chunksend.py`` → ``JobStore.emit_chunks``) and relays
``--streams`` streams of ``--words`` words at ``--concurrency`` from ``tests/fakeprovider.py`` (0 ms)
into the machine's Redis, with a subscriber on the reply channel (``redis-cli``) so every publish is
delivered. No Celery, API or Flower: what a change to the relay does to its own cost, without their
noise. Sides alternate which goes first, round by round; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
from gevent import monkey; monkey.patch_all()
import json, resource, secrets, sys, time
root, base, n, conc, words = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, root)
import redis, requests
from gevent.pool import Pool
from common.contract import JobSpec, Mode
from common.jobs import JobStore
from common.registry import Model, Provider
from common.types import ChatRequest
from workers.adapters.openai import OpenAIAdapter
from workers.relay import relay_stream

class Observer:
    def first_token(self, job_id, model): pass

provider = Provider(name="fake", kind="openai", base_url=base, api_key="sk-bench")
adapter = OpenAIAdapter(provider, requests.Session())
model = Model(alias="fake-model", provider="fake", model="fake-model")
client = redis.Redis()
store = JobStore(client, "streamrelay" + secrets.token_hex(3))
content = " ".join(f"w{i}" for i in range(words))
request = ChatRequest.model_validate({"model": "fake-model", "stream": True,
                                      "messages": [{"role": "user", "content": content}]})
spec = JobSpec.of(request, mode=Mode.SYNC, model="fake-model", provider="fake", api_key_id=None)

def one(i):
    store.create(f"j{i}", spec, max_wait=30, reply_to=store.reply_channel("bench"), ttl=60)
    relay_stream(store, Observer(), f"j{i}", adapter, request, model, on_first=lambda ms: None)

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def redis_cpu():
    c = client.info("cpu")
    return c["used_cpu_user"] + c["used_cpu_sys"]

def commands():
    return sum(v["calls"] for v in client.info("commandstats").values())

for i in range(20):
    one(-i - 1)   # warm: connections, scripts
c0, r0, k0 = cpu(), redis_cpu(), commands()
Pool(conc).map(one, range(n))
c1, r1, k1 = cpu(), redis_cpu(), commands()
print(json.dumps({"relay_cpu_ms": (c1 - c0) / n * 1000, "redis_cpu_ms": (r1 - r0) / n * 1000,
                  "redis_commands": (k1 - k0 - 2) / n}))   # (the two INFO calls)
for key in client.scan_iter(store.prefix + ":*"):
    client.delete(key)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="another checkout to measure the same way (e.g. main)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--words", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from tests.fakeprovider import FakeProvider

    sides = {"this": str(HERE.parent)}
    if args.baseline:
        sides["baseline"] = str(Path(args.baseline).resolve())
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    subscriber = subprocess.Popen(["redis-cli", "psubscribe", "streamrelay*"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    try:
        with FakeProvider() as fake:
            for round_ in range(args.rounds):
                order = list(sides.items()) if round_ % 2 else list(reversed(sides.items()))
                for name, root in order:
                    out = subprocess.run([sys.executable, "-c", CHILD, root, fake.base_url, str(args.streams),
                                          str(args.concurrency), str(args.words)],
                                         capture_output=True, text=True, cwd=root, check=True)
                    results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        subscriber.terminate()
    print("| side | relay CPU ms per stream | Redis CPU ms per stream | Redis commands per stream |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        cells = [statistics.median(r[k] for r in rows)
                 for k in ("relay_cpu_ms", "redis_cpu_ms", "redis_commands")]
        print(f"| {name} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.1f} |")


if __name__ == "__main__":
    main()
