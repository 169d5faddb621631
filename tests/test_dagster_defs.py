"""The Dagster definitions, snapshotted: asset keys, checks, jobs, schedules and sensors.

Changing the graph should be a conscious act: update the snapshot below with it.
"""

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from assets import LmatResource
from jobs.definitions import build_defs, defs

ROOT = Path(__file__).resolve().parents[1]

ASSETS = {
    # asset: (group, daily-partitioned, upstream assets)
    "landing_events": ("landing", True, set()),
    "landing_requests": ("landing", True, set()),
    "raw_events": ("ingest", True, {"landing_events"}),
    "quarantined_events": ("ingest", True, {"landing_events"}),
    "uih_snapshot": ("uih", True, {"raw_events"}),
    "uih_tier": ("uih", False, {"uih_snapshot"}),
    "thin_log": ("examples", True, {"landing_requests", "raw_events", "uih_snapshot"}),
    "thin_examples": ("examples", True, {"landing_requests", "raw_events", "uih_snapshot"}),
    "tenant_retrieval": ("tenants", False, {"thin_log", "thin_examples"}),
    "tenant_ranking": ("tenants", False, {"thin_log", "thin_examples"}),
    "storage_report": ("reports", False, {"tenant_retrieval", "tenant_ranking"}),
    "sequence_model": (
        "training",
        False,
        {"thin_examples", "tenant_retrieval", "tenant_ranking"},
    ),
    "vista_summarizer": ("summaries", False, {"thin_examples", "uih_tier"}),
    "vista_summaries": ("summaries", True, {"uih_snapshot", "vista_summarizer"}),
    "real_ratings": ("real_data", False, set()),
    "real_store": ("real_data", False, {"real_ratings"}),
    "real_snapshots": ("real_data", False, {"real_store"}),
    "real_thin_rows": ("real_data", False, {"real_snapshots"}),
    "real_model": ("real_data", False, {"real_thin_rows"}),
    "real_evaluation": ("real_data", False, {"real_model"}),
}

CHECKS = {
    # check: blocking
    "raw_events:gx_events": False,
    "uih_snapshot:uih_immutability": True,
    "uih_tier:uih_immutability": False,
    "thin_log:gx_thin_rows": False,
    "thin_log:pointer_validity": True,
    "thin_examples:gx_thin_rows": False,
    "thin_examples:pointer_validity": True,
    "tenant_retrieval:no_future_leakage": True,
    "tenant_retrieval:o2o_parity": False,
    "tenant_ranking:no_future_leakage": True,
    "tenant_ranking:o2o_parity": False,
    "vista_summaries:summary_recompute": True,
    "vista_summaries:summary_point_in_time": True,
    "real_evaluation:beats_most_popular": False,
}

JOBS = {
    "ingest_job": {"raw_events", "quarantined_events"},
    "daily_snapshot_job": {
        "uih_snapshot",
        "uih_tier",
        "thin_log",
        "thin_examples",
        "tenant_retrieval",
        "tenant_ranking",
        "storage_report",
        "vista_summaries",
    },
    "train_job": {"sequence_model", "vista_summarizer"},
}


@pytest.fixture
def resource(tmp_path: Path) -> LmatResource:
    return LmatResource(
        store=str(tmp_path / "store"),
        landing=str(tmp_path / "landing"),
        outputs=str(tmp_path / "outputs"),
    )


def test_asset_graph_snapshot(resource: LmatResource) -> None:
    graph = build_defs(resource).resolve_asset_graph()
    got = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        got[key.to_user_string()] = (
            node.group_name,
            node.partitions_def is not None,
            {p.to_user_string() for p in node.parent_keys},
        )
    assert got == ASSETS


def test_checks_snapshot(resource: LmatResource) -> None:
    d = build_defs(resource)
    got = {}
    for checks_def in d.asset_checks or []:
        for spec in checks_def.check_specs:
            got[spec.key.to_user_string()] = spec.blocking
    assert got == CHECKS


def test_jobs_schedules_sensors_snapshot(resource: LmatResource) -> None:
    d = build_defs(resource)
    jobs = {}
    for name in JOBS:
        job = d.resolve_job_def(name)
        jobs[name] = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert jobs == JOBS
    assert d.resolve_job_def("daily_snapshot_job").partitions_def is not None
    assert [(s.name, s.job_name, s.cron_schedule) for s in d.schedules or []] == [
        ("daily_snapshot_schedule", "daily_snapshot_job", "30 0 * * *")
    ]
    assert [(s.name, s.job_name) for s in d.sensors or []] == [("landing_sensor", "ingest_job")]


def test_entry_point_reads_env_when_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LMAT_STORE", str(tmp_path / "elsewhere"))
    built = defs()  # the @definitions entry point that workspace.yaml loads
    res = built.resources["lmat_store"]
    assert res.store == str(tmp_path / "elsewhere")
    assert res.landing == str(tmp_path / "home" / "landing")
    assert {k.to_user_string() for k in built.resolve_asset_graph().get_all_asset_keys()} == set(
        ASSETS
    )


def test_daily_schedule_targets_yesterday(resource: LmatResource) -> None:
    d = build_defs(resource)
    schedule = d.resolve_schedule_def("daily_snapshot_schedule")
    when = dt.datetime(2023, 11, 17, 0, 30, tzinfo=dt.UTC)
    with dg.build_schedule_context(scheduled_execution_time=when) as ctx:
        data = schedule.evaluate_tick(ctx)
    assert [r.partition_key for r in data.run_requests or []] == ["2023-11-16"]


def test_landing_sensor_requests_one_run_per_new_day(resource: LmatResource) -> None:
    d = build_defs(resource)
    sensor = d.resolve_sensor_def("landing_sensor")
    events = Path(resource.landing) / "events"
    events.mkdir(parents=True)
    for name in ("2023-11-15.parquet", "2023-11-16.parquet", "2023-11-16-late.parquet"):
        (events / name).write_bytes(b"PAR1")
    (events / "notes.parquet").write_bytes(b"PAR1")  # no date: ignored

    with dg.build_sensor_context(resources={"lmat_store": resource}, definitions=d) as ctx:
        first = sensor.evaluate_tick(ctx)
    assert [r.partition_key for r in first.run_requests or []] == ["2023-11-15", "2023-11-16"]

    with dg.build_sensor_context(
        cursor=first.cursor, resources={"lmat_store": resource}, definitions=d
    ) as ctx:
        again = sensor.evaluate_tick(ctx)
    assert not again.run_requests  # nothing new

    (events / "2023-11-16-late.parquet").write_bytes(b"PAR1 changed")
    os.utime(events / "2023-11-16-late.parquet", ns=(1, 2))
    with dg.build_sensor_context(
        cursor=again.cursor or first.cursor, resources={"lmat_store": resource}, definitions=d
    ) as ctx:
        changed = sensor.evaluate_tick(ctx)
    assert [r.partition_key for r in changed.run_requests or []] == ["2023-11-16"]
    assert json.loads(changed.cursor or "{}").keys() == {
        "2023-11-15.parquet",
        "2023-11-16.parquet",
        "2023-11-16-late.parquet",
    }


def test_workspace_yaml_loads_with_dagster_cli(tmp_path: Path) -> None:
    env = {**os.environ, "LMAT_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("")
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster")),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Validation successful for code location lmat" in proc.stderr + proc.stdout
