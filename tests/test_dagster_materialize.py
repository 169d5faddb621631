"""The whole asset graph materialized in process into tmp_path, every check passing."""

import math
from pathlib import Path

import dagster as dg
import pytest
import torch

from assets import LmatResource
from jobs.bootstrap import materialize_all
from jobs.definitions import build_defs
from lmat_platform.synth import WorkloadConfig
from lmat_platform.train import load_model
from lmat_platform.ui import land_workload

CFG = WorkloadConfig(seed=3, n_users=40, days=3, events_per_day=1500, requests_per_day=200)
TRAIN = {"ops": {"sequence_model": {"config": {"batch_size": 64, "epochs": 2, "device": "cpu"}},
                 "vista_summarizer": {"config": {"max_steps": 5, "d": 16, "k": 4}}}}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> tuple[LmatResource, list[str]]:
    root = tmp_path_factory.mktemp("lmat")
    days = land_workload(CFG, root / "landing")
    res = LmatResource(
        store=str(root / "store"),
        landing=str(root / "landing"),
        outputs=str(root / "outputs"),
        n_buckets=4,
    )
    return res, days


@pytest.fixture(scope="module")
def runs(deployment: tuple[LmatResource, list[str]]) -> list[dg.ExecuteInProcessResult]:
    res, days = deployment
    return materialize_all(
        build_defs(res),
        instance=dg.DagsterInstance.ephemeral(),
        partition_keys=days,
        run_config=TRAIN,
        raise_on_error=False,
    )


def _materialized(r: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in r.get_asset_materialization_events()
    }


def test_every_asset_materializes_and_every_check_passes(
    runs: list[dg.ExecuteInProcessResult], deployment: tuple[LmatResource, list[str]]
) -> None:
    _, days = deployment
    assert len(runs) == len(days) + 1
    assert all(r.success for r in runs)
    for r in runs[:-1]:
        assert set(_materialized(r)) == {
            "raw_events",
            "quarantined_events",
            "uih_snapshot",
            "thin_log",
            "thin_examples",
        }
    assert set(_materialized(runs[-1])) == {
        "uih_tier",
        "tenant_retrieval",
        "tenant_ranking",
        "storage_report",
        "sequence_model",
        "vista_summarizer",
    }
    evaluations = [e for r in runs for e in r.get_asset_check_evaluations()]
    failed = [
        (e.asset_check_key.to_user_string(), e.description) for e in evaluations if not e.passed
    ]
    assert failed == []
    names = {e.asset_check_key.to_user_string() for e in evaluations}
    assert names == {
        "raw_events:gx_events",
        "uih_snapshot:uih_immutability",
        "uih_tier:uih_immutability",
        "thin_log:gx_thin_rows",
        "thin_log:pointer_validity",
        "thin_examples:gx_thin_rows",
        "thin_examples:pointer_validity",
        "tenant_retrieval:no_future_leakage",
        "tenant_retrieval:o2o_parity",
        "tenant_ranking:no_future_leakage",
        "tenant_ranking:o2o_parity",
    }
    # Checks are not vacuous: they looked at rows.
    for e in evaluations:
        if "pointer_validity" in e.asset_check_key.name or "leakage" in e.asset_check_key.name:
            assert e.metadata["checked"].value > 0


def test_metadata_describes_the_data(
    runs: list[dg.ExecuteInProcessResult], deployment: tuple[LmatResource, list[str]]
) -> None:
    res, _ = deployment
    day0 = _materialized(runs[0])
    assert day0["raw_events"]["accepted_events"] > 0
    assert day0["uih_snapshot"]["snapshot_id"] == 0
    assert day0["thin_examples"]["requests"] == CFG.requests_per_day
    assert day0["thin_log"]["tail_events"] > 0  # day 0 has no snapshot: all history is tail

    final = _materialized(runs[-1])
    ranking, retrieval = final["tenant_ranking"], final["tenant_retrieval"]
    n = CFG.requests_per_day * CFG.days
    assert ranking["examples_requests"] == retrieval["examples_requests"] == n
    assert ranking["log_events"] == ranking["examples_events"]  # both paths rebuild H(u, T)
    # Projection pushdown: the short, filtered tenant reads less than the long one.
    assert retrieval["examples_bytes_read"] < ranking["examples_bytes_read"]

    report = final["storage_report"]
    assert {r["tenant"] for r in report["rows"]} == {"retrieval", "ranking", "all tenants"}
    assert "data:image/png;base64," in report["report"]
    assert Path(report["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_training_asset_trains_through_the_reader(
    runs: list[dg.ExecuteInProcessResult], deployment: tuple[LmatResource, list[str]]
) -> None:
    model = _materialized(runs[-1])["sequence_model"]
    n = CFG.requests_per_day * CFG.days
    assert model["examples"] == 2 * n  # two epochs, every request once per epoch
    assert model["device"] == "cpu"
    assert math.isfinite(model["final_loss"]) and model["final_loss"] < model["first_loss"]
    assert model["examples_per_s"] > 0 and 0 <= model["data_wait_share"] < 1
    net = load_model(model["model_path"])
    tokens = net.tokens(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([4, 0, 1]))
    assert tokens[0, -4:].tolist() == [5, 6, 7, 8] and tokens[1, -1] == net.bos
    assert net.scores(tokens).shape == (3, model["n_items"] + 1)


def test_rerunning_a_day_is_a_no_op(
    deployment: tuple[LmatResource, list[str]], runs: list[dg.ExecuteInProcessResult]
) -> None:
    res, days = deployment
    again = materialize_all(
        build_defs(res),
        instance=dg.DagsterInstance.ephemeral(),
        partition_keys=days[:1],
        include=dg.AssetSelection.assets("uih_tier"),
    )
    day0 = _materialized(again[0])
    assert day0["uih_snapshot"]["status"] == "already published"
    assert day0["thin_examples"]["status"] == "already written"
    assert day0["raw_events"]["this_run"]["skipped_files"] == 1
    assert all(e.passed for r in again for e in r.get_asset_check_evaluations())
