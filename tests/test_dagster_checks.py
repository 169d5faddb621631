"""Asset checks catch injected faults, and blocking ones stop everything downstream.

A base deployment (two days landed and materialized) is built once and copied for each test,
which then breaks one thing the way a buggy component would and reruns part of the graph.
"""

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from assets import LmatResource
from assets.checks import pointer_report
from jobs.bootstrap import DAILY_ASSETS
from jobs.definitions import build_defs
from lmat_platform import quality
from lmat_platform.reconstruct import own_tails
from lmat_platform.store import SnapshotInfo
from lmat_platform.store.core import delta_dataset
from lmat_platform.synth import WorkloadConfig
from lmat_platform.ui import land_workload

CFG = WorkloadConfig(seed=5, n_users=30, days=2, events_per_day=1200, requests_per_day=150)
DOWNSTREAM = ("tenant_retrieval", "tenant_ranking", "storage_report", "sequence_model")


def _resource(root: Path) -> LmatResource:
    return LmatResource(
        store=str(root / "store"),
        landing=str(root / "landing"),
        outputs=str(root / "outputs"),
        n_buckets=4,
    )


def _run(
    defs: dg.Definitions, selection: dg.AssetSelection, partition_key: str | None = None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [
            *(a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)),
            *(defs.asset_checks or []),
        ],
        selection=selection,
        partition_key=partition_key,
        resources=dict(defs.resources or {}),
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"sequence_model": {"config": {"max_steps": 2, "batch_size": 32}}}}
        if "sequence_model" in selection.resolve(defs.resolve_asset_graph(), allow_missing=True)
        else None,
        raise_on_error=False,
    )


def _materialized(r: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in r.get_asset_materialization_events()}


