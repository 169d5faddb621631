"""The Ray write path (issue 15, item 5): ingest, publish (tier and head summaries), compaction
and thin-row writing with ``engine=RayEngine`` write the same tables as the local engine, row for
row: on a Ray instance of the test process, on an ``s3://`` store (moto on loopback), and on a
local cluster of two nodes (loopback, slow). A writer killed at each of its commits under the Ray
engine, then re-run, leaves what a clean run leaves (the crash harness's checks)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray")


from deltalake import DeltaTable  # noqa: E402

from lmat_platform.engines import RayEngine  # noqa: E402
from lmat_platform.engines.cluster import loopback_cluster, processes_of, stop_leftovers  # noqa: E402
from lmat_platform.protocol import write_thin  # noqa: E402
from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot  # noqa: E402
from lmat_platform.store.core import TABLES, delta_dataset, storage_options  # noqa: E402
from lmat_platform.store.uih import list_files  # noqa: E402
from tests.helpers import read  # noqa: E402

pytest_plugins = ("tests.s3_server",)

HOUR = 3_600_000_000


_HERE: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left() -> Iterator[None]:
    """Whatever Ray this module's tests started in this process is shut down at its end."""
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    yield
    _stop_here()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old


@pytest.fixture
def ray_here() -> str:
    """A Ray instance of this process (2 CPUs), started once for the module (again after the
    two-node test, which connects this process to its cluster); its GCS address."""
    import ray

    if not (ray.is_initialized() and "gcs" in _HERE):
        _stop_here()
        tmp = _HERE["tmp"] = tempfile.mkdtemp(prefix="r", dir="/tmp")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
        _HERE["gcs"] = ray.get_runtime_context().gcs_address
    return _HERE["gcs"]


@pytest.fixture
def two_node_cluster() -> Iterator[str]:
    """A head and a second node on 127.0.0.1, each with one CPU (lmat_platform.engines.cluster);
    afterwards no process of the cluster is left."""
    _stop_here()  # this process's own instance, if an earlier test started one
    with loopback_cluster(2, num_cpus=1) as cluster:
        yield cluster.address
    assert processes_of(cluster.temp_dir) == []


def _stop_here() -> None:
    """Shut this process's Ray down; none of its processes is left, nor its temp dir."""
    import ray

    ray.shutdown()
    if "tmp" in _HERE:
        _assert_no_ray_processes_of(_HERE["tmp"])
        shutil.rmtree(_HERE["tmp"], ignore_errors=True)
    _HERE.clear()


def _assert_no_ray_processes_of(temp_dir: str) -> None:
    """No process of the Ray instance whose temp dir is ``temp_dir`` is left (after a wait)."""
    assert stop_leftovers(temp_dir) == [], "Ray processes left after shutdown"


def _events(path: Path, k: int) -> str:
    """3,000 events of hour 10 + k: user 7 has 600 of them (its markers go stale and are
    refreshed from the tier), some repeat an earlier file's ids (duplicates), some are older
    than the last watermark (quarantined) or have event_ts after arrival_ts."""
    rng = np.random.default_rng(k)
    n = 3000
    ats = (10 + k) * HOUR + np.sort(rng.integers(0, HOUR, n))
    users = rng.integers(1, 400, n).astype(np.int64)
    users[rng.choice(n, 600, replace=False)] = 7
    ids = np.arange(k * n, (k + 1) * n, dtype=np.int64)
    if k:
        ids[:40] -= n  # re-sent events of the previous file
        ats[40:50] -= 2 * HOUR  # behind the last published watermark
    ets = ats - rng.integers(0, 2 * HOUR, n)
    ets[50:55] = ats[50:55] + 1
    pq.write_table(pa.table({
        "user_id": users, "event_id": ids, "event_ts": ets, "arrival_ts": ats,
        "item_id": rng.integers(1, 999, n).astype(np.int64),
        "action": rng.integers(1, 4, n).astype(np.int16),
        "dwell_ms": rng.random(n).astype(np.float32)}), path)
    return str(path)


