"""The line's hand-offs, against the real Redis: whoever changes a line's head wakes the new head.

Jobs behind the head do not poll (``workers/admission.py``: they re-check only rarely), so every way a
head can leave must publish the next one on ``P:lim:wake``. Each case below builds a line with the
real Lua scripts, makes the head leave one way, and reads what was published.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis

from common.contract import Chunk, Done, Failed, JobSpec, JobState, Kind, Mode, Start
from common.jobs import CHUNK_BATCH, JobStore, parse_reply
from common.limits import Limiter, Scope
from common.registry import Limits
from tests.conftest import TEST_REDIS_URL
from workers.admission import IDLE_RECHECK_S, MAX_RECHECK_S, recheck_after

pytestmark = pytest.mark.integration

PROVIDER = "linetest"
SCOPES = [Scope(PROVIDER, Limits(concurrency=1))]
SPEC = JobSpec(Mode.ASYNC, Kind.CHAT, "m", PROVIDER, {})


@pytest.fixture
def limiter() -> Iterator[Limiter]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    prefix = "gwline-" + secrets.token_hex(4)
    yield Limiter(JobStore(client, prefix))
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


class Line:
    """Jobs in one provider's line, owned by worker processes that are alive unless told otherwise."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.wakes = limiter.redis.pubsub()
        self.wakes.subscribe(limiter.wake_channel)
        self.wakes.get_message(timeout=1)  # the subscribe confirmation
        limiter.heartbeat("alive", 30)

    def add(self, job_id: str, proc: str = "alive", max_wait: float = 30) -> str:
        self.limiter.store.create(job_id, SPEC, max_wait=max_wait, reply_to="", ttl=60)
        return self.acquire(job_id, proc).outcome

    def acquire(self, job_id: str, proc: str = "alive"):
        return self.limiter.acquire(provider=PROVIDER, scopes=SCOPES, job_id=job_id, execution="x",
                                    job_lease_s=10, call_id=f"{job_id}:c", call_lease_s=10, tokens=0, key="k",
                                    weight=1, proc_id=proc)

    def published(self) -> list[str]:
        """Everything published on the wake channel so far. Proof of absence, not a timed wait: a marker
        published now arrives after every earlier message (one channel, one subscriber connection)."""
        marker = "end-" + secrets.token_hex(4)
        self.limiter.redis.publish(self.limiter.wake_channel, marker)
        out: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = self.wakes.get_message(timeout=0.1)
            if message and message["type"] == "message":
                data = bytes(message["data"]).decode()
                if data == marker:
                    return out
                out.append(data)
        raise AssertionError(f"the marker never arrived; got {out}")

    def order(self) -> list[str]:
        return [m.decode() for m in self.limiter.redis.zrange(self.limiter.key(PROVIDER, "line"), 0, -1)]


def test_admission_wakes_the_next_head(limiter):
    line = Line(limiter)
    assert [line.add(j) for j in ("a", "b", "c")] == ["run", "wait", "wait"]
    line.published()
    limiter.release(provider=PROVIDER, scopes=SCOPES, call_id="a:c", tokens=0, actual_tokens=None)
    assert line.published() == ["b"]  # a release wakes the head ...
    assert line.acquire("b").outcome == "run"
    assert line.published() == ["c"]  # ... and its admission wakes the one behind it


def test_withdrawn_head_leaves_at_once_and_wakes_the_next(limiter):
    line = Line(limiter)
    for j in ("a", "b", "c"):
        line.add(j)
    line.published()
    assert limiter.store.withdraw("b", JobState.CANCELLED) == JobState.CANCELLED
    assert line.published() == ["b"]  # its worker hears of it now, not at its next re-check
    assert line.acquire("b").outcome == "gone"
    assert line.order() == ["c"]
    assert line.published() == ["c"]


def test_withdrawn_job_behind_the_head_wakes_nobody_else(limiter):
    line = Line(limiter)
    for j in ("a", "b", "c", "d"):
        line.add(j)
    limiter.store.withdraw("c", JobState.CANCELLED)
    line.published()
    assert line.acquire("c").outcome == "gone"
    assert line.order() == ["b", "d"] and line.published() == []


def test_head_expiring_wakes_the_next(limiter):
    line = Line(limiter)
    line.add("a")
    line.add("b", max_wait=0.2)
    line.add("c")
    time.sleep(0.3)
    line.published()
    assert line.acquire("b").outcome == "expired"
    assert limiter.store.state("b")["state"] == JobState.EXPIRED
    assert line.published() == ["c"]


