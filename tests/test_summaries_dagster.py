"""The summary assets in process: the summarizer trained through the reader and registered,
then each day's summaries computed incrementally, both blocking checks passing."""

from pathlib import Path

import dagster as dg
import pytest
import torch

from assets import LmatResource
from jobs.bootstrap import materialize_all
from jobs.definitions import build_defs
from lmat_platform import list_snapshots
from lmat_platform.store.core import open_store
from lmat_platform.summaries import summarizer_versions, summary_registry
from lmat_platform.synth import WorkloadConfig
from lmat_platform.ui import land_workload

CFG = WorkloadConfig(seed=5, n_users=16, days=2, events_per_day=400, requests_per_day=60)
SUMMARIZER = {"ops": {"vista_summarizer": {"config": {"max_steps": 4, "d": 16, "k": 4,
                                                      "batch_size": 32, "max_len": 64}}}}


@pytest.fixture
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.usefixtures("_one_thread")
def test_summary_assets_and_checks(tmp_path: Path) -> None:
    days = land_workload(CFG, tmp_path / "landing")
    res = LmatResource(store=str(tmp_path / "store"), landing=str(tmp_path / "landing"),
                       outputs=str(tmp_path / "outputs"), n_buckets=2)
    defs = build_defs(res)
    inst = dg.DagsterInstance.ephemeral()
    runs = materialize_all(defs, instance=inst, partition_keys=days, run_config=SUMMARIZER,
                           include=dg.AssetSelection.assets("vista_summarizer"))
    assert all(r.success for r in runs)
    store = open_store(res.store)
    (version,) = summarizer_versions(store, "vista")
    assets = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    checks = list(defs.asset_checks or [])
    served = 0
    for day in days:
        r = dg.materialize([*assets, *checks], selection=dg.AssetSelection.assets("vista_summaries"),
                           partition_key=day, resources=dict(defs.resources or {}),
                           instance=inst)
        assert r.success
        evals = {e.asset_check_key.name: e for e in r.get_asset_check_evaluations()}
        assert set(evals) == {"summary_recompute", "summary_point_in_time"}
        assert all(e.passed for e in evals.values())
        assert evals["summary_recompute"].metadata["users"].value > 0
        assert evals["summary_point_in_time"].metadata["requests"].value > 0
        served += evals["summary_point_in_time"].metadata["with_summary"].value
    # Day 0's requests precede every summary (Q_0 = end of day 0 + 1 h); later days' do not.
    assert served > 0
    reg = summary_registry(store, version)
    assert [e.snapshot_id for e in reg] == list(range(len(reg))) and reg
    snaps = list_snapshots(store)
    assert all(e.published_at == snaps[e.snapshot_id].published_at + 3_600_000_000 for e in reg)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
