"""Every code block of README.md works when pasted as is (issue 14).

Blocks are found by their fences. ``bash`` blocks run with ``bash -euo pipefail`` and ``python``
blocks are saved to a file and run with ``.venv/bin/python FILE``, both in a folder that holds a
tiny ``lmat demo`` (see ``demo_fixtures``) and a ``.venv`` link to this environment, as a reader
of the README would have after its first two commands. ``text`` blocks are pictures and ``yaml``
blocks must parse as tenants.

A comment on the line just above a block's fence changes how it is run:

- ``<!-- readme-test: skip (reason) -->``: never run (installs, serves until Ctrl-C, runs the
  whole suite, benchmarks that take minutes); the reason is required.
- ``<!-- readme-test: slow (reason) -->``: run as written only by ``pytest -m slow`` (the
  ``lmat demo`` line: the default run builds the same demo with ``--scale tiny`` appended).

Also here: the reader snippet's two failure modes named by the loader (issue 14): a script
without ``if __name__ == "__main__":`` and code piped to ``python -``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmat_platform.tenants import parse_tenants
from tests.demo_fixtures import (
    VENV,
    Block,
    TinyDemo,
    build_tiny_demo,
    clean_env,
    demo_command,
    readme_blocks,
    runs_demo,
    workdir,
)

BLOCKS = readme_blocks()
LANGS = {"bash", "python", "text", "yaml"}
RUN = [b for b in BLOCKS if b.lang in ("bash", "python") and b.mark is None]
SLOW = [b for b in BLOCKS if b.mark == "slow"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> TinyDemo:
    return build_tiny_demo(tmp_path_factory)


def run_block(b: Block, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    path = cwd / f"readme_{b.id}.{'py' if b.lang == 'python' else 'sh'}"
    path.write_text(b.body)
    cmd = (
        [str(VENV / "bin" / "python"), path.name]
        if b.lang == "python"
        else ["bash", "-euo", "pipefail", path.name]
    )
    return subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_blocks_are_tagged_and_markers_are_known() -> None:
    assert len(BLOCKS) >= 6
    for b in BLOCKS:
        assert b.lang in LANGS, f"README line {b.line}: fence needs a language ({sorted(LANGS)})"
        assert b.mark in (None, "skip", "slow"), f"README line {b.line}: unknown mark {b.mark}"
        if b.mark == "skip":
            assert b.why and b.why.strip(), f"README line {b.line}: a skip needs its reason"
    # What the README asks a newcomer to run is run: the demo, the CLI and the reader snippet.
    assert [b.mark for b in BLOCKS if runs_demo(b)] == ["slow"]
    assert any(b.lang == "python" and "SequenceLoader" in b.body for b in RUN)
    assert any(b.lang == "bash" and "lmat materialize" in b.body for b in RUN)
    # The contract is linked inside the repository, not beside it.
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "](docs/spec.md" in text and "../shared" not in text


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block_runs_as_written(block: Block, demo: TinyDemo) -> None:
    r = run_block(block, demo.cwd)
    assert r.returncode == 0, f"README line {block.line}:\n{block.body}\n{r.stderr[-3000:]}"
    if block.lang == "python" and "SequenceLoader" in block.body:
        # The snippet reads every request of the batch path once.
        n = demo.summary["requests"]
        assert r.stdout.startswith(f"{n} requests, "), r.stdout


def test_yaml_blocks_are_tenants() -> None:
    for b in (b for b in BLOCKS if b.lang == "yaml"):
        import yaml

        assert parse_tenants(yaml.safe_load(b.body))


@pytest.mark.slow
@pytest.mark.parametrize("block", SLOW, ids=[b.id for b in SLOW])
def test_slow_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    """The README's `lmat demo` line exactly as written (about a minute), then the default
    blocks against what it made."""
    cwd = workdir(tmp_path)
    r = run_block(block, cwd, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    if runs_demo(block):
        assert json.loads(r.stdout.strip().splitlines()[-1])["parity_ok"] is True
        for b in RUN:
            got = run_block(b, cwd)
            assert got.returncode == 0, f"README line {b.line}:\n{got.stderr[-3000:]}"


def test_the_markers_the_readme_names_select_tests() -> None:
    """`pytest -m slow` and `pytest -m bench` (named in the README) each select real tests; the
    modules carrying each marker are counted from the source, without collecting the suite."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    tests = Path(__file__).resolve().parent
    for mark in ("slow", "bench"):
        assert f"pytest -m {mark}" in text
        users = [p.name for p in sorted(tests.glob("test_*.py"))
                 if re.search(rf"pytest\.mark\.{mark}\b", p.read_text())]
        assert users, f"no test is marked {mark}, so `pytest -m {mark}` selects nothing"


def test_demo_command_is_the_readme_line() -> None:
    assert demo_command() == ".venv/bin/lmat demo"


# ---------------------------------------------------------------- the snippet's failure modes


def _unguarded(demo: TinyDemo) -> str:
    (snippet,) = [b for b in RUN if b.lang == "python" and "SequenceLoader" in b.body]
    body = snippet.body.replace('if __name__ == "__main__":\n', "if True:\n")
    assert body != snippet.body
    return body


def test_unguarded_script_with_workers_names_cause_and_fix(demo: TinyDemo) -> None:
    path = demo.cwd / "unguarded.py"
    path.write_text(_unguarded(demo))
    r = subprocess.run([sys.executable, path.name], cwd=demo.cwd, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lmat_platform.reader.errors.ReaderWorkerError"), r.stderr[-3000:]
    assert "import" in last and 'if __name__ == "__main__":' in last, last
    assert str(path) in last, last


def test_snippet_piped_to_python_names_cause_and_fix(demo: TinyDemo) -> None:
    r = subprocess.run([sys.executable, "-"], input=_unguarded(demo), cwd=demo.cwd,
                       env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lmat_platform.reader.errors.ReaderWorkerError"), r.stderr[-3000:]
    assert "'<stdin>'" in last and "python -" in last and "__main__" in last, last
    assert "FileNotFoundError" not in r.stderr