def _requests(path: Path, k: int) -> str:
    rng = np.random.default_rng(100 + k)
    n = 800
    users = rng.integers(1, 400, n).astype(np.int64)
    users[:100] = 7
    pq.write_table(pa.table({
        "request_id": np.arange(k * n, (k + 1) * n, dtype=np.int64), "user_id": users,
        "request_ts": (11 + k) * HOUR + rng.integers(0, HOUR, n).astype(np.int64)}), path)
    return str(path)


#: Columns that hold wall-clock times of the run (never equal between two runs).
_CLOCK = ("created_at", "started_at", "ingested_at", "registered_at")


def _rows(t: pa.Table | None) -> list[tuple]:
    if t is None:
        return []
    t = t.drop_columns([c for c in _CLOCK if c in t.column_names])
    cols = sorted(t.column_names)
    return sorted(zip(*(t.column(c).to_pylist() for c in cols), strict=True), key=repr)


def _flow(root: str, files: list[str], reqs: list[str], thin: str, engine) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """Ingest, publish, log + examples, compact: the whole write path with ``engine``."""
    st = init_store(root, n_buckets=4, row_group_rows=64)
    for k, (f, r) in enumerate(zip(files, reqs, strict=True)):
        ingest_files(st, [f], engine=engine)
        publish_snapshot(st, (11 + k) * HOUR, engine=engine)
        write_thin(st, r, f"{thin}-log", path="log", engine=engine)
        write_thin(st, r, f"{thin}-ex", path="examples", engine=engine)
    compact_buckets(st, engine=engine)
    out = {name: _rows(read(st, name)) for name in TABLES if name != "thin_tables"}
    for kind in ("log", "ex"):
        dt = DeltaTable(f"{thin}-{kind}", storage_options=storage_options())
        out[kind] = _rows(delta_dataset(dt).to_table())
        out[f"{kind}-versions"] = [dt.version()]
    out["versions"] = [st.open_table(n).version() for n in TABLES if st.open_table(n)]
    out["uih-files"] = sorted((f.bucket, f.rows) for f in list_files(st.open_table("uih")))
    out["heads-files"] = _files_per_bucket(st.open_table("heads"))
    return out


def _files_per_bucket(dt: DeltaTable) -> list[tuple[int, int]]:
    t = pa.table(dt.get_add_actions(flatten=True))
    return sorted(zip(map(int, t.column("partition.bucket").to_pylist()),
                      t.column("num_records").to_pylist(), strict=True))


def _inputs(tmp_path: Path) -> tuple[list[str], list[str]]:
    return ([_events(tmp_path / f"e{k}.parquet", k) for k in range(3)],
            [_requests(tmp_path / f"r{k}.parquet", k) for k in range(3)])


def _assert_same_tables(local: dict[str, list], ray_: dict[str, list]) -> None:
    assert local.keys() == ray_.keys()
    for name in local:
        assert local[name] == ray_[name], name


def _assert_same(local: dict[str, list], ray_: dict[str, list]) -> None:
    _assert_same_tables(local, ray_)
    assert len(local["raw"]) > 8000 and len(local["quarantine"]) >= 30 and len(local["log"])


def test_ray_engine_writes_the_local_engines_tables(tmp_path: Path, ray_here: str) -> None:
    """Every table of the store and both thin tables, row for row, and the same commits."""
    files, reqs = _inputs(tmp_path)
    engine = RayEngine(None)
    ray_ = _flow(str(tmp_path / "ray"), files, reqs, str(tmp_path / "thin-ray"), engine)
    assert len(engine.all_nodes) == 1
    local = _flow(str(tmp_path / "local"), files, reqs, str(tmp_path / "thin-local"), None)
    _assert_same(local, ray_)
    assert any(r for r in local["heads"])  # noqa: C419 (heads were written)