def _checks(r: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.asset_check_key.to_user_string(): e for e in r.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("base")
    days = land_workload(CFG, root / "landing")
    defs = build_defs(_resource(root))
    for day in days:
        r = _run(defs, dg.AssetSelection.assets(*DAILY_ASSETS), day)
        assert r.success and all(e.passed for e in r.get_asset_check_evaluations())
    return root, days


@pytest.fixture
def deployment(base: tuple[Path, list[str]], tmp_path: Path) -> tuple[LmatResource, list[str]]:
    root, days = base
    # Copy to the same relative layout, then point the resource at the copy.
    shutil.copytree(root, tmp_path / "d")
    return _resource(tmp_path / "d"), days


def test_broken_pointer_fails_blocking_check_and_stops_tenants(
    deployment: tuple[LmatResource, list[str]],
) -> None:
    res, days = deployment
    # A buggy writer: the pointers of day 2's batch examples carry a wrong head checksum.
    DeltaTable(res.thin_uri("examples")).update(
        new_values={"head_checksum": 12345}, predicate="head_len > 0"
    )
    r = _run(
        build_defs(res),
        dg.AssetSelection.assets("thin_examples", *DOWNSTREAM),
        partition_key=days[1],
    )
    assert not r.success
    check = _checks(r)["thin_examples:pointer_validity"]
    assert not check.passed
    assert check.metadata["counts"].value.get("o2o_consistency") == 1
    assert "O2O consistency error" in (check.description or "")
    assert _materialized(r) == {"thin_examples"}  # nothing downstream of it ran


def test_missing_snapshot_is_reported_without_reading_data() -> None:
    snaps = [SnapshotInfo(0, 100, 100, 1, 10, 0)]
    rows = pa.table(
        {
            "request_id": pa.array([1, 2, 3, 4], pa.int64()),
            "request_ts": pa.array([150, 150, 50, 150], pa.int64()),
            "snapshot_id": pa.array([0, 7, 0, -1], pa.int32()),
            "head_len": pa.array([3, 3, 3, 2], pa.int32()),
        }
    )
    rep = pointer_report(rows, snaps)
    assert rep.counts == {"missing_snapshot": 1, "snapshot_after_request": 1, "head_len": 1}
    assert pointer_report(rows.slice(0, 1), snaps).ok


def test_injected_leakage_fails_blocking_check_and_stops_downstream(
    deployment: tuple[LmatResource, list[str]],
) -> None:
    res, _ = deployment
    # A buggy streaming logger: one logged tail holds an event that arrived after the request.
    uri = res.thin_uri("log")
    raw = delta_dataset(DeltaTable(str(Path(res.store) / "raw"))).to_table()
    # Each row's own tail in its lists (thin format 1, which readers accept), so one row's
    # tail can be edited alone.
    thin = own_tails(delta_dataset(DeltaTable(uri)).to_table(), raw.schema)
    users = thin.column("user_id").to_numpy()
    ts = thin.column("request_ts").to_numpy()
    ru, ra = raw.column("user_id").to_numpy(), raw.column("arrival_ts").to_numpy()
    row = next(i for i in range(thin.num_rows) if ((ru == users[i]) & (ra >= ts[i])).any())
    j = int(np.flatnonzero((ru == users[row]) & (ra >= ts[row]))[0])
    for name in thin.column_names:
        if not name.startswith("tail_") or name in ("tail_block", "tail_start",
                                                    "tail_arrival_delay"):
            continue  # (the pointer into a user's shared tail, format 3's delays: null here)
        if name == "tail_len":
            lens = thin.column(name).to_pylist()
            lens[row] = (lens[row] or 0) + 1
            new = pa.array(lens, thin.schema.field(name).type)
        else:
            vals = thin.column(name).to_pylist()
            vals[row] = [*(vals[row] or []), raw.column(name.removeprefix("tail_"))[j].as_py()]
            new = pa.array(vals, thin.schema.field(name).type)
        thin = thin.set_column(thin.schema.get_field_index(name), name, new)
    write_deltalake(DeltaTable(uri), thin, mode="overwrite")

    r = _run(build_defs(res), dg.AssetSelection.assets(*DOWNSTREAM))
    assert not r.success
    check = _checks(r)["tenant_ranking:no_future_leakage"]
    assert not check.passed
    assert check.metadata["counts"].value.get("log:future_leakage") == 1
    assert "arrived at or after request time" in (check.description or "")
    assert "storage_report" not in _materialized(r)
    assert "sequence_model" not in _materialized(r)
    assert "tenant_ranking" in _materialized(r)  # the asset ran; its check stopped the rest


def test_rewritten_uih_fails_immutability_and_stops_thin_rows(
    deployment: tuple[LmatResource, list[str]],
) -> None:
    res, days = deployment
    # Someone deletes events from the published tier outside of `lmat forget`.
    uih = DeltaTable(str(Path(res.store) / "uih"))
    victim = int(pc.min(delta_dataset(uih).to_table(columns=["user_id"]).column("user_id")).as_py())
    uih.delete(f"user_id = {victim}")
    r = _run(
        build_defs(res),
        dg.AssetSelection.assets("uih_snapshot", "thin_log", "thin_examples"),
        partition_key=days[1],
    )
    assert not r.success
    check = _checks(r)["uih_snapshot:uih_immutability"]
    assert not check.passed and check.metadata["counts"].value.get("rewrite") == 1
    assert _materialized(r) == {"uih_snapshot"}


def test_gx_suites_flag_bad_events_and_thin_rows() -> None:
    events = pa.table(
        {
            "user_id": pa.array([1, None, 3], pa.int64()),
            "event_id": pa.array([1, 2, 3], pa.int64()),
            "event_ts": pa.array([10, 10, 50], pa.int64()),
            "arrival_ts": pa.array([11, 11, 40], pa.int64()),
            "item_id": pa.array([7, 7, 7], pa.int64()),
            "action": pa.array([1, 2, 9], pa.int16()),
        }
    )
    rep = quality.validate_events(events, [1, 2, 3])
    assert not rep.success
    failed = {
        (f["expectation"], f["kwargs"].get("column", f["kwargs"].get("column_A")))
        for f in rep.failed
    }
    assert failed == {
        ("expect_column_values_to_not_be_null", "user_id"),
        ("expect_column_values_to_be_in_set", "action"),
        ("expect_column_pair_values_a_to_be_greater_than_b", "arrival_ts"),
    }
    assert quality.validate_events(events.slice(0, 1), [1, 2, 3]).success

    thin = pa.table(
        {
            "request_id": pa.array([1, 1], pa.int64()),
            "user_id": pa.array([1, 2], pa.int64()),
            "request_ts": pa.array([5, 6], pa.int64()),
            "bucket": pa.array([0, 1], pa.int32()),
            "snapshot_id": pa.array([0, -1], pa.int32()),
            "head_len": pa.array([3, 0], pa.int32()),
            "head_checksum": pa.array([9, 0], pa.int64()),
        }
    )
    rep = quality.validate_thin_rows(thin)
    assert [f["expectation"] for f in rep.failed] == ["expect_column_values_to_be_unique"]
