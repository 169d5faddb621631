"""Small builders and readers shared by the store, protocol and CLI tests.

Everything here is independent of the code under test where it matters: :func:`naive_history`
is a second, plain-Python statement of spec sections 4 and 6 that the library's outputs (and the
library's own reference) are checked against.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.store.core import TABLES, Store, delta_dataset
from lmat_platform.tenants import Tenant

REQUIRED = ("user_id", "event_id", "event_ts", "arrival_ts", "item_id", "action")
EVENT_TYPES: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "event_id": pa.int64(),
    "event_ts": pa.int64(),
    "arrival_ts": pa.int64(),
    "item_id": pa.int64(),
    "action": pa.int16(),
}
#: Trait types used by the tests' generated events.
TRAIT_TYPES: dict[str, pa.DataType] = {
    "dwell_ms": pa.float32(),
    "surface": pa.int16(),
    "src": pa.int16(),
    "row_no": pa.int32(),
}
HOUR_US = 3_600 * 1_000_000
REPO = Path(__file__).resolve().parent.parent


def events_table(rows: Sequence[Mapping[str, Any]], *, traits: Sequence[str] = ()) -> pa.Table:
    """An event table with the spec's types from dict rows (missing keys and None are null)."""
    cols = {}
    for c, t in {**EVENT_TYPES, **{k: TRAIT_TYPES[k] for k in traits}}.items():
        cols[c] = pa.array([r.get(c) for r in rows], t)
    return pa.table(cols)


def write_events(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], *, traits: Sequence[str] = ()
) -> str:
    pq.write_table(events_table(rows, traits=traits), str(path))
    return str(path)


def requests_table(rows: Sequence[Mapping[str, Any]], **extra: pa.DataType) -> pa.Table:
    cols = {
        "request_id": pa.array([r["request_id"] for r in rows], pa.int64()),
        "user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
        "request_ts": pa.array([r["request_ts"] for r in rows], pa.int64()),
    }
    for c, t in extra.items():
        cols[c] = pa.array([r.get(c) for r in rows], t)
    return pa.table(cols)


def read(store: Store, name: str) -> pa.Table:
    """A store table at its latest version (empty table if never written)."""
    t = store.read_table(name)
    return t if t is not None else pa.table({})


def table_versions(store: Store) -> dict[str, int | None]:
    """Delta version of every store table (None: not created yet)."""
    out: dict[str, int | None] = {}
    for name in TABLES:
        dt = store.open_table(name)
        out[name] = dt.version() if dt is not None else None
    return out


def tree(root: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Every file under ``root`` with its size (the store's lock file excluded)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            if rel != "_lock":
                out.append((rel, os.path.getsize(p)))
    return sorted(out)


def delta_version(uri: str) -> int | None:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri).version()
    except TableNotFoundError:
        return None


def read_delta(uri: str) -> pa.Table:
    from deltalake import DeltaTable

    return delta_dataset(DeltaTable(uri)).to_table()


def sorted_rows(table: pa.Table, key: Sequence[str] = ("event_id",)) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in key))


def tier_rows(
    store: Store, *, max_snapshot: int | None = None, version: int | None = None
) -> list[dict[str, Any]]:
    """Rows of the UIH tier (optionally at a Delta version), those of snapshots <= k, sorted."""
    dt = store.open_table("uih", version=version)
    if dt is None:
        return []
    t = delta_dataset(dt).to_table()
    if max_snapshot is not None:
        t = t.filter(pa.array(t.column("snapshot_id").to_numpy() <= max_snapshot))
    return sorted_rows(t)


def parquet_files(root: str | os.PathLike[str]) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*.parquet"))


def ints_in_parquet(path: str, column: str) -> set[int]:
    """Every value of a column named ``column`` anywhere in a Parquet file, nested ones too."""
    t = pq.read_table(path)
    found: set[int] = set()

    def walk(arr: pa.Array, name: str) -> None:
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            walk(arr.flatten(), name)
        elif pa.types.is_struct(arr.type):
            for i, f in enumerate(arr.type):
                walk(arr.field(i), f.name)
        elif name == column and pa.types.is_integer(arr.type):
            found.update(v for v in arr.to_pylist() if v is not None)

    for name in t.column_names:
        walk(t.column(name).combine_chunks(), name)
    return found


def naive_history(
    events: Iterable[Mapping[str, Any]], user: int, T: int, tenant: Tenant
) -> dict[str, list[Any]]:
    """Spec 4 and 6 in plain Python: H(u, T), then actions, window, last L, columns."""
    h = [e for e in events if e["user_id"] == user and e["arrival_ts"] < T]
    h.sort(key=lambda e: (e["event_ts"], e["event_id"]))
    if tenant.actions is not None:
        h = [e for e in h if e["action"] in tenant.actions]
    if tenant.window_days is not None:
        w = round(tenant.window_days * 86_400 * 1_000_000)
        h = [e for e in h if e["event_ts"] >= T - w]
    h = h[len(h) - tenant.max_len :] if len(h) > tenant.max_len else h
    return {c: [e.get(c) for e in h] for c in tenant.columns}


