"""Concurrent writers on one s3:// store (spec section 11), against a real S3 server on loopback.

Every concurrent command here is a real ``lmat`` process; the server is moto's server mode,
started and stopped by the fixtures in ``tests/s3_server.py``. Leases are short (2 s) so that
a killed writer's lease expires within the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pytest

from lmat_platform.exceptions import ConcurrencyError, LmatError
from lmat_platform.store import ingest_files, init_store, open_store, publish_snapshot
from lmat_platform.store.core import Store
from lmat_platform.store.lease import LEASE_FILE, LeaseInfo, StoreLease, lease_seconds
from lmat_platform.validate import check_uih_commits, delta_log_entries, read_commits
from tests.helpers import REPO, one_line_error, read, tier_rows, write_events

if TYPE_CHECKING:
    from tests.s3_server import S3Server

#: The S3 server fixtures (``s3_server``, ``s3_env``, ``s3_store_uri``).
pytest_plugins = ("tests.s3_server",)

T0 = 1_700_000_000_000_000
SEC = 1_000_000
LEASE_S = 2.0


@pytest.fixture(autouse=True)
def _short_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMAT_LEASE_SECONDS", str(LEASE_S))
    monkeypatch.setenv("LMAT_QUIET", "1")


def _events(path: Path, first_id: int, n: int, *, t: int = T0, n_users: int = 40) -> str:
    rows = [
        {
            "user_id": i % n_users,
            "event_id": i,
            "event_ts": t + (i - first_id) * SEC - SEC,
            "arrival_ts": t + (i - first_id) * SEC,
            "item_id": (i * 7) % 301,
            "action": 1 + i % 3,
        }
        for i in range(first_id, first_id + n)
    ]
    return write_events(path, rows)


def _lmat(*args: str) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("lmat")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmat_platform.cli"]
    return subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )


def _run_together(*commands: tuple[str, ...], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Start every command at once (real processes); their (exit code, stdout, stderr)."""
    procs = [_lmat(*c) for c in commands]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        out.append((p.returncode, so, se))
    return out


def _ids(t: pa.Table) -> list[int]:
    return t.column("event_id").to_pylist() if t.num_rows else []


def _fresh(st: Store) -> Store:
    return open_store(st.root)


def _assert_exactly_once(st: Store, files: dict[str, range]) -> None:
    """Every row of every file accepted exactly once, one ingest record per file."""
    raw = read(st, "raw")
    counts = Counter(_ids(raw))
    twice = sorted(i for i, c in counts.items() if c > 1)
    assert not twice, f"{len(twice)} event ids in the raw log more than once, e.g. {twice[:5]}"
    want = sorted(i for r in files.values() for i in r)
    assert sorted(counts) == want
    records = read(st, "ingests")
    assert records.num_rows == len(files), records.to_pylist()


def _assert_snapshots_exact(st: Store) -> None:
    """Watermarks strictly increase and snapshot k holds exactly the accepted events with
    ``arrival_ts < W_k`` (spec section 3); the tier's history is appends only."""
    snaps = read(st, "snapshots").sort_by("snapshot_id").to_pylist()
    wms = [s["watermark"] for s in snaps]
    assert [s["snapshot_id"] for s in snaps] == list(range(len(snaps)))
    assert all(a < b for a, b in zip(wms, wms[1:], strict=False)), wms
    raw = read(st, "raw")
    ids, arrival = np.asarray(_ids(raw)), raw.column("arrival_ts").to_numpy()
    for k, w in enumerate(wms):
        got = [r["event_id"] for r in tier_rows(st, max_snapshot=k)]
        assert got == sorted(ids[arrival < w].tolist()), f"snapshot {k} (W={w})"
    rep = check_uih_commits(read_commits(delta_log_entries(st.table_uri("uih"))))
    assert rep.ok, rep.problems


def test_server_answers_conditional_writes_as_s3_does(s3_server: S3Server, s3_env: dict) -> None:
    """The lease and delta-rs's commits rely on these answers; one moto release answered 500
    instead of 412 (and 5.1.0 ignored If-Match), so the pinned version is checked here."""
    from botocore.exceptions import ClientError

    c, b = s3_server.client(), s3_env["LMAT_TEST_BUCKET"]

    def status(**kw: str) -> int:
        try:
            r = c.put_object(Bucket=b, Key="k", Body=os.urandom(8), **kw)
        except ClientError as e:
            return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
        return int(r["ResponseMetadata"]["HTTPStatusCode"])

    assert status(IfMatch='"0123"') in (404, 412)  # no object yet
    assert status(IfNoneMatch="*") == 200
    etag = c.head_object(Bucket=b, Key="k")["ETag"]
    assert status(IfNoneMatch="*") == 412
    assert status(IfMatch='"0123"') == 412
    assert status(IfMatch=etag) == 200
    assert status(IfMatch=etag) == 412  # that write changed the ETag