def test_ray_tasks_drop_store_settings_the_driver_no_longer_has(
        ray_here: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray worker runs many tasks: a setting the driver had for an earlier call (an expired
    session token) is not kept for the next one (the old tasks only added the driver's)."""
    engine = RayEngine(None)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "expired")
    assert engine.map(os.getenv, ["AWS_SESSION_TOKEN"] * 4) == ["expired"] * 4
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    assert engine.map(os.getenv, ["AWS_SESSION_TOKEN"] * 4) == [None] * 4


@pytest.mark.slow
def test_ray_engine_on_an_s3_store(tmp_path: Path, ray_here: str, s3_store_uri: str) -> None:
    """Tasks reach an ``s3://`` store (moto on loopback) with the driver's settings: the same
    tables as the local engine on a local store."""
    files, reqs = _inputs(tmp_path)
    thin = s3_store_uri.rstrip("/") + "-thin"
    ray_ = _flow(s3_store_uri, files, reqs, thin, RayEngine(None))
    local = _flow(str(tmp_path / "local"), files, reqs, str(tmp_path / "thin-local"), None)
    _assert_same(local, ray_)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_on_two_nodes_writes_the_local_engines_tables(
    tmp_path: Path, two_node_cluster: str
) -> None:
    """On a cluster of two nodes on loopback (one CPU each): tasks ran on both nodes, and every
    table equals the local engine's."""
    files, reqs = _inputs(tmp_path)
    engine = RayEngine(two_node_cluster)
    ray_ = _flow(str(tmp_path / "ray"), files, reqs, str(tmp_path / "thin-ray"), engine)
    assert len(engine.all_nodes) == 2  # tasks ran on both nodes
    local = _flow(str(tmp_path / "local"), files, reqs, str(tmp_path / "thin-local"), None)
    _assert_same(local, ray_)


@pytest.fixture
def ray_harness(tmp_path: Path, ray_here: str) -> Iterator[object]:
    """The crash harness, every command run with ``LMAT_ENGINE=ray`` on the test's Ray."""
    from tests.crash_harness import Harness, Runner

    runner = Runner({"LMAT_ENGINE": "ray", "LMAT_RAY_ADDRESS": ray_here,
                     "RAY_AUTH_MODE": "disabled"})
    h = Harness(tmp_path / "crash-ray", runner)
    yield h
    h.close()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", ["snapshot", "ingest", "log", "compact"])
def test_ray_engine_killed_at_each_commit_then_rerun_is_exact(ray_harness, name: str) -> None:  # type: ignore[no-untyped-def]
    """``lmat snapshot / ingest / log / compact`` with ``LMAT_ENGINE=ray`` killed (SIGKILL)
    after each of their commits, then what a user does next (the re-run among it): the store is
    exact (accepted set, quarantine, every snapshot, validate, materialize == naive H(u, T)),
    as the crash harness checks the local engine."""
    from tests.crash_harness import SCENARIOS

    sc = SCENARIOS[name]
    n = ray_harness.count_commits(sc)
    # The commits were the Ray path's: files written by tasks, added by the driver.
    ray_harness.setup(sc)
    from tests.crash_harness import step_args

    kinds = {k for _, k, _ in ray_harness.runner.run(step_args(ray_harness.world,
                                                               sc.command)).commits}
    assert kinds & {"create_write_transaction", "create"}, kinds
    for k in range(1, n + 1):
        t = ray_harness.trial(sc, k)
        assert not t.problems, (k, t.problems)


@pytest.mark.slow
def test_dagster_assets_with_the_ray_engine_write_the_local_engines_tables(
    tmp_path: Path, ray_here: str
) -> None:
    """The write-path assets (ingest, snapshot, thin rows, tier compaction) materialized with
    ``LmatResource(engine="ray")`` (``LMAT_ENGINE=ray`` in a deployment) leave the tables the
    local engine leaves."""
    import dagster as dg

    from assets import LmatResource
    from assets.examples import thin_examples, thin_log
    from assets.ingest import ingest_events, landing_events, landing_requests
    from assets.tier import uih_snapshot, uih_tier
    from lmat_platform.synth import WorkloadConfig
    from lmat_platform.ui import land_workload

    days = land_workload(WorkloadConfig(seed=5, n_users=60, days=2, events_per_day=1200,
                                        requests_per_day=150), tmp_path / "landing")
    daily = [landing_events, landing_requests, ingest_events, uih_snapshot, thin_log,
             thin_examples]
    out = {}
    for engine in ("ray", "local"):
        res = LmatResource(store=str(tmp_path / engine / "store"), landing=str(tmp_path / "landing"),
                           outputs=str(tmp_path / engine / "out"), n_buckets=4, engine=engine,
                           ray_address=ray_here)
        for day in days:
            r = dg.materialize(daily, partition_key=day, resources={"lmat_store": res},
                               selection=[k for a in daily[2:] for k in a.keys])
            assert r.success
        assert dg.materialize([uih_snapshot, uih_tier], resources={"lmat_store": res},
                              selection=[uih_tier.key]).success
        snap = r.asset_materializations_for_node("uih_snapshot")[0].metadata
        assert snap["engine"].value == engine
        st = res.open()
        out[engine] = {name: _rows(read(st, name)) for name in TABLES if name != "thin_tables"}
        for kind in ("log", "examples"):
            out[engine][kind] = _rows(delta_dataset(DeltaTable(res.thin_uri(kind))).to_table())
    _assert_same_tables(out["local"], out["ray"])
    assert out["local"]["uih"] and out["local"]["log"]


def test_ray_engine_bad_event_file_is_one_line_and_changes_nothing(
    tmp_path: Path, ray_here: str
) -> None:
    """A bad file read by a task raises the local engine's error (not Ray's wrapper of it),
    before anything is written."""
    from lmat_platform.exceptions import SchemaError

    st = init_store(str(tmp_path / "s"), n_buckets=2)
    good = _events(tmp_path / "good.parquet", 0)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(good).drop_columns(["arrival_ts"]), bad)
    with pytest.raises(SchemaError) as e:
        ingest_files(st, [good, str(bad)], engine=RayEngine(None))
    assert type(e.value) is SchemaError and "arrival_ts" in str(e.value)
    assert "\n" not in str(e.value)
    assert st.open_table("raw") is None and st.open_table("ingests") is None


