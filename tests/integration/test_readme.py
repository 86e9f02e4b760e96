"""Every example in README.md runs exactly as written on a fresh ``llm-gateway up``.

The test starts ``up`` (embedded Redis and Postgres, default settings, no provider credentials) in a
fresh project directory, then runs README.md's ```` ```bash ```` (or ``sh``, ``shell``) and
```` ```python ```` blocks in the order they appear, as a user would type them into one terminal in
that directory:

* **bash** blocks run with ``set -euo pipefail``; variables a block sets are set for the blocks after
  it (``export GATEWAY_KEY=$(llm-gateway keys create …)``, then ``$GATEWAY_KEY``); ``curl`` fails
  the block on an HTTP error status (it runs as ``curl --fail-with-body``); ``llm-gateway`` is this
  checkout's CLI. **python** blocks run with the same environment. A block fails on a non-zero exit,
  or after ``BLOCK_TIMEOUT`` seconds.
* The only change made to a block: ``127.0.0.1:8080`` / ``:5555`` become the ports this ``up`` got
  (runs on a shared machine must not collide).
* An HTML comment on the line before a block changes how it is run (the reason is for readers)::

      <!-- readme-test: skip — installs the package and runs until Ctrl-C -->
      <!-- readme-test: http-errors-ok — shows a 409 on purpose -->

  ``skip``: not run (needs real provider keys or your own servers, installs, runs for ever);
  ``http-errors-ok``: curl's HTTP error statuses do not fail the block. Any other directive is an error.

Blocks in other languages (yaml, plain) are not run. A new block is picked up automatically; a failure
names the block's line, section and language and shows the block and its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.uprun import ROOT, Up, fresh_environment, temporary_directory

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
BLOCK_TIMEOUT = 90.0
#: fence language → how it runs; blocks in any other language (yaml, json, text) are documentation only
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
DIRECTIVES = ("skip", "http-errors-ok")
_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*([\w-]+)")
_SESSION_IGNORED = ("_", "SHLVL", "PWD", "OLDPWD")


@dataclass(frozen=True)
class Block:
    line: int          # of the opening fence
    language: str
    section: str       # the heading above it
    code: str
    directive: str | None

    @property
    def name(self) -> str:
        return f"README.md line {self.line} ({self.language}, under {self.section!r})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced code block of ``text``, with the heading it is under and its directive."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, i = "(top)", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        fence = _FENCE.match(line)
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        directive = _DIRECTIVE.match(before.strip())
        blocks.append(Block(i + 1, fence.group(1), section, "\n".join(lines[i + 1:end]) + "\n",
                            directive.group(1) if directive else None))
        i = end + 1
    return blocks


BLOCKS = [block for block in readme_blocks(README.read_text()) if block.language in RUNNABLE]


SAMPLE = """# Title
text
```bash
echo top
```
## Section one

<!-- readme-test: skip — needs a real key -->
```python
print("skipped")
```
```yaml
a: 1
```
### Sub
<!-- readme-test: http-errors-ok -->

```bash
# a comment inside, not a heading
curl -s http://127.0.0.1:8080/nope
```
"""


def test_the_parser_finds_each_block_its_section_and_directive() -> None:
    found = [(b.line, b.language, b.section, b.directive, b.code) for b in readme_blocks(SAMPLE)]
    assert found == [
        (3, "bash", "Title", None, "echo top\n"),
        (9, "python", "Section one", "skip", 'print("skipped")\n'),
        (12, "yaml", "Section one", None, "a: 1\n"),
        (18, "bash", "Sub", "http-errors-ok", "# a comment inside, not a heading\ncurl -s http://127.0.0.1:8080/nope\n"),
    ]


def test_every_directive_is_known() -> None:
    unknown = [f"{block.name}: {block.directive}" for block in BLOCKS
               if block.directive is not None and block.directive not in DIRECTIVES]
    assert unknown == [], f"unknown readme-test directives (known: {', '.join(DIRECTIVES)}): {unknown}"


def test_the_examples_use_plain_ascii_where_they_are_sent() -> None:
    """A ``…`` pasted into a header or key (``api_key="sk-gw-…"``) makes the SDKs fail before sending."""
    odd = [f"{block.name}: {line.strip()}" for block in BLOCKS if block.directive != "skip"
           for line in block.code.splitlines() if not line.split("#", 1)[0].isascii()]  # comments may
    assert odd == [], f"non-ASCII characters in runnable README code: {odd}"


class Session:
    """One user's terminal next to a running ``up``: a project directory, an environment that
    ``export``s carry from block to block, this checkout's ``llm-gateway`` on the PATH."""

    def __init__(self, project: Path, up: Up) -> None:
        self.project = project
        self.up = up
        bin_dir = project / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "llm-gateway"
        shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m launcher.cli "$@"\n')
        shim.chmod(0o755)
        self.env = fresh_environment()
        self.env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{self.env.get('PATH', '/usr/bin:/bin')}"
        self.env_file = project / "session.env"

    def localise(self, code: str) -> str:
        return (code.replace("127.0.0.1:8080", f"127.0.0.1:{self.up.api_port}")
                .replace("127.0.0.1:5555", f"127.0.0.1:{self.up.flower_port}"))

    def run(self, block: Block) -> subprocess.CompletedProcess[str]:
        code = self.localise(block.code)
        if RUNNABLE[block.language] == "python":
            argv = [sys.executable, "-c", code]
        else:
            fail = "" if block.directive == "http-errors-ok" else "--fail-with-body "
            # set -a: every variable a block sets is exported, so later blocks see it as in one terminal
            script = (f"set -euo pipefail -a\ncurl() {{ command curl {fail}\"$@\"; }}\n{code}\n"
                      f"env -0 > {self.env_file}\n")
            argv = ["bash", "-c", script]
        try:
            result = subprocess.run(argv, cwd=self.project, env=self.env, capture_output=True, text=True,
                                    timeout=BLOCK_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
            return subprocess.CompletedProcess(argv, -1, output or "", f"timed out after {BLOCK_TIMEOUT:g} s")
        if RUNNABLE[block.language] == "bash" and result.returncode == 0:
            self._carry_exports()
        return result

    def _carry_exports(self) -> None:
        pairs = (item.split("=", 1) for item in self.env_file.read_text().split("\0") if "=" in item)
        self.env = {k: v for k, v in pairs if k not in _SESSION_IGNORED}


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    with temporary_directory("gw-readme-") as project:
        up = Up(project / ".state", auth="auto", cwd=project)  # the defaults a fresh install has
        try:
            up.wait_ready()
            yield Session(project, up)
        finally:
            up.kill()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}-{b.language}" for b in BLOCKS])
def test_readme_block(session: Session, block: Block) -> None:
    if block.directive == "skip":
        pytest.skip(f"{block.name} is marked skip")
    result = session.run(block)
    assert result.returncode == 0, (
        f"{block.name} failed with exit code {result.returncode}\n--- block ---\n{block.code}"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
        f"\n--- up (last lines) ---\n{os.linesep.join(session.up.output().splitlines()[-30:])}")