# ---------------------------------------------------------------------- concurrent commands
def test_same_file_three_times_and_another_file_at_once(s3_store_uri: str, tmp_path: Path) -> None:
    """Defect 2 of issue 13: without a lock, two ingests of one file put every row in twice
    (2 of 3 trials; this test failed 2 of 2 runs on that code). Now one writer ingests the file,
    the others find its ingest record, and the other file lands whole beside it."""
    st = init_store(s3_store_uri, n_buckets=4, row_group_rows=64)
    same = _events(tmp_path / "same.parquet", 0, 3000)
    other = _events(tmp_path / "other.parquet", 10_000, 1500, t=T0 + 5000 * SEC)
    res = _run_together(*[("ingest", s3_store_uri, same)] * 3, ("ingest", s3_store_uri, other))
    assert [r[0] for r in res] == [0, 0, 0, 0], [r[2] for r in res]
    accepted = [json.loads(r[1])["accepted"] for r in res]
    assert sorted(accepted[:3]) == [0, 0, 3000] and accepted[3] == 1500, accepted
    _assert_exactly_once(_fresh(st), {same: range(0, 3000), other: range(10_000, 11_500)})


def test_two_inits_at_once_one_store(s3_store_uri: str, s3_env: dict) -> None:
    """Without a conditional create both could succeed, the later one overwriting the first's
    identity; now one creates the store and the other is refused (exit 2, one line). A missing
    bucket is named in one line."""
    res = _run_together(("init", s3_store_uri), ("init", s3_store_uri))
    assert sorted(r[0] for r in res) == [0, 2], [r[2] for r in res]
    created, refused = sorted(res, key=lambda r: r[0])
    assert "a store already exists here" in one_line_error(refused[2])
    assert open_store(s3_store_uri).store_id == json.loads(created[1])["store_id"]
    with pytest.raises(LmatError, match="s3://no-such-bucket-lmat/store/_lmat.json: .*NoSuchBucket"):
        init_store("s3://no-such-bucket-lmat/store")


