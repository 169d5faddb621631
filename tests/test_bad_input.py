"""Bad input, the remaining cases of issue 13: each exits 2 with one line naming the file,
column or argument at fault, and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmat_platform.cli import main
from lmat_platform.store import open_store
from tests.helpers import (
    REPO,
    one_line_error,
    package_without_numba_cache,
    run_main,
    table_versions,
    tree,
    write_events,
)


def _ev(eid: int, arr: int) -> dict[str, int]:
    return {"user_id": 1, "event_id": eid, "event_ts": arr - 5, "arrival_ts": arr,
            "item_id": 3, "action": 1}


@pytest.fixture
def store(tmp_path: Path) -> str:
    root = str(tmp_path / "store")
    assert main(["init", root, "--buckets", "2", "--row-group-rows", "64"]) == 0
    assert main(["ingest", root, write_events(tmp_path / "a.parquet", [_ev(1, 20)])]) == 0
    return root


def _unchanged(root: str) -> tuple[object, object]:
    return table_versions(open_store(root)), tree(root)


def test_nanosecond_timestamps_that_are_not_whole_microseconds(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = pa.timestamp("ns")
    t = pa.table({
        "user_id": pa.array([1, 1], pa.int64()), "event_id": pa.array([7, 8], pa.int64()),
        "event_ts": pa.array([5_000_000, 6_000_001], ns),
        "arrival_ts": pa.array([9_000_000, 9_000_000], ns),
        "item_id": pa.array([1, 2], pa.int64()), "action": pa.array([1, 1], pa.int16()),
    })
    bad = tmp_path / "nanos.parquet"
    pq.write_table(t, bad)
    before = _unchanged(store)
    code, _, err = run_main(capsys, ["ingest", store, str(bad)])
    line = one_line_error(err)
    assert code == 2
    assert "nanos.parquet" in line and "'event_ts'" in line and "6000001" in line, line
    assert _unchanged(store) == before
    # Whole microseconds in nanosecond units are fine.
    ok = t.set_column(2, "event_ts", pa.array([5_000_000, 6_000_000], ns))
    pq.write_table(ok, tmp_path / "whole.parquet")
    code, _, err = run_main(capsys, ["ingest", store, str(tmp_path / "whole.parquet")])
    assert code == 0, err
    raw = open_store(store).read_table("raw")
    assert sorted(raw.column("event_ts").to_pylist()) == [15, 5_000, 6_000]


def test_negative_retention_names_the_argument(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _unchanged(store)
    code, _, err = run_main(capsys, ["vacuum", store, "--retention-hours", "-5"])
    line = one_line_error(err)
    assert code == 2 and "--retention-hours" in line and "-5" in line, line
    assert _unchanged(store) == before


def test_materialize_with_a_file_as_the_thin_table(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - name: t\n    columns: [item_id]\n    max_len: 4\n")
    not_thin = tmp_path / "requests.parquet"
    not_thin.write_bytes(b"not a table")
    before = _unchanged(store)
    out = tmp_path / "out.parquet"
    code, _, err = run_main(capsys, ["materialize", store, str(not_thin), "--tenants",
                                     str(tenants), "--tenant", "t", "--out", str(out)])
    line = one_line_error(err)
    assert code == 2 and "requests.parquet" in line and "not a thin table" in line, line
    assert "internal error" not in line and not out.exists()
    assert _unchanged(store) == before


def _without_write_permission() -> list[str] | None:
    """A command prefix under which the store's permission bits hold (root ignores them
    unless the capabilities that override them are dropped)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_read_only_store(store: str, tmp_path: Path) -> None:
    prefix = _without_write_permission()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    f = write_events(tmp_path / "b.parquet", [_ev(2, 30)])
    os.chmod(f, 0o644)
    before = _unchanged(store)
    for dirpath, _, files in os.walk(store):
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)
    # One process runs every command (an interpreter start is seconds on a loaded machine).
    code = (
        "import contextlib, io, json, sys\n"
        "from lmat_platform.cli import main\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        out.append((main(args), err.getvalue()))\n"
        "print(json.dumps(out))\n"
    )
    runs = [["ingest", store, f], ["snapshot", store, "--watermark", "25"],
            ["forget", store, "--user", "1"], ["info", store]]
    try:
        r = subprocess.run([*prefix, sys.executable, "-c", code, json.dumps(runs)],
                           capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "LMAT_QUIET": "1"})
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout.strip().splitlines()[-1])
        for args, (rc, err) in zip(runs[:-1], results[:-1], strict=True):
            line = one_line_error(err)
            assert rc == 2, (args, err)
            assert store in line and "could not" in line and "read-only" in line, line
        assert results[-1][0] == 0, results[-1][1]  # reading a read-only store still works
    finally:
        for dirpath, _, files in os.walk(store):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
    assert _unchanged(store) == before


def test_unwritable_numba_cache_falls_back_to_a_private_folder(tmp_path: Path) -> None:
    """No writable NUMBA_CACHE_DIR, package __pycache__ or user cache (numba alone raises
    'no locator available' at import): lmat imports, runs and caches under the temp dir."""
    pkg, env = package_without_numba_cache(tmp_path)
    tmp = tmp_path / "tmp"
    code = (
        "import sys, numpy as np\n"
        "from lmat_platform.cli import main\n"
        "import lmat_platform.kernels as k\n"
        "assert k.__file__.startswith(sys.argv[2]), k.__file__\n"
        "assert k.is_sorted3(np.arange(3), np.arange(3), np.arange(3))\n"
        "sys.exit(main(['init', sys.argv[1]]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), str(pkg)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    cached = list((tmp / f"lmat-numba-cache-{os.getuid()}").rglob("*.nbi"))
    assert cached, "the kernel was not cached in the fallback folder"
