"""The training loop on a real slice of MovieLens-100K: a tiny run end to end, and resuming a
run that was interrupted (in process, and by SIGKILL) gives the uninterrupted run's model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from lmat_platform.datasets import fetch_ratings, prepare_dataset, read_ratings
from lmat_platform.datasets.pipeline import slice_users
from lmat_platform.datasets.ratings import EVENTS_FILE, requests_file
from lmat_platform.models.evaluate import RankingAccumulator, most_popular_scores
from lmat_platform.models.sasrec import SASRec, SASRecConfig
from lmat_platform.tenants import Tenant
from lmat_platform.train import (
    CHECKPOINT_FILE,
    EVAL_CELLS,
    METRICS_FILE,
    MODEL_FILE,
    PLOT_FILE,
    TrainConfig,
    _chunks,
    eval_batches,
    evaluate_model,
    load_model,
    train_on_dataset,
)

USERS = 12


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("train-slice")
    src = root / "slice.parquet"
    pq.write_table(slice_users(read_ratings(fetch_ratings("ml-100k")), USERS), src)
    return prepare_dataset(str(src), str(root / "prepared"), n_snapshots=3, n_buckets=2)


def _model(prep) -> SASRecConfig:
    return SASRecConfig(n_items=prep.n_items, max_len=10, d_model=16, n_layers=1)


CFG = TrainConfig(epochs=2, batch_size=32, checkpoint_every=3, threads=1, patience=0,
                  time_column="arrival_ts")


def test_tiny_run_writes_model_metrics_and_plot(prep, tmp_path) -> None:
    res = train_on_dataset(prep, str(tmp_path), max_len=10, model=_model(prep), config=CFG)
    m = json.loads((tmp_path / METRICS_FILE).read_text())
    assert m["epochs_run"] == 2 and len(m["history"]) == 2
    assert m["examples"] > 0 and m["targets"] > m["examples"]  # every position is a target
    assert 0 <= m["data_wait_share"] < 1 and m["examples_per_s"] > 0
    for part in ("valid", "test"):
        assert m[part]["n"] == USERS
        assert 0 <= m[part]["hr@10"] <= m[part]["hr@10_filtered"] <= 1
        assert m["most_popular"][part]["n"] == USERS
    assert m["dataset"]["train_stride"] == 2  # max_len 10 // DEFAULT_STRIDE_DIVISOR
    # Every training rating is a target at most once an epoch (windows overlap; each
    # trains only the ratings since the previous one), and most are: not the users' first
    # ratings, nor ones whose window shows nothing that arrived before them.
    n_train = pq.read_metadata(os.path.join(prep.import_dir, requests_file("train"))).num_rows
    for h in m["history"]:
        assert 0.85 * n_train <= h["targets"] <= n_train - USERS
    for part in ("valid", "test"):  # the baseline, recomputed from the imported files alone
        assert m["most_popular"][part] == pytest.approx(_most_popular(prep, part))
    assert (tmp_path / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    net = load_model(str(tmp_path / MODEL_FILE))
    assert net.cfg.max_len == 10 and res.model_path == str(tmp_path / MODEL_FILE)


def test_lr_decays_after_epochs_without_a_better_validation(prep, tmp_path) -> None:
    # lr 1e-9: the model does not move, so no epoch after the first beats the best one.
    cfg = replace(CFG, epochs=3, lr=1e-9, lr_decay=0.5, lr_decay_patience=1)
    m = train_on_dataset(prep, str(tmp_path), max_len=10, model=_model(prep), config=cfg).metrics
    assert m["best_epoch"] == 0
    assert [h.get("lr") for h in m["history"]] == [None, pytest.approx(5e-10),
                                                  pytest.approx(2.5e-10)]
    ck = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2.5e-10)  # resumes decayed


def _most_popular(prep, split: str) -> dict[str, float]:
    """HR@10 / NDCG@10 (and filtered) of the training labels' counts on ``split``'s requests,
    the seen items being the user's events that arrived before the request."""
    imp = prep.import_dir
    train = pq.read_table(os.path.join(imp, requests_file("train")))["label"].to_numpy()
    req = pq.read_table(os.path.join(imp, requests_file(split))).to_pandas()
    ev = pq.read_table(os.path.join(imp, EVENTS_FILE)).to_pandas()
    scores = most_popular_scores(train, prep.n_items + 1).expand(len(req), -1)
    seen = torch.zeros(scores.shape, dtype=torch.bool)
    for i, r in enumerate(req.itertuples()):
        h = ev[(ev.user_id == r.user_id) & (ev.arrival_ts < r.request_ts)].item_id.to_numpy()
        seen[i, torch.tensor(h)] = True
    acc = RankingAccumulator(ks=(10,))
    acc.update(scores, torch.tensor(req.label.to_numpy()), seen=seen)
    return acc.result()


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise _Stop

    return hook


