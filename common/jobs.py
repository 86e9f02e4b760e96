"""The live half of a job's state, in Redis: its spec, state machine, deadline and event stream.

Keys (``P`` is the settings' key prefix)::

    P:job:<id>          hash   spec, state, deadline, reply_to, timestamps, attempts
    P:job:<id>:events   stream what the worker reports: started, result | error | expired
    P:job:<id>:lease    string the running worker's id, with a TTL it renews (a dead worker's lapses)
    P:reply:<api-id>    pubsub each event is also published to the channel of the API process waiting
    P:lim:wake          pubsub a withdrawn job's id, for the worker holding it in a provider's line

State machine (each arrow is one atomic Lua script, timed with Redis ``TIME``)::

    queued ──claim──► running ──settle──► succeeded | failed
       │                 ▲ └──(lease lapsed: worker died) claim again on redelivery
       ├──claim after deadline──► expired        (the worker never calls upstream)
       └──withdraw──► expired | cancelled        (the API gave up waiting / the client cancelled)

Whoever moves a job out of ``queued`` first wins: a job the API withdrew can never start, and a
job that started is never reported as expired.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import redis

WAKE_CHANNEL_SUFFIX = "lim:wake"  # pubsub: a job id whose waiting worker should try its line again

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
STATES = ("queued", "running", *sorted(TERMINAL))

# KEYS: job, queue   ARGV: spec, max_wait_s, reply_to, ttl_s, mode, message, only_if_missing (1/0)
# Records the job and pushes its queue message in one step: a job is never queued without its
# state, nor recorded without being queued. ``only_if_missing``: leave an existing job alone ('').
_CREATE = """
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'state', 'queued', 'created_at', string.format('%.6f', now),
           'deadline', string.format('%.6f', now + tonumber(ARGV[2])), 'reply_to', ARGV[3],
           'mode', ARGV[5], 'attempts', 0)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[6] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[6]) end
return string.format('%.6f', now)
"""

# KEYS: job, lease   ARGV: worker_id, lease_ttl_ms
# -> {'run', attempt, queued_wait_s, spec, deadline, mode} | {'expired'} | {'busy'} | {'missing'} | {<terminal>}
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if state == 'queued' then
  if now > tonumber(redis.call('HGET', KEYS[1], 'deadline')) then
    redis.call('HSET', KEYS[1], 'state', 'expired', 'finished_at', string.format('%.6f', now))
    return {'expired'}
  end
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', string.format('%.6f', now))
elseif state == 'running' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'busy'} end
else
  return {state}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local job = redis.call('HMGET', KEYS[1], 'created_at', 'spec', 'deadline', 'mode')
return {'run', attempt, string.format('%.6f', now - tonumber(job[1])), job[2], job[3], job[4]}
"""

# KEYS: job   ARGV: new_state (expired|cancelled), job_id, wake channel
#   -> the state the job is in afterwards
# A withdrawn job may be waiting in a provider's line at a worker (common/limits.py): the wake tells
# its worker to take it out of the line now, so that a withdrawn head never holds up the jobs behind.
_WITHDRAW = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return state or 'missing' end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6))
redis.call('PUBLISH', ARGV[3], ARGV[2])
return ARGV[1]
"""

# KEYS: events, job, lease, stats, usage   ARGV: job_id, payload, ttl_ms, final_state ('' = not final),
#                                             worker_id, usage row ('' = none)
# A final event may carry the call's usage row: it joins the usage stream in the same atomic step
# that settles the job, and the ledger moves it to Postgres in batches (workers/usage.py).
# A final event also counts one completion in the provider's 10-second ring of buckets (12 slots):
# the API divides the queue ahead by that rate to give an honest Retry-After.
_EMIT = """
if ARGV[4] ~= '' then
  local state = redis.call('HGET', KEYS[2], 'state')
  if state and state ~= 'running' and state ~= 'queued' then return 0 end
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], 'state', ARGV[4], 'finished_at', string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6))
  if redis.call('GET', KEYS[3]) == ARGV[5] then redis.call('DEL', KEYS[3]) end
  local bucket = math.floor(tonumber(t[1]) / 10)
  local slot = bucket % 12
  if redis.call('HGET', KEYS[4], 't' .. slot) ~= tostring(bucket) then
    redis.call('HSET', KEYS[4], 't' .. slot, bucket, 'c' .. slot, 0)
  end
  redis.call('HINCRBY', KEYS[4], 'c' .. slot, 1)
  redis.call('EXPIRE', KEYS[4], 600)
  if ARGV[6] ~= '' then redis.call('XADD', KEYS[5], '*', 'u', ARGV[6]) end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', 10000, '*', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local reply_to = redis.call('HGET', KEYS[2], 'reply_to')
if reply_to and reply_to ~= '' then
  redis.call('PUBLISH', reply_to, ARGV[1] .. '\\n' .. id .. '\\n' .. ARGV[2])