@pytest.mark.bench
def test_bench_ray_publish_tiny(tmp_path: Path) -> None:
    """bench.ray_publish end to end on a tiny store: both engines wrote the same tier and heads,
    the Ray side's tasks ran on both nodes, and every figure is there."""

    from bench.ray_publish import main

    _stop_here()
    out = tmp_path / "ray_publish.json"
    assert main(["--events", "60000", "--users", "3000", "--chunk", "30000", "--buckets", "4",
                 "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    import json

    r = json.loads(out.read_text())
    assert r["same_tables"] and r["publish_nodes"] == 2 and r["warmup_nodes"] == 2
    assert r["local_publish_s"] > 0 and r["ray_publish_s"] > 0 and r["publish_speedup"] > 0


def test_ray_engine_failed_task_cancels_its_siblings(tmp_path: Path, ray_here: str) -> None:
    """A step with a failing task raises the task's own error as soon as it fails, and its
    other tasks are cancelled instead of running on (the old code waited for all of them)."""

    def fail_or_sleep(x: tuple[int, str]) -> int:  # local: Ray ships it by value
        k, marker_dir = x
        if k == 0:
            raise ValueError("task 0 fails")
        for _ in range(80):  # Python work: a cancelled task stops between bytecodes
            time.sleep(0.1)
        Path(marker_dir, f"done-{k}").touch()
        return k

    eng = RayEngine(None)
    with pytest.raises(ValueError, match="task 0 fails"):
        eng.map(fail_or_sleep, [(0, str(tmp_path)), (1, str(tmp_path))])
    assert not list(tmp_path.glob("done-*"))  # the old code returned only after this
    time.sleep(10)  # past the sibling's sleep: it was cancelled, not left running
    assert not list(tmp_path.glob("done-*"))
