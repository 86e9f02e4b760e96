"""A test server run as its own process — ``python -m <module> ... --port 0`` — that prints
``READY <port>`` once it listens (:func:`announce_and_serve`, in the child; :class:`ServerProcess`, in
the parent). The fake upstreams (``tests/fakeprovider.py``, ``tests/fake_native.py``) run this way so
that the gateway under test reaches them over real HTTP."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from typing import Any, Self

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerProcess:
    """Start with :meth:`start` (or ``with``); ``.port`` is known once it is ready."""

    module = ""  # the ``python -m`` module; subclasses set it and :meth:`arguments`

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 20.0,
                 stderr: Any = None, env: dict[str, str] | None = None) -> None:
        self.host = host
        self._requested_port = port
        self.startup_timeout = startup_timeout
        self._stderr = stderr
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    def arguments(self) -> list[str]:
        """Command-line arguments after ``--host``/``--port``."""
        return []

    def start(self) -> Self:
        env = dict(os.environ if self._env is None else self._env)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", self.module, "--host", self.host, "--port", str(self._requested_port),
               *self.arguments()]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        deadline, line = time.monotonic() + self.startup_timeout, b""
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                if line.startswith(b"READY "):
                    self.port = int(line.split()[1])
                    return self
                if not line:
                    break
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.module} did not start (last stdout line {line!r})")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def announce_and_serve(server: Any) -> None:
    """In the child: announce the bound port of a gevent ``WSGIServer`` whose socket is initialised,
    and serve until SIGTERM or SIGINT."""
    import signal

    import gevent

    gevent.signal_handler(signal.SIGTERM, server.stop, 1)
    gevent.signal_handler(signal.SIGINT, server.stop, 1)
    sys.stdout.write(f"READY {server.socket.getsockname()[1]}\n")
    sys.stdout.flush()
    server.serve_forever()