def test_ingest_and_two_publishes_at_once(s3_store_uri: str, tmp_path: Path) -> None:
    """An ingest and two publishes race. Whatever the order: watermarks strictly increase (a
    publish whose watermark is no longer above the newest is refused: exit 2, one line naming
    ``--watermark``), each snapshot holds exactly the accepted events below its watermark, and
    each late row is either accepted once or quarantined ``behind_watermark`` of a snapshot
    published before it came."""
    st = init_store(s3_store_uri, n_buckets=4, row_group_rows=64)
    first = _events(tmp_path / "first.parquet", 0, 2000)
    ingest_files(st, [first])
    late = _events(tmp_path / "late.parquet", 5000, 1000, t=T0 + 500 * SEC)  # 500 .. 1500 s
    w1, w2 = T0 + 700 * SEC, T0 + 1400 * SEC
    res = _run_together(("snapshot", s3_store_uri, "--watermark", str(w1)),
                        ("snapshot", s3_store_uri, "--watermark", str(w2)),
                        ("ingest", s3_store_uri, late))
    st = _fresh(st)
    published = [s["watermark"] for s in read(st, "snapshots").sort_by("snapshot_id").to_pylist()]
    codes = [r[0] for r in res]
    assert codes[2] == 0, res[2][2]
    if codes[:2] == [0, 0]:
        assert published == [w1, w2]
    else:
        assert codes[:2] == [2, 0], [r[2] for r in res]
        assert published == [w2]
        assert "--watermark" in one_line_error(res[0][2])
    raw, quarantine = read(st, "raw"), read(st, "quarantine")
    counts = Counter(_ids(raw))
    assert max(counts.values()) == 1
    late_ids = set(range(5000, 6000))
    accepted_late, held_back = late_ids & set(counts), set(_ids(quarantine))
    assert accepted_late | held_back == late_ids and not accepted_late & held_back
    assert set(counts) == set(range(0, 2000)) | accepted_late
    if held_back:
        # Held back: exactly the late rows below the newest watermark published before them.
        assert set(quarantine.column("reason").to_pylist()) == {"behind_watermark"}
        assert held_back in ({i for i in late_ids if i - 5000 + 500 < (w - T0) // SEC}
                             for w in published)
    assert read(st, "ingests").num_rows == 2
    _assert_snapshots_exact(st)
    # A later publish still works, and nothing went missing.
    publish_snapshot(st, T0 + 2100 * SEC)
    _assert_snapshots_exact(_fresh(st))


# ---------------------------------------------------------------------- killed and stalled holders
_HOLDER = textwrap.dedent(
    """
    import sys, time
    import pyarrow as pa
    from lmat_platform.store import open_store
    st = open_store(sys.argv[1])
    with st.write_lock():
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
        st.append("probe", pa.table({"x": [1]}), op="probe")  # a commit after the wait
        print("committed", flush=True)
    print("released", flush=True)
    """
)


def _holder(uri: str, hold_s: float) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, uri, str(hold_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "locked":
        p.kill()
        raise AssertionError(f"the lock holder did not start: {p.communicate()[1]}")
    return p


def _lease(s3: S3Server, uri: str) -> LeaseInfo:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    body = s3.client().get_object(Bucket=bucket, Key=f"{key}/{LEASE_FILE}")["Body"].read()
    info = LeaseInfo.from_bytes(body)
    assert info is not None
    return info


def test_killed_writer_lease_expires_and_next_writer_proceeds(
    s3_server: S3Server, s3_store_uri: str, tmp_path: Path
) -> None:
    st = init_store(s3_store_uri, n_buckets=4, row_group_rows=64)
    holder = _holder(s3_store_uri, 600)
    held = _lease(s3_server, s3_store_uri)
    assert not held.released and held.owner.split(":")[1] == str(holder.pid)
    f = _events(tmp_path / "after.parquet", 0, 500)
    waiting = _lmat("ingest", s3_store_uri, f)
    # A live holder keeps renewing: a writer that waits over two lease durations is refused, with
    # one line naming the store and the holder, and the ingest is still waiting.
    with pytest.raises(ConcurrencyError) as e, st.write_lock(timeout_s=2 * LEASE_S + 1):
        pass
    msg = str(e.value)
    assert s3_store_uri in msg and held.owner in msg and "\n" not in msg
    assert _lease(s3_server, s3_store_uri).seq > held.seq  # renewed while we waited
    assert waiting.poll() is None and _fresh(st).open_table("raw") is None

    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert json.loads(out)["accepted"] == 500
    _assert_exactly_once(_fresh(st), {f: range(0, 500)})
    after = _lease(s3_server, s3_store_uri)
    assert after.released and after.owner != held.owner  # the ingest took it over, and let go


def test_stalled_writer_that_lost_its_lease_fails_instead_of_succeeding(
    s3_server: S3Server, s3_store_uri: str
) -> None:
    """A writer stopped (SIGSTOP) for longer than its lease loses it to the next writer; when it
    resumes, its next commit is refused before it lands and it exits with an error."""
    st = init_store(s3_store_uri, n_buckets=4, row_group_rows=64)
    holder = _holder(s3_store_uri, LEASE_S)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        with st.write_lock(timeout_s=30):
            # We hold it now; the stopped writer comes back while we do.
            os.kill(holder.pid, signal.SIGCONT)
            out, err = holder.communicate(timeout=30)
            assert _lease(s3_server, s3_store_uri).owner.split(":")[1] == str(os.getpid())
            assert st.open_table("probe") is None and "committed" not in out
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.communicate()
    assert holder.returncode != 0
    assert "lost the store lease" in err and s3_store_uri in err, err


def test_two_takers_of_one_expired_lease_one_wins(s3_store_uri: str) -> None:
    init_store(s3_store_uri, n_buckets=4, row_group_rows=64)
    dead = StoreLease(s3_store_uri, duration_s=0.2)
    dead.acquire()
    dead._stop.set()  # as if its process died: no more renewals, no release
    dead._thread.join()  # type: ignore[union-attr]
    takers = [StoreLease(s3_store_uri, duration_s=10, timeout_s=6) for _ in range(2)]
    outcome: dict[int, str] = {}

    def take(i: int) -> None:
        try:
            takers[i].acquire()
            outcome[i] = "won"
        except ConcurrencyError:
            outcome[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        assert sorted(outcome.values()) == ["refused", "won"], outcome
        with pytest.raises(ConcurrencyError, match="lost the store lease"):
            dead.check()
    finally:
        for t in takers:
            t.release()


def test_released_lease_is_free_at_once_and_local_stores_take_no_lease(
    s3_store_uri: str, tmp_path: Path
) -> None:
    st = init_store(s3_store_uri, n_buckets=4, row_group_rows=64)
    t = time.monotonic()
    for _ in range(3):
        with st.write_lock(timeout_s=1):
            pass
    assert time.monotonic() - t < 3
    local = init_store(str(tmp_path / "local"))
    with local.write_lock(timeout_s=1):
        assert not (tmp_path / "local" / LEASE_FILE).exists()


def test_bad_lease_settings_and_other_object_stores_are_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMAT_LEASE_SECONDS", "soon")
    with pytest.raises(LmatError, match="LMAT_LEASE_SECONDS='soon'"):
        lease_seconds()
    monkeypatch.setenv("LMAT_LEASE_SECONDS", "0")
    with pytest.raises(LmatError, match="must be > 0"):
        lease_seconds()
    assert lease_seconds(7) == 7.0
    monkeypatch.delenv("LMAT_LEASE_SECONDS")
    assert lease_seconds() == 30.0
    with pytest.raises(LmatError, match="gs://bucket/store: writing needs a store lease"):
        StoreLease("gs://bucket/store")
