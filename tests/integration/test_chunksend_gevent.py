"""The stream relay's chunk sender as the worker runs it: under gevent (a child process with
``monkey.patch_all()``, as the gevent pool has), where a greenlet runs only when the running one blocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

UNDER_GEVENT = """
from gevent import monkey; monkey.patch_all()
import json, sys, time
sys.path.insert(0, {root!r})
from common.contract import Chunk
from workers.chunksend import ChunkSender
log = []
def send(batch):
    log.append("send " + ",".join(c.chunk["t"] for c in batch))
    time.sleep(0.002)  # a Redis round trip: the sender greenlet blocks, the reader runs
def upstream():  # every chunk already buffered: reading one never blocks, so never yields
    for t in ["role", "w0", "w1", "w2", "w3"]:
        log.append("read " + t)
        yield Chunk({{"t": t}})
sender = ChunkSender(send)
for c in upstream():
    sender.put(c, urgent=c.chunk["t"] == "w0")
sender.close()
print(json.dumps(log))
"""


def test_under_gevent_the_first_token_goes_out_before_a_buffered_rest_is_read():
    """In the worker (gevent) a reader that never blocks would starve the sender greenlet: without
    the urgent put the first token went out only after the whole stream was read."""
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", UNDER_GEVENT.format(root=root)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    log = json.loads(out)
    assert log.index("send role,w0") < log.index("read w1")
    assert [e for e in log if e.startswith("send")] == ["send role,w0", "send w1,w2,w3"]