def _same_weights(a: str, b: str) -> None:
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_chunks_keep_attention_within_the_cells_and_cover_the_batch() -> None:
    lengths = torch.tensor([3, 700, 1, 0, 40, 12, 9])
    ends = torch.cumsum(lengths, 0).tolist()
    for max_len, cells, rows in ((50, EVAL_CELLS, 7), (50, 3 * 50 * 50, 3), (None, 1, 1),
                                 (10, 2 * 100 + 99, 2), (None, 700 * 700 * 4, 4)):
        chunks = _chunks(lengths, max_len=max_len, cells=cells)
        assert [hi - lo for lo, hi, _, _ in chunks[:-1]] == [rows] * (len(chunks) - 1)
        assert [c[0] for c in chunks] == list(range(0, 7, rows))
        assert chunks[-1][1] == 7 and chunks[-1][3] == ends[-1]
        for lo, hi, vlo, vhi in chunks:  # value offsets match the requests'
            assert (vlo, vhi) == (ends[lo - 1] if lo else 0, ends[hi - 1])
    assert _chunks(lengths, max_len=50, cells=None) == [(0, 7, 0, ends[-1])]
    assert _chunks(torch.tensor([], dtype=torch.int64), max_len=50, cells=1) == []


def test_cli_eval_cells_reaches_the_config_and_refuses_zero(capsys) -> None:
    from lmat_platform.cli import build_parser
    from lmat_platform.datasets.commands import _train_config

    p = build_parser()
    assert _train_config(p.parse_args(["train", "ml-100k", "--out", "x"])).eval_cells \
        == EVAL_CELLS
    a = p.parse_args(["train", "ml-100k", "--out", "x", "--eval-cells", "2500"])
    assert _train_config(a).eval_cells == 2500
    with pytest.raises(SystemExit) as e:
        p.parse_args(["train", "ml-100k", "--out", "x", "--eval-cells", "0"])
    assert e.value.code == 2 and "--eval-cells" in capsys.readouterr().err


@pytest.mark.parametrize("max_len", [10, 200])
def test_metrics_do_not_depend_on_the_evaluation_cells(prep, max_len: int) -> None:
    """One request a chunk, uneven chunks and one chunk a batch score the same requests to the
    same figures, to the last bit. In float64: in float32 the CPU's matrix kernels, chosen by
    batch size, move scores by up to ~4e-7 between chunk sizes, which can swap two items that
    close (an untrained model has many near-ties; see docs/real_data.md, "Evaluation protocol")."""
    torch.manual_seed(3)
    net = SASRec(SASRecConfig(n_items=prep.n_items, max_len=max_len, d_model=16,
                              n_layers=2)).double()
    tenant = Tenant("next_item", ("item_id",), max_len)
    results = []
    for cells in (1, 5 * max_len**2, 10**12):
        # K past the catalogue: NDCG@K then weighs every request's rank, not just the top 10
        cfg = replace(CFG, eval_batch_size=8, eval_cells=cells, k=prep.n_items + 1)
        results.append({split: evaluate_model(
            net, eval_batches(prep.store, prep.thin[split], tenant, config=cfg), config=cfg)
            for split in ("valid", "test")})
    assert results[0]["valid"]["n"] == USERS
    assert 0 < results[0]["valid"][f"ndcg@{prep.n_items + 1}_filtered"] < 1
    assert results[0] == results[1] == results[2]


