"""The Lua that owns a job's live state and the limits, kept in ``.lua`` files and read once per process.

Libraries (functions only, no side effects) are prepended to the scripts that use them:

    budget.lua    budgets: check, reserve, settle (release + charge once), alerts; every job script has it,
                  since whatever ends a job settles its budget reservation
    job.lua       the job's state machine: job_check, job_start, job_settle (+ now_ms, stamp)
    line.lua      a provider's line: join, turn (who is head), admit, leave, key blocks, wakes
    permits.lua   the limit kinds (KINDS: check / take / settle per kind) and the loops over scopes

Scripts: create, claim, withdraw, abandon, emit, emit_chunks, renew_lease (common/jobs.py); acquire,
release, leave, renew_permits (common/limits.py); budget_seed (common/budgetstate.py); move
(common/jobs.py: a job that moves to another deployment's queue); breaker (common/routing/breaker.py);
ttft (common/routing/ttft.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script

_HERE = Path(__file__).parent

_LIBRARIES: dict[str, tuple[str, ...]] = {
    "create": ("budget", "job"), "claim": ("budget", "job"), "withdraw": ("budget", "job"),
    "emit": ("budget", "job"), "emit_chunks": (), "renew_lease": (), "abandon": ("budget", "job"),
    "acquire": ("budget", "job", "line", "permits"), "release": ("budget", "job", "line", "permits"),
    "leave": ("budget", "job", "line"), "renew_permits": ("budget", "job"), "budget_seed": ("budget",),
    "breaker": (), "move": ("budget", "job"),
    "ttft": (),
}


@cache
def source(name: str) -> str:
    """The full text of script ``name``: its libraries, then the script itself."""
    parts = [(_HERE / f"{lib}.lua").read_text() for lib in _LIBRARIES[name]]
    return "\n".join([*parts, (_HERE / f"{name}.lua").read_text()])


class LeanScript(Script):
    """A :class:`~redis.commands.core.Script` whose call is one bare ``EVALSHA``, loading the script
    only if Redis lost it (a restart) — what ``Script.__call__`` does, without its per-call wrapping (an
    import, a pipeline check, tuple copies and the ``evalsha`` command method: ~10 µs of a ~80 µs call
    under gevent, ``bench/evalsha_micro.py``). Every script the gateway registers is one, so every
    once-per-call script (create, claim, emit, breaker, ...) takes the lean path; on a pipeline, or
    given another client, it is redis-py's own call."""

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        if client is not None and client is not self.registered_client:
            return super().__call__(keys=keys, args=args, client=client)
        keys, args = keys or [], args or []
        try:
            return self.registered_client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return super().__call__(keys=keys, args=args)


def register(client: redis.Redis, name: str) -> Script:
    return LeanScript(client, source(name))


class ScriptBatch:
    """Scripts (and plain commands) sent in one pipelined round trip, not one trip each.

    A :class:`~redis.commands.core.Script` queued on a redis-py pipeline costs a ``SCRIPT EXISTS``
    round trip before the pipeline goes out; here each script is queued as a bare ``EVALSHA``, and
    one that Redis no longer knows (it restarted and lost its script cache) is run again on its own
    (``Script.__call__`` loads it), after the rest. Not a transaction: each command is its own atomic
    step, in order — but for such a re-run script: use it for steps whose order does not matter.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.pipe = client.pipeline(transaction=False)   # plain commands go straight on it
        self._scripts: dict[int, tuple[Script, list[Any], list[Any]]] = {}

    def script(self, script: Script, keys: list[Any], args: list[Any]) -> int:
        """Queue ``script``; returns the index of its reply in :meth:`execute`'s list."""
        self.pipe.evalsha(script.sha, len(keys), *keys, *args)
        index = len(self.pipe) - 1
        self._scripts[index] = (script, keys, args)
        return index

    def execute(self) -> list[Any]:
        """Send everything; the replies in order. A command's error is its reply (an exception
        instance), not raised; a connection error is raised."""
        replies = list(self.pipe.execute(raise_on_error=False)) if len(self.pipe) else []
        for index, (script, keys, args) in self._scripts.items():
            if isinstance(replies[index], redis.exceptions.NoScriptError):
                try:
                    replies[index] = script(keys=keys, args=args)
                except redis.exceptions.ResponseError as exc:
                    replies[index] = exc
        return replies
