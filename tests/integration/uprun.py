"""``llm-gateway up`` run by a test, as an operator runs it: on embedded servers in a throw-away state
directory, on free ports (tests/integration/test_embedded.py, test_readme.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from launcher.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
#: what the machine's environment may hold that a fresh install would not have
_NOT_FRESH = ("REDIS_URL", "DATABASE_URL", "OLLAMA_HOST", "PYTHONPATH")


def fresh_environment() -> dict[str, str]:
    """This process's environment without store URLs, provider credentials or gateway settings."""
    return {k: v for k, v in os.environ.items() if k not in _NOT_FRESH and not k.startswith("GATEWAY_")
            and not k.endswith(("_API_KEY", "_BASE_URL"))}


@contextmanager
def temporary_directory(prefix: str) -> Iterator[Path]:
    """A directory in the system temp dir, mode 0755: run as root, PostgreSQL runs as an unprivileged
    account that must be able to enter it — pytest's own ``tmp_path`` lives under
    ``/tmp/pytest-of-root`` (0700), which that account cannot."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Up:
    """``llm-gateway up`` on embedded servers in ``state_dir``, on free ports, output in a file; run
    from ``cwd`` (this checkout's code either way), with none of the machine's store URLs, provider
    credentials or gateway settings: what a fresh install sees."""

    def __init__(self, state_dir: Path, auth: str = "off", cwd: Path = ROOT,
                 env: dict[str, str] | None = None) -> None:
        self.api_port, self.flower_port = free_port(), free_port()
        env = {**fresh_environment(), **(env or {})}
        env.update(GATEWAY_STATE_DIR=str(state_dir), GATEWAY_PORT=str(self.api_port),
                   GATEWAY_FLOWER_PORT=str(self.flower_port), GATEWAY_AUTH=auth, PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(ROOT))
        state_dir.mkdir(exist_ok=True)
        self.log = state_dir / "up.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "up"], cwd=cwd, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.tree: list[psutil.Process] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "\nready:" not in self.output():
            assert self.proc.poll() is None, f"`up` exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"`up` not ready in {timeout} s:\n{self.output()}"
            time.sleep(0.1)
        self.tree = psutil.Process(self.proc.pid).children(recursive=True)

    def child(self, fragment: str) -> psutil.Process:
        return next(p for p in psutil.Process(self.proc.pid).children() if fragment in " ".join(p.cmdline()))

    def assert_all_gone(self) -> None:
        alive = [p for p in self.tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"left running: {alive}\n{self.output()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for proc in self.tree:
            if proc.is_running():
                proc.kill()