def test_stale_heads_dropped_by_a_job_behind_wake_the_new_head(limiter):
    line = Line(limiter)
    line.add("a")
    limiter.heartbeat("doomed", 30)
    line.add("b", proc="doomed")
    line.add("c")
    line.add("d")
    limiter.redis.delete(limiter.proc_key("doomed"))  # b's worker died: its heartbeat is gone
    line.published()
    assert line.acquire("d").outcome == "wait"
    assert line.order() == ["c", "d"]
    assert line.published() == ["c"]  # c is now the head and must be told so


def test_leave_from_the_head_wakes_the_next_and_from_behind_nobody(limiter):
    line = Line(limiter)
    for j in ("a", "b", "c", "d"):
        line.add(j)
    line.published()
    limiter.leave(PROVIDER, "c")
    assert line.published() == []
    limiter.leave(PROVIDER, "b")
    assert line.published() == ["d"] and line.order() == ["d"]


class KeyedLine(Line):
    """A line whose jobs also count against their API key's own limits."""

    def __init__(self, limiter: Limiter, key_limits: dict[str, Limits]) -> None:
        super().__init__(limiter)
        self.key_limits = key_limits
        self.keys: dict[str, str] = {}

    def add_for(self, key: str, job_id: str, max_wait: float = 30):
        self.keys[job_id] = key
        self.limiter.store.create(job_id, SPEC, max_wait=max_wait, reply_to="", ttl=60)
        return self.acquire(job_id)

    def scopes(self, job_id: str) -> list[Scope]:
        key = self.keys[job_id]
        return [*SCOPES_WIDE, Scope.of_key(key, self.key_limits[key])]

    def acquire(self, job_id: str, proc: str = "alive"):
        return self.limiter.acquire(provider=PROVIDER, scopes=self.scopes(job_id), job_id=job_id,
                                    execution="x", job_lease_s=10, call_id=f"{job_id}:c", call_lease_s=10,
                                    tokens=10, key=self.keys[job_id], weight=1, proc_id=proc)

    def release(self, job_id: str) -> None:
        self.limiter.release(provider=PROVIDER, scopes=self.scopes(job_id), call_id=f"{job_id}:c",
                             tokens=10, actual_tokens=10)


SCOPES_WIDE = [Scope(PROVIDER, Limits(concurrency=10))]


@pytest.fixture
def keyed_limiter(limiter) -> Limiter:
    return Limiter(limiter.store, keyed=True)


def test_a_key_at_its_concurrency_passes_the_turn_to_the_next_key(keyed_limiter):
    line = KeyedLine(keyed_limiter, {"A": Limits(concurrency=1), "B": Limits(concurrency=1)})
    assert line.add_for("A", "a1").outcome == "run"
    assert line.add_for("A", "a2").outcome == "wait"   # head, but key A has its one call in flight
    # b1 joins behind a2 (the same fair-queue tag, sorting after it) and starts: a2's key is blocked
    assert line.add_for("B", "b1").outcome == "run"
    assert line.order() == ["a2"]                      # a2 kept its place
    line.published()
    line.release("a1")                                 # key A has room again: its block is lifted
    assert line.published() == ["a2"]
    assert line.acquire("a2").outcome == "run"


def test_without_key_limits_a_blocked_head_would_hold_the_line(limiter):
    # the contrast: the same line with the key-blind limiter never lets b1 past a2
    line = KeyedLine(limiter, {"A": Limits(concurrency=1), "B": Limits(concurrency=1)})
    line.add_for("A", "a1")
    line.add_for("A", "a2")
    assert line.add_for("B", "b1").outcome == "wait"
    assert line.order() == ["a2", "b1"]


def test_a_key_out_of_its_daily_requests_is_blocked_until_the_next_utc_day(keyed_limiter):
    line = KeyedLine(keyed_limiter, {"C": Limits(rpd=1), "D": Limits(rpd=1)})
    assert line.add_for("C", "c1").outcome == "run"
    line.release("c1")
    attempt = line.add_for("C", "c2")
    to_midnight_ms = 86_400_000 - int(time.time() * 1000) % 86_400_000
    assert attempt.outcome == "wait" and abs(attempt.wait_ms - to_midnight_ms) < 2000
    assert abs(keyed_limiter.blocked_for(PROVIDER, "C") * 1000 - to_midnight_ms) < 2000
    assert keyed_limiter.blocked_for(PROVIDER, "D") == 0
    assert line.add_for("D", "d1").outcome == "run"    # another key is not held up
    use = keyed_limiter.key_use("C", Limits(rpd=1))
    assert use["requests_today"] == 1 and use["blocked_ms"] > 0


