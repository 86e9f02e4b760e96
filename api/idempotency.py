"""``Idempotency-Key``: a retried POST returns the first outcome instead of running the call twice.

A call sent with the header is *claimed* under ``P:idem:<owner>:<sha256(key)>`` (a Redis string,
``SET NX``, 24 h) before its job is created; the record names the endpoint, the body's fingerprint
and the job id. Once the job settles, its final event is recorded next to it
(``…:outcome``, same TTL). A repeat with the same key finds the record and gets that job back — its
recorded outcome, or it waits on the running job — so the upstream is called and billed once.
The owner is the API key (``anonymous`` while auth is open). Async jobs also keep the key in their
Postgres row (unique per owner), so a repeat after Redis lost the record still finds the job.

Invariants: a key names one endpoint and one body for its 24 h (anything else → 422
:class:`IdempotencyConflict`); a record never points at a job that was not created, except when Redis
failed between the claim and the job's creation and could not be told (then a repeat answers
:class:`OutcomeUnknown`, the honest answer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from common.apikeys import ANONYMOUS
from common.contract import JobEvent, parse_event
from common.errors import IdempotencyConflict, InvalidRequest

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
KEY_TTL_S = 24 * 3600
MAX_KEY_LEN = 255


def validate_key(raw: str | None) -> str | None:
    """The header's value if it is a valid key (1–255 printable ASCII characters), None if absent;
    anything else is a 400."""
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_KEY_LEN or not all(" " <= ch <= "~" for ch in raw):
        raise InvalidRequest(f"the {HEADER} header must be 1 to {MAX_KEY_LEN} printable ASCII characters",
                             param=HEADER)
    return raw


def body_fingerprint(body: Any) -> str:
    """sha256 of the decoded JSON body in canonical form: key order and whitespace do not matter,
    every value does."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class IdemCall:
    """A call sent with an Idempotency-Key: who sent it, to which endpoint, with which body."""

    owner: str
    key: str
    endpoint: str
    body: str  # body_fingerprint

    @staticmethod
    def of(raw_key: str | None, api_key_id: str | None, endpoint: str, body: Any) -> IdemCall | None:
        key = validate_key(raw_key)
        if key is None:
            return None
        return IdemCall(api_key_id or ANONYMOUS, key, endpoint, body_fingerprint(body))

    def row(self) -> tuple[str, str]:
        """What an async job's Postgres row keeps: the key and the body's fingerprint."""
        return self.key, self.body

    def check(self, endpoint: str, body: str) -> None:
        """The first call under this key was to ``endpoint`` with ``body``: a different one is a 422."""
        if endpoint != self.endpoint:
            raise IdempotencyConflict(f"this {HEADER} was already used for {endpoint}; use a new key",
                                      param=HEADER)
        if body != self.body:
            raise IdempotencyConflict(f"this {HEADER} was already used with a different request body; "
                                      "use a new key for a different request", param=HEADER)


@dataclass(frozen=True)
class FirstCall:
    """What the record says about the first call under a key."""

    job_id: str
    outcome: JobEvent | None


class IdemStore:
    """The Redis records. Thread/greenlet-safe (holds only the client)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def record_key(self, call: IdemCall) -> str:
        digest = hashlib.sha256(call.key.encode()).hexdigest()
        return f"{self.prefix}:idem:{call.owner}:{digest}"

    def claim(self, call: IdemCall, job_id: str) -> FirstCall | None:
        """Claim the key for ``job_id``: None if this is the first call (the caller creates the job),
        else the first call's job (422 if it had another endpoint or body)."""
        record = json.dumps({"endpoint": call.endpoint, "body": call.body, "job": job_id})
        for _ in range(3):  # a record that expires between SET NX and GET: claim again
            if self.redis.set(self.record_key(call), record, nx=True, ex=KEY_TTL_S):
                return None
            first = self.first(call)
            if first is not None:
                return first
        raise AssertionError("unreachable: the record neither exists nor can be created")

    def first(self, call: IdemCall) -> FirstCall | None:
        """The first call's job under this key (422 on another endpoint or body), None if none."""
        raw, outcome = self.redis.mget(self.record_key(call), self.record_key(call) + ":outcome")
        if raw is None:
            return None
        data = json.loads(raw)
        call.check(data["endpoint"], data["body"])
        return FirstCall(data["job"], parse_event(json.loads(outcome)) if outcome else None)

    def adopt(self, call: IdemCall, job_id: str) -> None:
        """Point the key at ``job_id`` (found in Postgres after Redis lost the record)."""
        record = json.dumps({"endpoint": call.endpoint, "body": call.body, "job": job_id})
        self.redis.set(self.record_key(call), record, ex=KEY_TTL_S)

    def release(self, call: IdemCall, job_id: str) -> None:
        """The job was not created: free the key, if it is still ``job_id``'s (best effort, logged)."""
        try:
            raw = self.redis.get(self.record_key(call))
            if raw is not None and json.loads(raw)["job"] == job_id:
                self.redis.delete(self.record_key(call))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("job %s: could not free its Idempotency-Key (%s); a repeat answers outcome_unknown",
                        job_id, type(exc).__name__)

    def record(self, call: IdemCall, event: JobEvent) -> None:
        """Keep the job's final event for the key's repeats (best effort, logged: without it a repeat
        still reads the job's event stream while that is kept)."""
        try:
            self.redis.set(self.record_key(call) + ":outcome", event.to_json(), ex=KEY_TTL_S)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("could not record an Idempotency-Key's outcome (%s)", type(exc).__name__)
