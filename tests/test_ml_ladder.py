"""The sequence-length ladder's report (``bench.ml_ladder``): what stopped each rung, the
process log of each rung, and the copy of the results out of the run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.ml_ladder import RUNG_LOG, _segment, collect, write_outputs


def _metrics(max_len: int, *, epochs: int, best: int, stopped: str, step_s: float,
             ndcg: float) -> dict[str, Any]:
    scores = {"n": 671.0, "hr@10": 2 * ndcg, "hr@10_filtered": 3 * ndcg, "ndcg@10": ndcg,
              "ndcg@10_filtered": 1.5 * ndcg}
    return {
        "model": {"max_len": max_len}, "epochs_run": epochs, "best_epoch": best,
        "stopped": stopped, "dataset": {"train_stride": max_len // 2},
        "train": {"batch_size": 64},
        "history": [{"targets": 1000, "valid": {"ndcg@10": ndcg * (i + 1) / epochs}}
                    for i in range(epochs)],
        "targets": 1000 * epochs, "test": scores, "valid": scores,
        "examples_per_s": 30.0, "targets_per_s": 700.0, "data_wait_share": 0.012,
        "step_s": step_s,
    }


def _rung(out: Path, name: str, metrics: dict[str, Any]) -> Path:
    run = out / f"len-{name}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "training.png").write_bytes(b"png")
    return run


def test_table_names_the_stop_epochs_and_processes_and_copies_results(tmp_path: Path) -> None:
    out, results = tmp_path / "runs", tmp_path / "results"
    _rung(out, "10", _metrics(10, epochs=22, best=11, stopped="early_stopping", step_s=1980.0,
                              ndcg=0.05))
    run = _rung(out, "whole", _metrics(2391, epochs=3, best=2, stopped="budget", step_s=1500.0,
                                       ndcg=0.03))
    seg = {"pid": 7, "commit": "abc1234", "argv": ["ml_ladder.py", "--lengths", "all"],
           "started": "2026-12-03T04:00:00Z", "rung_budget_s": 1200.0,
           "loadavg_start": [5.0, 5.0, 5.0]}
    _segment(run, seg)
    seg.update(ended="2026-12-03T04:25:00Z", loadavg_end=[6.0, 6.0, 6.0], wall_s=1500.0,
               cpu_s=1400.0)
    _segment(run, seg)  # the same process's end replaces its start
    assert len(json.loads((run / RUNG_LOG).read_text())) == 1

    rows = collect(out)
    write_outputs("ml-latest-small", rows, out, results)

    md = (results / "ladder.md").read_text()
    line10 = next(x for x in md.splitlines() if x.startswith("| 10 |"))
    line_whole = next(x for x in md.splitlines() if x.startswith("| whole |"))
    # best validation within the first 5 and 10 epochs ("-": fewer run); 1980 s over 22 epochs
    assert (f"| patience | 22 (11) | 0.0500 | {0.05 * 5 / 22:.4f} | {0.05 * 10 / 22:.4f} | 90 |"
            in line10)
    assert "| budget | 3 (2) | 0.0300 | - | - | 500 |" in line_whole
    assert "| best valid | valid@5 | valid@10 |" in md
    assert "1.2%" in line10
    assert ("whole: 2026-12-03T04:00:00Z to 2026-12-03T04:25:00Z, code abc1234, budget 1200 s"
            in md)
    assert "`python -m bench.ml_ladder --lengths all`" in md
    data = json.loads((results / "ladder.json").read_text())
    assert [r["stopped"] for r in data["rungs"]] == ["early_stopping", "budget"]
    assert data["rungs"][1]["commits"] == ["abc1234"]
    for name in ("len-10", "len-whole"):
        assert (results / name / "metrics.json").read_text() == \
            (out / name / "metrics.json").read_text()
        assert (results / name / "training.png").exists()
    assert (results / "ladder.png").stat().st_size > 0
    assert not (out / "ladder.md").exists()  # the run directory gets no report


def test_a_stopped_process_records_its_end(tmp_path: Path, monkeypatch: Any) -> None:
    """A rung process ended by SIGTERM (``SystemExit``) still logs its end, CPU and wall."""
    import types

    import pytest

    import bench.ml_ladder as ladder

    prep = types.SimpleNamespace(max_history=100, n_items=10, source="x")
    monkeypatch.setattr(ladder, "resolve_prepared", lambda data, tie_order: prep)
    monkeypatch.setattr(ladder, "windows", lambda prep, stride: 640)

    def killed(*args: Any, **kwargs: Any) -> None:
        ladder._terminated(15, None)

    monkeypatch.setattr(ladder, "train_on_dataset", killed)
    with pytest.raises(SystemExit) as e:
        ladder.run_ladder("x", tmp_path, lengths=(50,), rung_budget_s=60.0, commit="c0ffee")
    assert e.value.code == 143
    (seg,) = json.loads((tmp_path / "len-50" / RUNG_LOG).read_text())
    assert seg["interrupted"] == "SystemExit" and seg["commit"] == "c0ffee"
    assert seg["rung_budget_s"] == 60.0 and "ended" in seg and seg["cpu_s"] >= 0


def test_reconstructed_segment_shows_what_was_not_recorded(tmp_path: Path) -> None:
    """A segment written from logs (no load average, CPU or end) renders with ``?``."""
    run = _rung(tmp_path, "200", _metrics(200, epochs=29, best=18, stopped="early_stopping",
                                          step_s=900.0, ndcg=0.054))
    _segment(run, {"pid": 0, "commit": "55f2ffe..f684b37 (working tree)",
                   "argv": ["ml_ladder.py", "--lengths", "200"],
                   "started": "2026-12-02T23:11:25Z", "rung_budget_s": None,
                   "note": "reconstructed from its log"})
    write_outputs("ml-100k", collect(tmp_path), tmp_path)
    md = (tmp_path / "ladder.md").read_text()
    assert ("- 200: 2026-12-02T23:11:25Z to ?, code 55f2ffe..f684b37 (working tree), budget "
            "none, ? s wall, ? s CPU, load average ? -> ?: `python -m bench.ml_ladder "
            "--lengths 200` (reconstructed from its log)") in md