end
return 1
"""

# KEYS: lease   ARGV: worker_id, ttl_ms   -> 1 if still ours and renewed
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


@dataclass(frozen=True)
class Claim:
    """What a worker may do with a delivered job."""

    outcome: str            # run | expired | busy | missing | succeeded | failed | cancelled
    attempt: int = 0
    queue_wait_s: float = 0.0
    spec: dict[str, Any] | None = None


@dataclass(frozen=True)
class Event:
    stream_id: str
    data: dict[str, Any]


class JobStore:
    """Every Redis operation on jobs. Thread/greenlet-safe: it only holds a connection pool."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._withdraw = client.register_script(_WITHDRAW)
        self._emit = client.register_script(_EMIT)
        self._renew = client.register_script(_RENEW)

    # keys -----------------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lease"

    def reply_channel(self, api_instance: str) -> str:
        return f"{self.prefix}:reply:{api_instance}"

    @property
    def wake_channel(self) -> str:
        return f"{self.prefix}:{WAKE_CHANNEL_SUFFIX}"

    # the API's side -------------------------------------------------------------------------
    def create(self, job_id: str, spec: dict[str, Any], *, max_wait: float, reply_to: str, ttl: float,
               mode: str, queue: str = "", message: str = "", only_if_missing: bool = False) -> float | None:
        """Record a new queued job and (with ``queue``) push its broker ``message`` in the same atomic
        step; returns its creation time (Redis clock, epoch seconds). With ``only_if_missing`` a job
        that exists is left as it is (None): whoever recreated it first wins."""
        created = self._create(keys=[self.job_key(job_id), queue or self.job_key(job_id)],
                               args=[json.dumps(spec, separators=(",", ":")), max_wait, reply_to,
                                     int(ttl) + 1, mode, message, 1 if only_if_missing else 0])
        return float(created) if created else None

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.job_key(job_id)))

    def withdraw(self, job_id: str, new_state: str) -> str:
        """Move a *queued* job to ``new_state`` so that it never runs; returns the resulting state.

        If the job already left ``queued`` (a worker claimed it) it is left alone and its current
        state is returned: the caller then knows the job will run or has run."""
        assert new_state in ("expired", "cancelled")
        return _text(self._withdraw(keys=[self.job_key(job_id)], args=[new_state, job_id, self.wake_channel]))

    def read_events(self, job_id: str, after: str = "0-0") -> list[Event]:
        entries = self.redis.xrange(self.events_key(job_id), min=f"({after}" if after != "0-0" else "-")
        return [Event(_text(sid), json.loads(fields[b"e"])) for sid, fields in entries]

    def abort_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:abort"

    def abort(self, job_id: str) -> str:
        """The caller went away: withdraw the job if it is still queued, else ask its worker to stop
        the upstream call (it checks :meth:`aborted` while relaying). Returns the job's state."""
        state = self.withdraw(job_id, "cancelled")
        if state == "running":
            self.redis.set(self.abort_key(job_id), 1, ex=3600)
        return state

    def aborted(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.abort_key(job_id)))

    def state(self, job_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(self.job_key(job_id))
        return {_text(k): _text(v) for k, v in raw.items() if k != b"spec"}

    # the worker's side ----------------------------------------------------------------------
    def spec(self, job_id: str) -> dict[str, Any] | None:
        """The job's spec as the API wrote it, plus its ``deadline`` (epoch s) and ``mode``."""
        raw, deadline, mode = self.redis.hmget(self.job_key(job_id), "spec", "deadline", "mode")
        if raw is None:
            return None
        spec: dict[str, Any] = json.loads(raw)
        spec["deadline"] = float(deadline)
        spec["mode"] = _text(mode)
        return spec

    def claim(self, job_id: str, worker_id: str, lease_ttl: float) -> Claim:
        """Atomically take a delivered job for running (see the module's state machine)."""
        reply = self._claim(keys=[self.job_key(job_id), self.lease_key(job_id)],
                            args=[worker_id, int(lease_ttl * 1000)])
        outcome = _text(reply[0])
        if outcome == "run":
            spec: dict[str, Any] = json.loads(reply[3])
            spec["deadline"] = float(reply[4])
            spec["mode"] = _text(reply[5])
            return Claim("run", int(reply[1]), float(reply[2]), spec)
        return Claim(outcome)

    def renew_lease(self, job_id: str, worker_id: str, lease_ttl: float) -> bool:
        return bool(self._renew(keys=[self.lease_key(job_id)], args=[worker_id, int(lease_ttl * 1000)]))

    def stats_key(self, provider: str) -> str:
        return f"{self.prefix}:stats:{provider}"

    def completion_rate(self, provider: str, window_s: int = 60) -> float:
        """Jobs per second the provider's workers settled over the last ``window_s`` seconds."""
        raw = {_text(k): int(v) for k, v in self.redis.hgetall(self.stats_key(provider)).items()}
        now_bucket = int(self.redis.time()[0]) // 10
        oldest = now_bucket - window_s // 10
        done = sum(raw.get(f"c{slot}", 0) for slot in range(12) if raw.get(f"t{slot}", -1) >= oldest)
        return done / float(window_s)

    def usage_key(self) -> str:
        return f"{self.prefix}:usage"

    def emit(self, job_id: str, event: dict[str, Any], *, ttl: float, final_state: str = "",
             worker_id: str = "", provider: str = "", usage: dict[str, Any] | None = None) -> bool:
        """Append ``event`` to the job's stream and publish it to the waiting API process.

        With ``final_state`` it also settles the job (and drops our lease) in the same atomic step;
        returns False if the job was already settled, in which case nothing is emitted."""
        payload = json.dumps(event, separators=(",", ":"))
        done = self._emit(keys=[self.events_key(job_id), self.job_key(job_id), self.lease_key(job_id),
                                self.stats_key(provider), self.usage_key()],
                          args=[job_id, payload, int(ttl * 1000), final_state, worker_id,
                                json.dumps(usage, separators=(",", ":"), default=str) if usage else ""])
        return bool(done)


def parse_reply(message: bytes) -> tuple[str, Event]:
    """Decode one pubsub message published by ``_EMIT``: ``job_id\\nstream_id\\npayload``."""
    job_id, stream_id, payload = message.split(b"\n", 2)
    return job_id.decode(), Event(stream_id.decode(), json.loads(payload))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
