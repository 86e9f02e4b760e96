"""Where a CLI command finds Redis and Postgres: ``REDIS_URL`` / ``DATABASE_URL``, or else the embedded
servers of a running ``llm-gateway up`` in the same state directory (``GATEWAY_STATE_DIR``).

``up`` starts its embedded servers on random ports with random passwords; each server, once it
answers, leaves a *connection file* next to its data (``<state>/redis/connection.json``,
``<state>/postgres/connection.json``; mode 0600: it holds the password) naming its URL and pid, and
removes it when it stops. :func:`resolve_stores` fills a command's unset URLs from those files — only
while the server they name is alive — or says in one line what to do. Nothing here prints a URL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from common.settings import Settings, normalise_database_url

CONNECTION_FILE = "connection.json"


class StoresNotFound(Exception):
    """A command needs a store whose URL is unset, and no running ``up`` serves one; the message is
    one line telling the operator what to do (never a URL or password)."""


@dataclass(frozen=True)
class Store:
    """One kind of store a command may need: its variable, and where ``up`` keeps its embedded server."""

    variable: str      # the environment variable that names it
    field: str         # the Settings field that holds it
    directory: str     # the embedded server's directory under the state directory
    process: str       # the embedded server's process name (a live pid must be one of these)
    normalise: Callable[[str], str] = str  # as common.settings does to the variable's value

    def url(self, settings: Settings) -> str | None:
        value: str | None = getattr(settings, self.field)
        return value

    def with_url(self, settings: Settings, url: str) -> Settings:
        changes: dict[str, Any] = {self.field: self.normalise(url)}
        return replace(settings, **changes)

    def connection_file(self, state_dir: Path) -> Path:
        return Path(state_dir) / self.directory / CONNECTION_FILE


STORES: Mapping[str, Store] = {
    "redis": Store("REDIS_URL", "redis_url", "redis", "redis-server"),
    "postgres": Store("DATABASE_URL", "database_url", "postgres", "postgres", normalise_database_url),
}


def connection_record(url: str, pid: int, process: str) -> str:
    """The text of a connection file (what an embedded server writes once it answers)."""
    return json.dumps({"url": url, "pid": pid, "process": process}) + "\n"


def embedded_url(state_dir: Path, store: Store) -> str | None:
    """The URL of ``store``'s embedded server in ``state_dir`` if one is running, else None.

    A file left behind by an ``up`` that was killed outright names a dead pid (or one reused by an
    unrelated process, which has another name): both read as "not running".
    Raises :class:`StoresNotFound` if the file exists but is not ours to read."""
    path = store.connection_file(state_dir)
    try:
        record = json.loads(path.read_text())
        url, pid, process = str(record["url"]), int(record["pid"]), str(record["process"])
    except FileNotFoundError:
        return None
    except PermissionError:
        raise StoresNotFound(
            f"cannot read {path.resolve()} (it belongs to the user who ran `llm-gateway up`): run this "
            f"command as that user, or set {store.variable}") from None
    except (ValueError, KeyError, TypeError):
        return None  # torn or foreign: no server can be identified by it
    try:
        server = psutil.Process(pid)
        alive = server.name() == process and server.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        alive = False
    return url if alive else None


def resolve_stores(settings: Settings, needs: Iterable[str]) -> Settings:
    """``settings`` with the URL of every store in ``needs`` (``"redis"``, ``"postgres"``) that the
    environment left unset taken from the running ``up`` of ``settings.state_dir``.

    Guarantees: a URL set in the environment is never replaced; the result has every needed URL, or
    :class:`StoresNotFound` is raised naming the variables still missing and the state directory."""
    missing: list[Store] = []
    for store in (STORES[name] for name in needs):
        if store.url(settings) is not None:
            continue
        url = embedded_url(settings.state_dir, store)
        if url is None:
            missing.append(store)
        else:
            settings = store.with_url(settings, url)
    if missing:
        variables = " and ".join(store.variable for store in missing)
        raise StoresNotFound(
            f"{variables} not set, and `llm-gateway up` is not running with state directory "
            f"{Path(settings.state_dir).resolve()} (GATEWAY_STATE_DIR): start `llm-gateway up` there "
            f"(in another terminal), or set {variables}")
    return settings


def store_environment(base: Mapping[str, str], redis_url: str | None, database_url: str | None
                      ) -> dict[str, str]:
    """``base`` (a process environment) with the store URLs a child process must use."""
    env = dict(base)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env
