"""One tiny ``lmat demo``, made the way the README says, shared by the tests that read it.

It is built once per test session (about 10 s) by running the README's ``lmat demo`` line with
``--scale tiny --days 2`` appended, in a fresh folder that has a ``.venv`` link to this
checkout's virtual environment, so the README's ``.venv/bin/...`` commands work there as
written. Tests that only read the demo share it; ``lmat ui`` may add its Dagster files to it
(as it does for a user), which changes no table a reader uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV = Path(sys.executable).parent.parent
TINY = ["--scale", "tiny", "--days", "2"]

#: A fenced block, with the ``<!-- readme-test: MARK (why) -->`` comment just above it if any.
BLOCK = re.compile(
    r"(?:<!--\s*readme-test:\s*(?P<mark>[\w-]+)\s*(?:\((?P<why>[^\n]*)\))?\s*-->\s*\n)?"
    r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    index: int
    line: int
    lang: str
    mark: str | None
    why: str | None
    body: str

    @property
    def id(self) -> str:
        return f"block{self.index}-line{self.line}-{self.lang}"


def readme_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    return [
        Block(i, text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["mark"], m["why"],
              m["body"])
        for i, m in enumerate(BLOCK.finditer(text))
    ]


def runs_demo(b: Block) -> bool:
    """Whether a block runs ``lmat demo`` (not merely mentions it in a comment)."""
    return bool(re.search(r"^[^#\n]*\blmat demo\b", b.body, re.M))


def demo_command() -> str:
    """The README's ``lmat demo`` block (its one command line)."""
    found = [b for b in readme_blocks() if runs_demo(b)]
    assert len(found) == 1, "the README should have exactly one block running `lmat demo`"
    (line,) = [ln for ln in found[0].body.splitlines() if ln.strip() and not ln.startswith("#")]
    return line.strip()


def workdir(path: Path) -> Path:
    """A folder where the README's relative ``.venv/bin/...`` commands find this venv."""
    path.mkdir(parents=True, exist_ok=True)
    link = path / ".venv"
    if not link.exists():
        link.symlink_to(VENV, target_is_directory=True)
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LMAT_")}


@dataclass(frozen=True)
class TinyDemo:
    cwd: Path
    dir: Path
    summary: dict[str, Any]
    stderr: str


_BUILT: dict[str, TinyDemo] = {}


def build_tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> TinyDemo:
    if "demo" not in _BUILT:
        cwd = workdir(tmp_path_factory.mktemp("readme"))
        cmd = f"{demo_command()} {' '.join(TINY)}"
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=clean_env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
        _BUILT["demo"] = TinyDemo(cwd, cwd / "lmat-demo",
                                  json.loads(r.stdout.strip().splitlines()[-1]), r.stderr)
    return _BUILT["demo"]
