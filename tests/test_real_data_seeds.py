"""bench.ml_seeds: the table of several seeds of one configuration (mean and every seed, never
a best seed; runs of different configurations refused)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import ml_seeds
from lmat_platform.exceptions import InputFileError


def _metrics(seed: int, ndcg: float, *, tie_order: str = "row", **train: Any) -> dict[str, Any]:
    test = {"n": 943.0, "hr@10": 2 * ndcg, "ndcg@10": ndcg, "hr@10_filtered": 3 * ndcg,
            "ndcg@10_filtered": 1.5 * ndcg}
    return {
        "model": {"n_items": 1682, "max_len": 50, "dropout": 0.5, "block": "sasrec"},
        "tenant": {"name": "next_item", "columns": ["item_id", "arrival_ts"], "max_len": 50},
        "train": {"epochs": 200, "batch_size": 64, "lr": 1e-3, "seed": seed, "threads": 1,
                  "budget_s": None, **train},
        "dataset": {"source": "ml-100k", "root": f"/x/{seed}", "tie_order": tie_order,
                    "users": 943, "train_stride": 25, "items": 1682},
        "epochs_run": 40, "best_epoch": 30, "stopped": "early_stopping",
        "valid": {"n": 943.0, "ndcg@10": ndcg + 0.01}, "test": test,
        "data_wait_share": 0.01, "examples_per_s": 50.0,
    }


def test_summary_reports_every_seed_and_the_mean() -> None:
    runs = {"a": _metrics(2020, 0.06), "b": _metrics(1, 0.07), "c": _metrics(2, 0.05)}
    s = ml_seeds.summarize(runs)
    assert s["seeds"] == [1, 2, 2020]
    assert [r["test"]["ndcg@10"] for r in s["rows"]] == [0.07, 0.05, 0.06]
    m = s["mean"]["ndcg@10"]
    assert m["mean"] == pytest.approx(0.06)
    assert m["sd"] == pytest.approx(0.01)
    assert m["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert s["mean"]["hr@10"]["mean"] == pytest.approx(0.12)
    assert s["mean"]["valid_ndcg@10"]["mean"] == pytest.approx(0.07)
    md = ml_seeds.markdown(s, "t")
    assert "**mean of 3**" in md and "| 2020 |" in md and "**0.0600**" in md


def test_summary_refuses_mixed_configurations_and_repeated_seeds() -> None:
    with pytest.raises(InputFileError, match="train.lr"):
        ml_seeds.summarize({"a": _metrics(0, 0.06), "b": _metrics(1, 0.06, lr=2e-3)})
    with pytest.raises(InputFileError, match="dataset.tie_order"):
        ml_seeds.summarize({"a": _metrics(0, 0.06), "b": _metrics(1, 0.06, tie_order="hidden")})
    with pytest.raises(InputFileError, match="seed 0 appears twice"):
        ml_seeds.summarize({"a": _metrics(0, 0.06), "b": _metrics(0, 0.05)})
    # run-control settings (threads, budget, data root) may differ between seeds
    other = copy.deepcopy(_metrics(1, 0.05))
    other["train"].update(threads=4, budget_s=600.0)
    assert ml_seeds.summarize({"a": _metrics(0, 0.06), "b": other})["seeds"] == [0, 1]


def test_cli_collects_finished_runs_and_refuses_bad_input(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    for name, seed in (("r1", 2020), ("r2", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(_metrics(seed, 0.06)))
    out = tmp_path / "out"
    assert ml_seeds.main(["--out", str(out), "--collect", str(tmp_path / "r1"),
                          str(tmp_path / "r2")]) == 0
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [1, 2020]
    assert "mean of 2" in (out / "seeds.md").read_text()
    assert ml_seeds.main(["--out", str(out), "--collect", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert ml_seeds.main(["--out", str(out), "--", "ml-100k", "--seed", "3"]) == 2
    assert "leave --seed and --out" in capsys.readouterr().err