def test_interrupted_run_resumes_to_the_same_model(prep, tmp_path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_on_dataset(prep, str(full), max_len=10, model=_model(prep), config=CFG)
    steps = json.loads((full / METRICS_FILE).read_text())["steps"]
    # A step between two checkpoints, past the first epoch's end.
    stop = next(s for s in range(steps // 2 + 1, steps) if s % CFG.checkpoint_every == 2)
    with pytest.raises(_Stop):
        train_on_dataset(prep, str(cut), max_len=10, model=_model(prep), config=CFG,
                         on_step=_stop_at(stop))
    ck = torch.load(cut / CHECKPOINT_FILE, weights_only=False)
    assert 0 < ck["state"]["step"] < stop  # the checkpoint is behind the interruption
    assert not (cut / MODEL_FILE).exists()
    # A zero budget tests the checkpoint's best epoch at once; running again continues (the
    # checkpoint here ends epoch 0: the zero-budget process never reads a batch, and once saved
    # a fresh loader's state, so the next one replayed epoch 0's order as epoch 1).
    quick = train_on_dataset(prep, str(cut), max_len=10, model=_model(prep),
                             config=replace(CFG, budget_s=0))
    assert quick.metrics["stopped"] == "budget" and quick.metrics["epochs_run"] == 1
    assert quick.metrics["best_epoch"] == 0 and quick.metrics["test"]["n"] == USERS
    train_on_dataset(prep, str(cut), max_len=10, model=_model(prep), config=CFG)
    _same_weights(str(full / MODEL_FILE), str(cut / MODEL_FILE))
    a = json.loads((full / METRICS_FILE).read_text())
    b = json.loads((cut / METRICS_FILE).read_text())
    assert a["test"] == b["test"] and a["steps"] == b["steps"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_zero_budget_at_an_epoch_end_keeps_the_next_epoch_order(prep, tmp_path) -> None:
    """A process that resumes at an epoch's end and stops before reading a batch (budget 0)
    saves the loader state it resumed from, so the continuation trains the next epoch in that
    epoch's order, as an uninterrupted run does."""
    cfg = replace(CFG, checkpoint_every=10_000)  # checkpoints only at epochs' ends
    full = train_on_dataset(prep, str(tmp_path / "full"), max_len=10, model=_model(prep),
                            config=cfg, stride=5)
    first_epoch_steps = full.history[0]["step"]
    with pytest.raises(_Stop):
        train_on_dataset(prep, str(tmp_path / "cut"), max_len=10, model=_model(prep),
                         config=cfg, stride=5, on_step=_stop_at(first_epoch_steps + 1))
    quick = train_on_dataset(prep, str(tmp_path / "cut"), max_len=10, model=_model(prep),
                             config=replace(cfg, budget_s=0), stride=5)
    assert quick.metrics["stopped"] == "budget" and quick.metrics["epochs_run"] == 1
    cont = train_on_dataset(prep, str(tmp_path / "cut"), max_len=10, model=_model(prep),
                            config=cfg, stride=5)
    assert [h["train_loss"] for h in cont.history] == [h["train_loss"] for h in full.history]


def test_checkpoint_from_before_a_model_field_resumes(prep, tmp_path) -> None:
    """A checkpoint saved before ``SASRecConfig.repeat`` existed (no such key) was a model
    without it: it resumes a ``repeat=False`` model and is refused for ``repeat=True``."""
    with pytest.raises(_Stop):  # cut after the checkpoint of step 3
        train_on_dataset(prep, str(tmp_path), max_len=10, model=_model(prep), config=CFG,
                         on_step=_stop_at(4))
    ck = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    del ck["model_config"]["repeat"]
    torch.save(ck, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="saved for model"):
        train_on_dataset(prep, str(tmp_path), max_len=10, config=CFG,
                         model=replace(_model(prep), repeat=True))
    ck["model_config"]["from_a_newer_version"] = 1  # a field this code does not know
    torch.save(ck, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="saved for model"):
        train_on_dataset(prep, str(tmp_path), max_len=10, model=_model(prep), config=CFG)
    del ck["model_config"]["from_a_newer_version"]
    torch.save(ck, tmp_path / CHECKPOINT_FILE)
    cont = train_on_dataset(prep, str(tmp_path), max_len=10, model=_model(prep), config=CFG)
    assert cont.metrics["epochs_run"] == CFG.epochs and cont.metrics["steps"] > 4


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_same_model(prep, tmp_path) -> None:
    """``lmat train`` killed with SIGKILL part way, then run again, ends where an uninterrupted
    run ends."""
    args = [sys.executable, "-m", "lmat_platform.cli", "train", prep.root, "--max-len", "10",
            "--d-model", "16", "--layers", "1", "--epochs", "3", "--batch-size", "16",
            "--checkpoint-every", "1", "--threads", "1", "--patience", "0"]
    env = {**os.environ, "LMAT_QUIET": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = subprocess.run([*args, "--out", str(full)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    total = json.loads(p.stdout)["steps"]
    proc = subprocess.Popen([*args, "--out", str(cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    ck = cut / CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ck.exists():
            try:
                if torch.load(ck, weights_only=False)["state"]["step"] >= 3:
                    break
            except (EOFError, RuntimeError):
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(ck, weights_only=False)["state"]["step"]
    assert 3 <= done < total
    assert not (cut / MODEL_FILE).exists()
    p = subprocess.run([*args, "--out", str(cut)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["steps"] == total
    _same_weights(str(full / MODEL_FILE), str(cut / MODEL_FILE))


@pytest.mark.slow
def test_real_data_asset_group_materializes_and_checks(tmp_path) -> None:
    """The real_data group on a 15-user slice: every asset, metrics in metadata, and the
    quality check's verdict equal to the evaluation's figures."""
    import dagster as dg

    from assets import LmatResource
    from assets.real_data import REAL_DATA_ASSETS, REAL_DATA_CHECKS
    from lmat_platform.models.evaluate import beats_baseline

    res = LmatResource(store=str(tmp_path / "s"), landing=str(tmp_path / "l"),
                       outputs=str(tmp_path / "o"))
    data = {"users": 15, "n_snapshots": 3}
    model = {**data, "max_len": 10, "epochs": 2, "patience": 0, "threads": 1}
    ops = {"real_ratings": data, "real_store": data, "real_snapshots": data,
           "real_thin_rows": data, "real_model": model, "real_evaluation": model}
    out = dg.materialize(
        [*REAL_DATA_ASSETS, *REAL_DATA_CHECKS], resources={"lmat_store": res},
        run_config={"ops": {k: {"config": v} for k, v in ops.items()}},
    )
    assert out.success
    mats = {m.asset_key.to_user_string(): m.metadata for m in
            (e.event_specific_data.materialization for e in out.get_asset_materialization_events())}
    assert set(mats) == {a.key.to_user_string() for a in REAL_DATA_ASSETS}
    assert mats["real_ratings"]["users"].value == 15
    ev = mats["real_evaluation"]
    test_hr = ev["test_hr@10"].value
    pop_hr = ev["most_popular_hr@10"].value
    assert "test_ndcg@10_filtered" in ev
    (check,) = out.get_asset_check_evaluations()
    assert check.passed == beats_baseline({"hr@10": test_hr}, {"hr@10": pop_hr})[0]
