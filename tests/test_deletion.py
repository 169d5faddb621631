"""Deletion (spec section 7): forget removes a user everywhere, for every reader; vacuum after
retention removes the bytes from disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lmat_platform.exceptions import LmatError
from lmat_platform.reconstruct import materialize
from lmat_platform.store import compact_buckets, forget_users, forgotten_users, vacuum
from lmat_platform.tenants import Tenant
from lmat_platform.validate import check_uih_commits, delta_log_entries, read_commits
from tests.conftest import SynthStore
from tests.helpers import (
    check_layout,
    ints_in_parquet,
    parquet_files,
    read,
    read_delta,
    run_lmat,
    tier_rows,
)

ALL = Tenant("all", ("item_id", "event_id", "event_ts", "dwell_ms"), 100_000)


def _victim(s: SynthStore) -> int:
    """A user with events in the raw log, the tier, the quarantine and a logged tail."""
    st = s.store
    q = read(st, "quarantine")
    in_q = {u for u in q.column("user_id").to_pylist() if u is not None}
    thin = read_delta(s.thin_log)
    with_tail = set(
        thin.filter(pc.greater(thin.column("tail_len"), 0)).column("user_id").to_pylist()
    )
    in_tier = {r["user_id"] for r in tier_rows(st)}
    cands = sorted(in_q & with_tail & in_tier)
    assert cands, "fixture has no user in every table"
    return cands[0]


def _tail_users(thin: pa.Table) -> set[int]:
    """Users of the events held in streaming tails."""
    return set(pc.list_flatten(thin.column("tail_user_id")).to_pylist())


def _scan(paths: list[str], columns: tuple[str, ...], exclude: str | None = None) -> set[int]:
    found: set[int] = set()
    for p in paths:
        if exclude and f"/{exclude}/" in p:
            continue
        for c in columns:
            found |= ints_in_parquet(p, c)
    return found


def test_forget_removes_the_user_everywhere_and_histories_are_empty(
    synth_store: SynthStore, tmp_path: Path
) -> None:
    s = synth_store
    st = s.store
    u = _victim(s)
    ev_ids = {r["event_id"] for r in read(st, "raw").to_pylist() if r["user_id"] == u}
    n_heads = read(st, "heads").num_rows
    before = {}
    for name, thin in (("log", s.thin_log), ("batch", s.thin_batch)):
        out = str(tmp_path / f"before-{name}.parquet")
        materialize(st, thin, ALL, out)
        before[name] = pq.read_table(out)
    assert (
        pc.sum(
            before["log"].filter(pc.equal(before["log"].column("user_id"), u)).column("length")
        ).as_py()
        > 0
    )

    removed = forget_users(st, [u])
    assert removed["raw"] == len(ev_ids) and removed["uih"] > 0 and removed["quarantine"] > 0
    assert removed["heads"] > 0 and removed[f"thin:{s.thin_log}"] > 0
    assert forgotten_users(st).tolist() == [u]

    for name in ("raw", "quarantine", "uih", "heads"):
        assert u not in read(st, name).column("user_id").to_pylist(), name
    assert read(st, "heads").num_rows == n_heads - removed["heads"]
    assert u not in _tail_users(read_delta(s.thin_log))
    # Other users' tails are untouched; the user's thin rows stay (requests, not events).
    assert _tail_users(read_delta(s.thin_log))
    assert u in read_delta(s.thin_log).column("user_id").to_pylist()
    # Every snapshot: the tier rows of every snapshot id lack the user.
    assert not any(r["user_id"] == u for r in tier_rows(st))
    # ... and the tier keeps its layout (sorted files, row groups, stats) for everyone else.
    check_layout(st)

    for name, thin in (("log", s.thin_log), ("batch", s.thin_batch)):
        out = str(tmp_path / f"after-{name}.parquet")
        materialize(st, thin, ALL, out)  # no O2O error for the forgotten user's pointers
        after = pq.read_table(out)
        mine = after.filter(pc.equal(after.column("user_id"), u))
        assert mine.num_rows > 0
        assert mine.column("length").to_pylist() == [0] * mine.num_rows
        assert all(v == [] for v in mine.column("event_id").to_pylist())
        # Everyone else's histories are exactly as before.
        others = lambda t: t.filter(pc.not_equal(t.column("user_id"), u))  # noqa: E731
        assert others(after).equals(others(before[name]))
    assert check_uih_commits(read_commits(delta_log_entries(st.table_uri("uih")))).ok


def test_vacuum_after_forget_removes_the_bytes_from_disk(synth_store: SynthStore) -> None:
    s = synth_store
    st = s.store
    compact_buckets(st)
    u = _victim(s)
    ev_ids = {r["event_id"] for r in read(st, "raw").to_pylist() if r["user_id"] == u}
    q_ids = {
        r["event_id"]
        for r in read(st, "quarantine").to_pylist()
        if r["user_id"] == u and r["event_id"] is not None
    }
    ids = ev_ids | q_ids
    roots = [s.store_path, str(Path(s.thin_log).parent)]
    files = lambda: [p for r in roots for p in parquet_files(r)]  # noqa: E731
    forget_users(st, [u])
    ev_cols = ("event_id", "tail_event_id")
    user_cols = ("user_id", "tail_user_id")
    # Before vacuum the bytes are still on disk (unreferenced files): the scan can see them.
    assert ids & _scan(files(), ev_cols)
    assert u in _scan(files(), user_cols, exclude="forgotten")
    out = vacuum(st, retention_hours=0)
    assert sum(out.values()) > 0
    # The store's registry of forgotten users keeps the id on purpose, and thin tables keep the
    # user's request rows (user_id); no file keeps any event of the user.
    assert not ids & _scan(files(), ev_cols)
    assert u not in _scan([p for p in files() if "/thin/" not in p], user_cols, exclude="forgotten")
    assert u not in _scan(files(), ("tail_user_id",))
    # Nor does the Delta log: old commits' file statistics (min/max event_id) are expired too.
    logs = [p for t in ("raw", "quarantine", "uih", "heads")
            for p in (Path(s.store_path) / t / "_delta_log").glob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in logs)
    # (Only ids long enough not to occur by chance in other numbers are searched for.)
    long_ids = [i for i in ids if i >= 10**9]
    assert logs and long_ids
    assert not [i for i in long_ids if str(i).encode() in blob]
    # The store still works after vacuum.
    assert read(st, "raw").num_rows > 0


def test_forget_via_cli_with_vacuum(synth_store: SynthStore) -> None:
    s = synth_store
    u = _victim(s)
    r = run_lmat("forget", s.store_path, "--user", str(u), "--user", str(u), "--vacuum")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(r.stdout.strip().splitlines()) == 1
    assert out["users"] == 1 and out["removed"]["raw"] > 0 and out["vacuumed_files"] > 0
    assert u not in _scan(parquet_files(s.store_path), ("user_id",), exclude="forgotten")


def test_forget_needs_a_user(synth_store_ro: SynthStore) -> None:
    with pytest.raises(LmatError, match="--user"):
        forget_users(synth_store_ro.store_path, [])


def test_forget_of_an_unknown_user_changes_no_data(synth_store: SynthStore) -> None:
    st = synth_store.store
    raw = read(st, "raw").num_rows
    removed = forget_users(st, [int(np.iinfo(np.int64).max)])
    assert all(v == 0 for v in removed.values())
    assert read(st, "raw").num_rows == raw