def test_a_refunded_call_gives_its_daily_request_back(keyed_limiter):
    line = KeyedLine(keyed_limiter, {"E": Limits(rpd=1, tpd=100)})
    assert line.add_for("E", "e1").outcome == "run"
    # the upstream answered 429: it did no work
    keyed_limiter.release(provider=PROVIDER, scopes=line.scopes("e1"), call_id="e1:c", tokens=10,
                          actual_tokens=None, refund=True)
    use = keyed_limiter.key_use("E", Limits(rpd=1, tpd=100))
    assert use["requests_today"] == 0 and use["tokens_today"] == 0
    assert line.add_for("E", "e2").outcome == "run"


def test_a_call_larger_than_a_keys_daily_tokens_is_refused_naming_the_key(keyed_limiter):
    line = KeyedLine(keyed_limiter, {"F": Limits(tpd=5)})
    attempt = line.add_for("F", "f1")
    assert attempt.outcome == "too_large"
    assert attempt.detail == "the 5 tokens per day your API key's quota allows"


@pytest.mark.parametrize(("rank", "low", "high"), [
    (0, IDLE_RECHECK_S * 0.8, IDLE_RECHECK_S * 1.2),
    (9, IDLE_RECHECK_S * 0.8, IDLE_RECHECK_S * 1.2),
    (10, 2 * IDLE_RECHECK_S * 0.8, 2 * IDLE_RECHECK_S * 1.2),
    (55, 6 * IDLE_RECHECK_S * 0.8, 6 * IDLE_RECHECK_S * 1.2),
    (5000, MAX_RECHECK_S * 0.8, MAX_RECHECK_S * 1.2),
])
def test_recheck_interval_grows_with_rank(rank, low, high):
    values = [recheck_after(rank) for _ in range(200)]
    assert low <= min(values) and max(values) <= high
    assert max(values) - min(values) > 0.1 * low  # jittered: jobs that joined together spread out


WINDOW_CASES = [
    # (id, starts in the window (s before now), rpm, jobs ahead, expected seconds, or None)
    ("room for all: the window does not hold them", [-50, -40], 4, 1, None),
    ("full window: the oldest start frees first", [-50, -40, -30, -20], 4, 0, 10),
    ("full window: the third to free", [-50, -40, -30, -20], 4, 2, 30),
    ("a window later", [-50, -40, -30, -20], 4, 5, 80),
    ("past the free slots, then the window's", [-50, -40], 4, 3, 20),
    ("past every current start: the slots used now", [-50, -40], 4, 4, 60),
]


@pytest.mark.parametrize(("starts", "rpm", "ahead", "expected"), [c[1:] for c in WINDOW_CASES],
                         ids=[c[0] for c in WINDOW_CASES])
def test_retry_after_under_an_rpm_window_counts_slots_not_rate(limiter, starts, rpm, ahead, expected):
    seconds, micros = limiter.redis.time()
    now_ms = seconds * 1000 + micros // 1000
    window = {f"c{i}": now_ms + s * 1000 for i, s in enumerate(starts)}
    limiter.redis.zadd(limiter.key(PROVIDER, "rpm"), window)
    got = limiter.window_start_in(PROVIDER, rpm, ahead)
    assert got == expected if expected is None else abs(got - expected) < 0.5


def test_the_plain_claim_and_the_admission_start_a_job_the_same_way(limiter):
    """Both run job.lua's job_check + job_start: same state, attempt, lease; a second try is refused."""
    store = limiter.store
    limiter.heartbeat("alive", 30)
    for job_id in ("plain", "admitted"):
        store.create(job_id, SPEC, max_wait=30, reply_to="", ttl=60)
    claim = store.claim("plain", "exec-1", 10)
    attempt = Line(limiter).acquire("admitted")
    expected_spec = replace(SPEC, deadline=claim.spec.deadline)
    assert (claim.outcome, claim.attempt, claim.spec) == (Start.RUN, 1, expected_spec)
    assert (attempt.outcome, attempt.attempt) == (Start.RUN, 1)
    for job_id, execution in (("plain", "exec-1"), ("admitted", "x")):
        state = store.state(job_id)
        assert (state["state"], state["attempts"]) == (JobState.RUNNING, "1") and "started_at" in state
        assert store.redis.get(store.lease_key(job_id)).decode() == execution
    assert store.claim("plain", "exec-2", 10).outcome is Start.BUSY      # its lease is alive
    assert Line(limiter).acquire("admitted").detail == Start.BUSY


def test_events_cross_redis_as_the_contract_types(limiter):
    store = limiter.store
    store.create("ev", SPEC, max_wait=30, reply_to="", ttl=60)
    store.claim("ev", "exec", 10)
    sent = [Chunk({"choices": [{"delta": {"content": "a"}}]}),
            Done({"provider": PROVIDER}, {"total_tokens": 3})]
    store.emit("ev", sent[0])
    assert store.emit("ev", sent[1], final_state=JobState.SUCCEEDED, execution="exec", provider=PROVIDER)
    assert [e.event for e in store.read_events("ev")] == sent
    assert store.state("ev")["state"] == JobState.SUCCEEDED and not store.redis.exists(store.lease_key("ev"))
    assert not store.emit("ev", Failed({"message": "late"}), final_state=JobState.FAILED)  # settled once


