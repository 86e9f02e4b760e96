"""``llm-gateway up``: the whole gateway on one machine, supervised by one process.

What it does, in order: start embedded Redis/PostgreSQL for whichever of ``REDIS_URL`` /
``DATABASE_URL`` is unset; run ``llm-gateway migrate``; start the API, one worker per routable
provider and Flower — each a ``python -m launcher.cli ...`` child, exactly what an operator would
run by hand, in its own session/process group so that a Ctrl-C in the terminal reaches only this
process, which then stops the children (SIGTERM, SIGKILL of the group after a grace period)
*before* the servers they use. Children's output is forwarded line by line with their name in
front. If any child or embedded server exits on its own, everything is stopped and ``up`` exits
non-zero: a half-running gateway (an API whose workers are gone) is worse than a stopped one.

Everything runs in the main thread around one ``select``: children's pipes, and a wakeup pipe
written by the signal handlers (which only record the signal). No threads means the
``preexec_fn`` that ties each child's life to ours is safe to use.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Self, TextIO

from common.observability.metrics import prepare_metrics_dir
from common.settings import Settings
from launcher.discovery import store_environment
from launcher.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    die_with_parent,
    redact_url,
)
from launcher.embedded_postgres import start_embedded_postgres
from launcher.embedded_redis import start_embedded_redis

#: How much longer than the drain time (``GATEWAY_DRAIN_TIMEOUT``) children get to stop after SIGTERM
#: before their process groups are SIGKILLed: the API's ``--graceful-timeout`` is the drain time + 2 s
#: and a worker exits at its drain time (``workers/shutdown.py``), so both finish their orderly stop first.
STOP_MARGIN_S = 4.0
#: How long ``up`` waits for ``GET /health`` to answer before saying so (it keeps running).
HEALTH_WAIT = 60.0
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_up(settings: Settings, host: str | None, port: int | None) -> int:
    """Run the gateway until Ctrl-C/SIGTERM (exit 0) or until a part of it fails (exit 1).

    ``host``/``port`` override where the API listens (default: ``settings.api_host/api_port``).
    """
    api_host = host or settings.api_host
    api_port = port or settings.api_port
    console = _Console(sys.stdout)
    with _SignalWatch() as signals, contextlib.ExitStack() as cleanup:
        try:
            return _run(settings, api_host, api_port, console, signals, cleanup)
        except EmbeddedServerError as exc:
            console.say(f"error: {exc}")
            return 1
    raise AssertionError("unreachable")  # pragma: no cover - mypy cannot see that `with` returns


def _run(settings: Settings, api_host: str, api_port: int, console: _Console, signals: _SignalWatch,
         cleanup: contextlib.ExitStack) -> int:
    if api_port == settings.flower_port:
        problem: str | None = (f"the API and Flower cannot both use port {api_port} "
                               "(GATEWAY_PORT / GATEWAY_FLOWER_PORT)")
    else:
        problem = (_port_problem(api_host, api_port, "API")
                   or _port_problem("127.0.0.1", settings.flower_port, "Flower"))
    if problem:
        console.say(f"error: {problem}")
        return 1

    embedded: list[EmbeddedServer] = []
    urls: list[str] = []
    stores = (("redis:   ", settings.redis_url, "REDIS_URL", start_embedded_redis),
              ("postgres:", settings.database_url, "DATABASE_URL", start_embedded_postgres))
    for label, given, variable, start in stores:
        if given is None:
            server = start(settings.state_dir)
            cleanup.callback(_stop_embedded, server, console)
            embedded.append(server)
            urls.append(server.url)
            console.say(f"{label} embedded {server.name} on {server.display_url} (pid {server.pid}, "
                        f"ready in {server.startup_seconds:.2f} s, data {server.data_dir}, "
                        f"log {server.log_path})")
        else:
            urls.append(given)
            console.say(f"{label} {variable} {redact_url(given)}")
        if signals.received:
            return _interrupted(signals, console)
    redis_url, database_url = urls

    providers = settings.routable_providers()
    children = _Children(console, signals, _metrics_environment(settings, _child_environment(redis_url,
                                                                                          database_url)),
                         names=["migrate", "api", "flower", *(f"worker-{name}" for name in providers)],
                         stop_grace=settings.drain_timeout + STOP_MARGIN_S)
    cleanup.callback(children.stop_all)  # LIFO: runs before the embedded servers are stopped

    migrate = children.spawn("migrate", ["migrate"])
    code = children.wait(migrate)
    if code is None:
        return _interrupted(signals, console)  # stop_all() ends the migration
    if code != 0:
        console.say(f"error: `llm-gateway migrate` failed with {_describe_exit(code)}; "
                    "not starting the gateway")
        return 1

    children.spawn("api", ["api", "--host", api_host, "--port", str(api_port)])
    for name in providers:
        children.spawn(f"worker-{name}", ["worker", "--provider", name])
    children.spawn("flower", ["flower", "--port", str(settings.flower_port)])

    base = f"http://{_connectable(api_host)}:{api_port}"
    listening = f"  (listening on {api_host})" if api_host != _connectable(api_host) else ""
    console.say(f"API:      {base}/v1{listening}")
    console.say(f"health:   {base}/health")
    console.say(f"Flower:   http://127.0.0.1:{settings.flower_port}")
    for name, provider in settings.registry.providers.items():
        if provider.routable:
            console.say(f"provider: {name} is routable (worker-{name} consumes {settings.queue_for(name)})")
        else:
            console.say(f"provider: {name} is NOT routable: {provider.unroutable_reason}")
    if not providers:
        console.say("warning: no provider is routable; every call will get 503 until one is configured")
    finds = ("finds the embedded servers by itself" if len(embedded) == len(stores)
             else "needs the same REDIS_URL/DATABASE_URL")
    console.say(f"next:     in another terminal here, `llm-gateway keys create --name me` makes an API key "
                f"(every llm-gateway command {finds})")
    console.say("Ctrl-C stops everything")
    return children.watch(embedded, f"{base}/health")


def _metrics_environment(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """Every child writes its metrics to one directory (PROMETHEUS_MULTIPROC_DIR, default
    ``<state dir>/metrics``), emptied now: the API's /metrics shows the API's and the workers' samples
    of this run."""
    path = settings.observability.metrics_dir or settings.state_dir / "metrics"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(prepare_metrics_dir(path).resolve())
    return env


def _child_environment(redis_url: str, database_url: str) -> dict[str, str]:
    """The children's environment: ours (the only place the launcher reads ``os.environ``; the
    children's own settings are parsed from it by ``common.settings``) plus the URLs they must use."""
    env = store_environment(os.environ, redis_url, database_url)
    env["PYTHONUNBUFFERED"] = "1"  # their output is forwarded line by line; don't hold it in buffers
    return env


