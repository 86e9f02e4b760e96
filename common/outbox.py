"""An async job's outcome on its way to Postgres: the outbox entry.

When a worker settles an async job while Postgres is unreachable, the row's final columns and the
call's usage row — one unit, written in one transaction — ride on the usage stream (``P:usage``,
field ``j``) in the same Redis step that settles the job's live state (``common/lua/emit.lua``).
Every worker's ``UsageFlusher`` (``workers/usage.py``) moves them to Postgres in batches and acks
them only after the commit. Writing one twice is harmless: the row's update is a no-op once the row
is final, and usage rows are ``ON CONFLICT DO NOTHING`` by ``call_id``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from common.contract import TERMINAL, JobState
from common.errors import InternalError


@dataclass(frozen=True)
class RowOutcome:
    """The final columns of an async job's row (``result`` or ``error``, ``usage``: tokens and cost),
    when it finished, and the usage row of the call that settled it (None: no call reached upstream).
    ``state`` is always terminal."""

    job_id: str
    state: JobState
    finished_at: datetime
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    usage_row: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.state not in TERMINAL:
            raise ValueError(f"an outcome's state must be terminal, not {self.state!r}")

    def to_json(self) -> str:
        data = {**asdict(self), "state": self.state.value, "finished_at": self.finished_at.isoformat()}
        present = {k: v for k, v in data.items() if v is not None}
        return json.dumps(present, separators=(",", ":"), default=str)

    def unstorable(self, reason: str) -> RowOutcome:
        """What the row gets when Postgres refuses this outcome for what it holds (the entry itself is
        parked for an operator): failed, with an error that says why, and nothing of the refused
        columns — so the job never stays open."""
        error = InternalError(f"the job ended but its outcome could not be stored ({reason}); it was kept "
                              "for an operator").to_dict()
        error["code"] = "outcome_unstorable"
        return RowOutcome(self.job_id, JobState.FAILED, self.finished_at, error=error)

    @classmethod
    def parse(cls, raw: str | bytes) -> RowOutcome:
        """The outcome :meth:`to_json` wrote; ValueError (or KeyError/TypeError) for anything else."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("an outcome is a JSON object")
        finished = datetime.fromisoformat(data["finished_at"])
        if finished.tzinfo is None:
            raise ValueError("an outcome's finished_at carries its time zone")
        parts = {name: data.get(name) for name in ("result", "error", "usage", "usage_row")}
        for name, value in parts.items():
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"an outcome's {name} is a JSON object")
        return cls(str(data["job_id"]), JobState(data["state"]), finished, **parts)


def outcome_of(fields: dict[bytes, bytes]) -> RowOutcome | None:
    """The outcome a usage-stream entry carries (field ``j``); None if it carries none. Raises
    ValueError (or KeyError/TypeError) for a ``j`` field that is not one."""
    raw = fields.get(b"j")
    return None if raw is None else RowOutcome.parse(raw)