def expected_outputs(
    events: Sequence[Mapping[str, Any]], requests: Sequence[Mapping[str, Any]], tenant: Tenant
) -> dict[int, dict[str, Any]]:
    by_user: dict[int, list[Mapping[str, Any]]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e)
    out = {}
    for r in requests:
        seq = naive_history(by_user.get(r["user_id"], []), r["user_id"], r["request_ts"], tenant)
        n = len(next(iter(seq.values()))) if seq else 0
        out[r["request_id"]] = {
            "user_id": r["user_id"],
            "request_ts": r["request_ts"],
            "length": n,
            **seq,
        }
    return out


def assert_matches(got: pa.Table, want: dict[int, dict[str, Any]], *, label: str) -> None:
    """``got`` (``lmat materialize`` format, or fat rows) equals the naive outputs exactly."""
    rows = {r["request_id"]: r for r in got.to_pylist()}
    assert sorted(rows) == sorted(want), f"{label}: request ids differ"
    for rid, w in want.items():
        g = rows[rid]
        for c, v in w.items():
            assert g[c] == v, f"{label}: request {rid} column {c!r}: got {g[c]!r}, want {v!r}"


def run_lmat(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``lmat`` command (as a real process, to see exit code and stderr)."""
    exe = Path(sys.executable).with_name("lmat")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmat_platform.cli"]
    full_env = {**os.environ, "LMAT_QUIET": "1", **(env or {})}
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )


def run_main(capsys: Any, args: Sequence[str]) -> tuple[int, str, str]:
    """``lmat ARGS`` in process: (exit code, stdout, stderr)."""
    from lmat_platform.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argument errors exit from the parser, as the console script does
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(stderr: str) -> str:
    """The single error line of a failed command (asserts there is exactly one, no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr!r}"
    assert lines[0].startswith("lmat: error:"), lines[0]
    return lines[0]


def uih_users_by_bucket(store: Store) -> dict[int, np.ndarray]:
    """user_ids per bucket partition of the live tier files."""
    from lmat_platform.store import uih

    dt = store.open_table("uih")
    assert dt is not None
    fs, root = store.filesystem()
    out: dict[int, list[np.ndarray]] = {}
    for f in uih.list_files(dt):
        t = pq.read_table(f"{root}/uih/{f.path}", columns=["user_id"])
        out.setdefault(f.bucket, []).append(t.column("user_id").to_numpy())
    return {b: np.concatenate(v) for b, v in out.items()}


def assert_sorted(t: pa.Table) -> None:
    from lmat_platform.store.uih import SORT_KEYS

    keys = list(zip(*(t.column(c).to_pylist() for c in SORT_KEYS), strict=True))
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


def check_layout(store: Store) -> list:
    """Every live tier file: in its bucket's partition, sorted, in row groups with statistics."""
    from lmat_platform.hashing import bucket_of
    from lmat_platform.store import uih

    dt = store.open_table("uih")
    assert dt is not None
    assert list(dt.metadata().partition_columns) == ["bucket"]
    files = uih.list_files(dt)
    fs, root = store.filesystem()
    for f in files:
        assert f.path.startswith(f"bucket={f.bucket}/")
        pf = pq.ParquetFile(f"{root}/uih/{f.path}")
        t = pf.read()
        assert_sorted(t)
        assert t.num_rows == f.rows
        # The partition value is the user's bucket for every row.
        assert set(bucket_of(t.column("user_id").to_numpy(), store.n_buckets).tolist()) == {
            f.bucket
        }
        md = pf.metadata
        names = md.schema.to_arrow_schema().names
        assert md.num_row_groups == -(-t.num_rows // store.config.row_group_rows)
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            assert rg.num_rows <= store.config.row_group_rows
            for c in ("user_id", "event_ts", "event_id", "snapshot_id"):
                stats = rg.column(names.index(c)).statistics
                assert stats is not None and stats.has_min_max, (f.path, g, c)
            chunk = t.slice(sum(md.row_group(i).num_rows for i in range(g)), rg.num_rows)
            su = rg.column(names.index("user_id")).statistics
            assert (su.min, su.max) == (
                chunk.column("user_id")[0].as_py(),
                chunk.column("user_id")[-1].as_py(),
            )
        # File-level statistics in the Delta log let readers skip files by time and snapshot.
        assert f.min_ts == min(t.column("event_ts").to_pylist())
        assert f.max_ts == max(t.column("event_ts").to_pylist())
        assert f.max_snapshot == max(t.column("snapshot_id").to_pylist())
    return files


def package_without_numba_cache(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A copy of ``lmat_platform`` under ``tmp/pkg`` and an environment in which numba has no
    writable cache folder of its own (NUMBA_CACHE_DIR, every ``__pycache__`` beside the modules
    and the user cache are blocked by files; numba alone raises 'no locator available'). The
    temp dir is ``tmp/tmp``, where lmat's fallback folder goes."""
    import shutil

    pkg = tmp / "pkg"
    shutil.copytree(REPO / "lmat_platform", pkg / "lmat_platform",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d in [pkg / "lmat_platform", *(p for p in (pkg / "lmat_platform").rglob("*") if p.is_dir())]:
        (d / "__pycache__").write_text("a file where a folder would go")
    blocker = tmp / "blocker"
    blocker.write_text("")
    (tmp / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(pkg), "NUMBA_CACHE_DIR": str(blocker / "numba"),
           "HOME": str(blocker), "XDG_CACHE_HOME": str(blocker), "TMPDIR": str(tmp / "tmp"),
           "LMAT_QUIET": "1"}
    return pkg, env