def _interrupted(signals: _SignalWatch, console: _Console) -> int:
    console.say(f"received {signal.Signals(signals.received[0]).name}: stopping")
    return 0


def _stop_embedded(server: EmbeddedServer, console: _Console) -> None:
    console.say(f"stopping embedded {server.name} (pid {server.pid})")
    server.stop()


# --------------------------------------------------------------------------------------------------
# children


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    partial: bytearray = field(default_factory=bytearray)
    reported: bool = False


class _Children:
    """The app processes: spawn, forward their output, watch them, stop them."""

    def __init__(self, console: _Console, signals: _SignalWatch, env: Mapping[str, str],
                 names: list[str], stop_grace: float) -> None:
        self._console = console
        self._stop_grace = stop_grace
        self._signals = signals
        self._env = dict(env)
        self._width = max(len(name) for name in names)
        self._children: list[_Child] = []
        self._selector = selectors.DefaultSelector()
        self._selector.register(signals.wakeup_fd, selectors.EVENT_READ, None)

    def spawn(self, name: str, args: list[str]) -> _Child:
        process = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", *args], env=self._env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509 - no threads here
        child = _Child(name, process)
        self._children.append(child)
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        self._selector.register(process.stdout, selectors.EVENT_READ, child)
        return child

    def wait(self, child: _Child) -> int | None:
        """Wait for a child that is meant to finish (migrate): its exit code, or None if a
        signal asked us to stop first."""
        while not self._signals.received:
            code = child.process.poll()
            if code is not None:
                child.reported = True
                self._drain(child, 2.0)  # its last words
                return code
            self.pump(0.25)
        return None

    def _drain(self, child: _Child, timeout: float) -> None:
        """Forward output until ``child``'s pipe is closed (or ``timeout``)."""
        assert child.process.stdout is not None
        deadline = time.monotonic() + timeout
        while not child.process.stdout.closed and time.monotonic() < deadline:
            self.pump(0.1)

    def watch(self, embedded: list[EmbeddedServer], health_url: str) -> int:
        """Run until a signal (0) or until a child or embedded server exits on its own (1)."""
        started = time.monotonic()
        next_probe: float | None = started + 0.5
        while True:
            self.pump(0.25)
            if self._signals.received:
                return _interrupted(self._signals, self._console)
            for child in self._children:
                code = child.process.poll()
                if code is not None and not child.reported:
                    child.reported = True
                    self._console.say(f"error: {child.name} exited unexpectedly with {_describe_exit(code)}; "
                                      "stopping everything")
                    return 1
            for server in embedded:
                code = server.poll()
                if code is not None:
                    self._console.say(f"error: embedded {server.name} exited unexpectedly with "
                                      f"{_describe_exit(code)} (log {server.log_path}); stopping everything")
                    return 1
            if next_probe is not None and time.monotonic() >= next_probe:
                answer = _probe(health_url)
                if answer is not None:
                    self._console.say(f"ready:    GET /health answered {answer}")
                    next_probe = None
                elif time.monotonic() - started > HEALTH_WAIT:
                    self._console.say(f"warning: {health_url} has not answered in {HEALTH_WAIT:.0f} s")
                    next_probe = None
                else:
                    next_probe = time.monotonic() + 0.5

    def pump(self, timeout: float) -> None:
        """Forward whatever the children wrote, waiting up to ``timeout`` for something to happen
        (output, or a signal: its handler writes to the wakeup pipe)."""
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._signals.drain_wakeup()
                continue
            child: _Child = key.data
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not data:  # EOF: the child (and everything that inherited its pipe) is gone
                self._selector.unregister(key.fileobj)
                if child.partial:
                    self._emit(child, bytes(child.partial))
                    child.partial.clear()
                assert child.process.stdout is not None
                child.process.stdout.close()
                continue
            child.partial += data
            *lines, rest = child.partial.split(b"\n")
            if lines:  # every line of one read in one write: a write per line costs a call each
                self._console.say("\n".join(self._labelled(child, line) for line in lines))
            child.partial = bytearray(rest)

    def _emit(self, child: _Child, line: bytes | bytearray) -> None:
        self._console.say(self._labelled(child, line))

    def _labelled(self, child: _Child, line: bytes | bytearray) -> str:
        text = line.decode("utf-8", errors="replace").rstrip("\r")
        return f"{child.name:>{self._width}} | {text}"

    def stop_all(self) -> None:
        """SIGTERM every running child; SIGKILL the process group of any still running after the stop
        grace (the drain time + ``STOP_MARGIN_S``; at once on a second Ctrl-C). Keeps forwarding their
        output meanwhile: a child blocked on a full pipe could not exit."""
        running = [child for child in self._children if child.process.poll() is None]
        signals_before = len(self._signals.received)
        if running:
            drain = self._stop_grace - STOP_MARGIN_S
            self._console.say(f"stopping {', '.join(c.name for c in running)} (SIGTERM: running calls and "
                              f"held callers get up to {drain:g} s; SIGKILL after {self._stop_grace:g} s, "
                              "or now on another Ctrl-C)")
        for child in running:
            with contextlib.suppress(ProcessLookupError):  # exited since poll(); not reaped, still signalable
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_grace
        while (any(child.process.poll() is None for child in running) and time.monotonic() < deadline
               and len(self._signals.received) == signals_before):
            self.pump(0.1)
        forced = len(self._signals.received) != signals_before
        for child in running:
            if child.process.poll() is None:  # unreaped, so its group id is still its own
                why = "stop requested again" if forced else f"still running after {self._stop_grace:g} s"
                self._console.say(f"{child.name}: {why}: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        drain_until = time.monotonic() + 1.0
        while len(self._selector.get_map()) > 1 and time.monotonic() < drain_until:
            self.pump(0.1)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:  # a grandchild still holds the pipe open: stop listening
                self._selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:  # a signal number Python has no name for
        return f"signal {-code}"


def _probe(url: str) -> str | None:
    """``"<status> <body status>"`` if the API answered at all (a 503 "degraded" is an answer),
    None if it is not listening yet."""
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None  # connection refused/reset or timed out: not up yet
    try:
        summary = json.loads(body).get("status", "")
    except (ValueError, AttributeError):
        summary = ""
    return f"{status} {summary}".strip()


def _connectable(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _port_problem(host: str, port: int, what: str) -> str | None:
    """Why ``what`` could not listen on host:port, or None: checked up front, so a taken port is
    one clear line instead of a child's traceback after the databases have started."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{what}: cannot resolve host {host!r}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is fine
        try:
            sock.bind(address)
        except OSError as exc:
            return f"{what}: cannot listen on {host}:{port}: {exc.strerror}"
    return None


# --------------------------------------------------------------------------------------------------
# terminal and signals


class _Console:
    """Where ``up`` talks. If the terminal goes away (SIGHUP, a closed pipe), output stops but
    the shutdown it is part of carries on: losing the messages must not leave processes behind."""

    def __init__(self, stream: TextIO) -> None:
        self._stream: TextIO | None = stream

    def say(self, text: str) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except OSError:  # EPIPE/EIO: nobody is reading any more; keep supervising silently
            self._stream = None


class _SignalWatch:
    """Record SIGINT/SIGTERM/SIGHUP instead of raising, and wake the ``select`` loop via a pipe.

    Why not KeyboardInterrupt: an exception can land anywhere, e.g. between a child's fork and
    the line that records it, and that child would never be stopped.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1

    @property
    def wakeup_fd(self) -> int:
        return self._read_fd

    def drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def __enter__(self) -> Self:
        for sig in _HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        os.close(self._read_fd)
        os.close(self._write_fd)