@pytest.mark.parametrize("new_state", [JobState.EXPIRED, JobState.CANCELLED], ids=["expired", "cancelled"])
def test_withdraw_reports_the_state_the_job_is_in(limiter, new_state):
    store = limiter.store
    store.create("w", SPEC, max_wait=30, reply_to="", ttl=60)
    assert store.withdraw("w", new_state) is new_state
    assert store.withdraw("w", JobState.CANCELLED) is new_state     # the first withdrawal won
    assert store.withdraw("never-created", new_state) is Start.MISSING


def test_creating_a_sync_job_renews_its_callers_heartbeat(limiter):
    """A Redis that lost the API's heartbeat (restart, wipe) must not get fresh sync jobs cancelled as
    orphaned: creating the job proves its caller alive."""
    store = limiter.store
    channel = store.reply_channel("api-x")
    assert not store.redis.exists(store.alive_key(channel))
    store.create("alive-1", replace(SPEC, mode=Mode.SYNC), max_wait=30, reply_to=channel, ttl=60)
    assert store.redis.pttl(store.alive_key(channel)) > 10_000
    assert store.claim("alive-1", "exec", 10).outcome is Start.RUN


def test_a_streams_chunks_sent_together_arrive_in_order_in_one_message(limiter):
    """emit_chunks (the stream relay's coalesced send): every chunk on the job's stream, in order, and
    each batch as ONE message on its caller's channel carrying the same stream ids; the job still
    running — only a final event settles it. The final event comes after them, as emit.lua's message."""
    store = limiter.store
    channel = store.reply_channel("api-chunks")
    store.create("ch", SPEC, max_wait=30, reply_to=channel, ttl=60)
    store.claim("ch", "exec", 10)
    sent = [Chunk({"choices": [{"delta": {"content": f"w{i}\n"}}]}, {"provider": "p"} if i == 0 else None)
            for i in range(5)]
    with store.redis.pubsub() as sub:
        sub.subscribe(channel)
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        store.emit_chunks("ch", sent[:1])
        store.emit_chunks("ch", sent[1:])
        store.emit("ch", Done({}), final_state=JobState.SUCCEEDED, execution="exec")
        published = [parse_reply(sub.get_message(timeout=5)["data"]) for _ in range(3)]
    stored = store.read_events("ch")
    assert [e.event for e in stored] == [*sent, Done({})]
    assert [job_id for job_id, _ in published] == ["ch"] * 3
    assert [[e.event for e in events] for _, events in published] == [sent[:1], sent[1:], [Done({})]]
    assert [e for _, events in published for e in events] == stored   # same ids: a resync dedupes
    assert store.state("ch")["state"] == JobState.SUCCEEDED


def test_a_late_reader_catches_up_from_the_stream_after_a_batch(limiter):
    """A caller that was not subscribed when a batch went out reads it from the job's stream, in
    order, and reads on after the last id it saw."""
    store = limiter.store
    store.create("late", SPEC, max_wait=30, reply_to=store.reply_channel("api-late"), ttl=60)
    store.claim("late", "exec", 10)
    sent = [Chunk({"choices": [{"delta": {"content": f"w{i}"}}]}) for i in range(4)]
    store.emit_chunks("late", sent[:3])
    first = store.read_events("late")
    store.emit_chunks("late", sent[3:])
    assert [e.event for e in first] == sent[:3]
    assert [e.event for e in store.read_events("late", first[-1].stream_id)] == sent[3:]


def test_a_batch_longer_than_one_script_call_goes_in_several_messages_in_order(limiter):
    """emit_chunks caps one script call at CHUNK_BATCH chunks (no one call holds Redis long); the
    order holds across the calls."""
    store = limiter.store
    channel = store.reply_channel("api-long")
    store.create("long", SPEC, max_wait=30, reply_to=channel, ttl=60)
    sent = [Chunk({"choices": [{"delta": {"content": f"w{i}"}}]}) for i in range(2 * CHUNK_BATCH + 1)]
    with store.redis.pubsub() as sub:
        sub.subscribe(channel)
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        store.emit_chunks("long", sent)
        published = [parse_reply(sub.get_message(timeout=5)["data"])[1] for _ in range(3)]
    assert [len(events) for events in published] == [CHUNK_BATCH, CHUNK_BATCH, 1]
    assert [e.event for events in published for e in events] == sent
    assert [e.event for e in store.read_events("long")] == sent
