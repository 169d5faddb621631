"""The sequence-length ladder on real data: the same next-item model trained with tenant
``max_len`` 10, 25, 50, 100, 200 and the whole history; test quality and training throughput
against length, as a table (``ladder.md``), JSON (``ladder.json``) and a plot (``ladder.png``).

Every rung trains through ``SequenceLoader`` on the platform's thin rows with the same recipe
(the main result's: ``all``-positions loss, each item predicted from its own H(u, T), dropout
0.5, Adam 1e-3, early stopping on validation NDCG@10) and the same work an epoch: windows at
stride ``max_len / 2``, each training the ratings since the previous window, so **every
training rating is a target exactly once an epoch at every rung**; the batch holds as many
windows as makes every rung take the same number of steps an epoch (so the same targets a
step on average). A longer rung sees more history per target and pays for it in compute:
that is the throughput column. A rung whose ``metrics.json`` exists is not run again (rerun to
continue after a time budget ran out; a rung that was cut off resumes from its checkpoint).
Rungs may run in separate processes on the same ``--out`` (``--lengths 10`` in one, ``25`` in
another); each process rewrites the table from every finished rung. Each process a rung runs in
appends a segment to the rung's ``ladder-rung.json`` (code commit, command line, UTC start and
end, load average, CPU and wall seconds), and the table names the commits and budgets. Runs
(checkpoints, models) stay under ``--out``; ``--results`` (default ``--out``) receives the
table, the plot and each rung's ``metrics.json`` and ``training.png``::

    python -m bench.ml_ladder --dataset ml-100k --out /tmp/ladder \
        --results bench/results/ladder-ml-100k
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmat_platform.datasets.commands import resolve_prepared
from lmat_platform.datasets.ratings import TieOrder
from lmat_platform.models.sasrec import SASRecConfig
from lmat_platform.train import (
    EVAL_CELLS,
    METRICS_FILE,
    PLOT_FILE,
    WHOLE_HISTORY,
    TrainConfig,
    train_on_dataset,
)

LENGTHS = (10, 25, 50, 100, 200, WHOLE_HISTORY)
REFERENCE = (50, 64)
"""The ladder's step count an epoch is that of ``max_len`` 50 with 64 windows a batch."""
RUNG_LOG = "ladder-rung.json"
"""One segment per process a rung ran in (see :func:`_segment`)."""
EQUAL_EPOCHS = (5, 10)
"""The ``valid@E`` columns: quality after the same training at every rung."""
STOP_NAMES = {"early_stopping": "patience", "budget": "budget", "epochs": "max epochs",
              "max_steps": "max steps"}


def rung_name(max_len: int) -> str:
    return "whole" if max_len >= WHOLE_HISTORY else str(max_len)


def code_commit() -> str:
    """The commit of the code this process runs (``+dirty`` when ``lmat_platform`` or this file
    differ from it), or ``unknown`` outside a git checkout (pass ``--code-commit`` there)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "lmat_platform", "bench/ml_ladder.py"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _segment(run: Path, seg: dict[str, Any]) -> None:
    """Append (or, same ``pid`` and ``started``, replace) a process segment of ``run``."""
    path = run / RUNG_LOG
    segs = json.loads(path.read_text()) if path.exists() else []
    segs = [x for x in segs if (x["pid"], x["started"]) != (seg["pid"], seg["started"])]
    _write(path, json.dumps(segs + [seg], indent=2))


def windows(prep: Any, stride: int) -> int:
    """Training windows an epoch at ``stride`` (:func:`strided_requests`)."""
    import pyarrow.parquet as pq

    from lmat_platform.datasets.pipeline import strided_requests
    from lmat_platform.datasets.ratings import requests_file

    t = pq.read_table(os.path.join(prep.import_dir, requests_file("train")),
                      columns=["user_id", "request_ts", "request_id"])
    return strided_requests(t, stride).num_rows


def run_ladder(data: str, out: Path, *, lengths: tuple[int, ...] = LENGTHS, epochs: int = 200,
               patience: int = 10, budget_s: float = 14400.0, threads: int = 1,
               tie_order: TieOrder = "hidden", seed: int = 0, lr: float = 1e-3,
               dropout: float = 0.5, rung_budget_s: float | None = None,
               results: Path | None = None, commit: str | None = None,
               eval_cells: int = EVAL_CELLS
               ) -> list[dict[str, Any]]:
    prep = resolve_prepared(data, tie_order=tie_order)
    out.mkdir(parents=True, exist_ok=True)
    results = results or out
    commit = commit or code_commit()
    t0 = time.monotonic()
    ref_len, ref_batch = REFERENCE
    steps = math.ceil(windows(prep, ref_len // 2) / ref_batch)
    for L in lengths:
        model_len = min(L, prep.max_history)
        run = out / f"len-{rung_name(L)}"
        if (run / METRICS_FILE).exists():
            continue
        if budget_s - (time.monotonic() - t0) <= 0:
            logging.warning("budget spent: rung %s not run", rung_name(L))
            continue
        stride = max(1, model_len // 2)
        cfg = TrainConfig(
            epochs=epochs, patience=patience, lr=lr, threads=threads, seed=seed,
            batch_size=max(1, math.ceil(windows(prep, stride) / steps)), checkpoint_every=50,
            time_column="arrival_ts", budget_s=rung_budget_s, eval_cells=eval_cells,
        )
        run.mkdir(parents=True, exist_ok=True)
        seg: dict[str, Any] = {
            "pid": os.getpid(), "commit": commit, "argv": sys.argv, "started": _utc(),
            "eval_cells": eval_cells,
            "rung_budget_s": rung_budget_s, "loadavg_start": os.getloadavg(),
        }
        _segment(run, seg)
        cpu0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        try:
            train_on_dataset(prep, str(run), max_len=L, config=cfg, stride=stride,
                             model=SASRecConfig(n_items=prep.n_items, max_len=model_len,
                                                dropout=dropout))
        except BaseException as e:  # SIGTERM (below) or an error: the next process resumes
            seg["interrupted"] = type(e).__name__
            raise
        finally:
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            seg.update(ended=_utc(), loadavg_end=os.getloadavg(),
                       wall_s=round(time.monotonic() - w0, 1),
                       cpu_s=round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime
                                   - cpu0.ru_stime, 1))
            _segment(run, seg)
        write_outputs(prep.source, collect(out), out, results)
    rows = collect(out)
    write_outputs(prep.source, rows, out, results)
    return rows


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per finished rung under ``out``, shortest first."""
    rows = []
    for L in LENGTHS:
        mpath = out / f"len-{rung_name(L)}" / METRICS_FILE
        if not mpath.exists():
            continue
        m = json.loads(mpath.read_text())
        lpath = mpath.parent / RUNG_LOG
        segs = json.loads(lpath.read_text()) if lpath.exists() else []
        rows.append({
            "max_len": rung_name(L), "model_len": m["model"]["max_len"],
            "epochs": m["epochs_run"], "best_epoch": m.get("best_epoch"),
            "stopped": m["stopped"],
            "stride": m["dataset"]["train_stride"], "batch_size": m["train"]["batch_size"],
            # Older runs' epochs do not carry their count: the run's mean (whole passes).
            "targets_per_epoch": (m["history"][0].get("targets") if m["history"] else None)
            or round(m["targets"] / max(m["epochs_run"], 1)),
            "test": m["test"], "valid": m["valid"],
            "examples_per_s": m["examples_per_s"], "targets_per_s": m["targets_per_s"],
            "data_wait_share": m["data_wait_share"], "train_step_s": m["step_s"],
            "train_s_per_epoch": m["step_s"] / max(m["epochs_run"], 1),
            "valid_ndcg_by_epoch": [h["valid"]["ndcg@10"] for h in m["history"] if "valid" in h],
            "commits": sorted({x["commit"] for x in segs}),
            "budgets_s": [x.get("rung_budget_s") for x in segs],
            "segments": segs,
        })
    return rows


def write_outputs(source: str, rows: list[dict[str, Any]], out: Path,
                  results: Path | None = None) -> None:
    """``ladder.json``, ``ladder.md`` and ``ladder.png`` in ``results`` (default ``out``), and
    each finished rung's metrics and training plot there when ``results`` is not ``out``."""
    results = results or out
    results.mkdir(parents=True, exist_ok=True)
    if results.resolve() != out.resolve():
        for r in rows:
            name = f"len-{r['max_len']}"
            (results / name).mkdir(exist_ok=True)
            for f in (METRICS_FILE, PLOT_FILE, RUNG_LOG):
                if (out / name / f).exists():
                    shutil.copyfile(out / name / f, results / name / f)
    _write(results / "ladder.json", json.dumps({"dataset": source, "rungs": rows}, indent=2))
    _write(results / "ladder.md", table(source, rows))
    tmp = results / f".ladder-{os.getpid()}.png"
    plot(source, rows, tmp)
    os.replace(tmp, results / "ladder.png")


def _or_q(v: Any) -> str:
    return "?" if v is None else str(v)


def _valid_at(row: dict[str, Any], epochs: int | None = None) -> str:
    """Best validation NDCG@10 within the first ``epochs`` (all when None; ``-``: fewer run)."""
    curve = row.get("valid_ndcg_by_epoch") or []
    if epochs is None:
        return f"{max(curve):.4f}" if curve else "-"
    return f"{max(curve[:epochs]):.4f}" if len(curve) >= epochs else "-"


def _load(x: dict[str, Any], key: str) -> str:
    v = x.get(key)
    return "?" if not v else f"{v[0]:.1f}"


def table(source: str, rows: list[dict[str, Any]]) -> str:
    """The ladder as markdown: test quality (full ranking; ``f`` = seen items filtered), how
    each rung stopped (``patience``: early stopping; ``budget``: its time budget, best
    validation epoch tested) after how many epochs, the train seconds an epoch (step time,
    evaluation excluded), throughput and the share of step time spent waiting for data; and,
    as rungs stop after different numbers of epochs, the best validation NDCG@10 over the run
    (``best valid``, the epoch tested) and within the first E epochs (``valid@E``, E in
    :data:`EQUAL_EPOCHS`; ``-`` for a rung that ran fewer). A process segment reconstructed
    from logs (before the process log existed) shows ``?`` for what was not recorded."""
    lines = [
        f"Sequence-length ladder on {source} (test, full ranking; `f` = seen items filtered; "
        "epochs (best) = epochs run (best validation epoch, the one tested); valid@E = best "
        "validation NDCG@10 within the first E epochs, `-` where the rung ran fewer)",
        "",
        "| max_len | HR@10 | NDCG@10 | HR@10 f | NDCG@10 f | stopped by | epochs (best) | "
        "best valid | " + "".join(f"valid@{e} | " for e in EQUAL_EPOCHS)
        + "train s/epoch | windows/step | targets/epoch | windows/s | targets/s | data wait |",
        "|" + " --- |" * (14 + len(EQUAL_EPOCHS)),
    ]
    for r in rows:
        t = r["test"]
        lines.append(
            f"| {r['max_len']} | {t['hr@10']:.4f} | {t['ndcg@10']:.4f} | "
            f"{t['hr@10_filtered']:.4f} | {t['ndcg@10_filtered']:.4f} | "
            f"{STOP_NAMES.get(r['stopped'], r['stopped'])} | {r['epochs']} ({r['best_epoch']}) | "
            f"{_valid_at(r)} | " + "".join(_valid_at(r, e) + " | " for e in EQUAL_EPOCHS) +
            f"{r['train_s_per_epoch']:.0f} | {r['batch_size']} | {r['targets_per_epoch']} | "
            f"{r['examples_per_s']:.0f} | {r['targets_per_s']:.0f} | "
            f"{100 * r['data_wait_share']:.1f}% |"
        )
    segs = [(r["max_len"], x) for r in rows for x in r.get("segments", [])]
    if segs:
        lines += ["", "Processes (a rung cut off by a budget or a kill resumes from its "
                  "checkpoint in the next one):", ""]
        for name, x in segs:
            budget = x.get("rung_budget_s")
            lines.append(
                f"- {name}: {x['started']} to {x.get('ended', '?')}, code {x['commit']}, "
                f"budget {'none' if budget is None else f'{budget:.0f} s'}, "
                f"{_or_q(x.get('wall_s'))} s wall, {_or_q(x.get('cpu_s'))} s CPU, load average "
                f"{_load(x, 'loadavg_start')} -> {_load(x, 'loadavg_end')}: "
                f"`python -m bench.ml_ladder {shlex.join(x['argv'][1:])}`"
                + (f" ({x['interrupted']}, resumed)" if x.get("interrupted") else "")
                + (f" ({x['note']})" if x.get("note") else "")
            )
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(source: str, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    labels = [r["max_len"] for r in rows]
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(14, 3.6))
    for key, style in (("hr@10", "o-"), ("ndcg@10", "s-"), ("hr@10_filtered", "o--"),
                       ("ndcg@10_filtered", "s--")):
        a1.plot(x, [r["test"][key] for r in rows], style, label=key)
    a1.set_xticks(x, labels)
    a1.set_xlabel("tenant max_len")
    a1.set_ylabel("test metric")
    a1.legend(fontsize=7)
    a1.set_title(f"{source}: quality vs history length", fontsize=9)
    for i, r in enumerate(rows):
        if r["stopped"] == "budget":
            a1.annotate("budget", (i, r["test"]["ndcg@10"]), fontsize=7, xytext=(0, -12),
                        textcoords="offset points", ha="center")
    for r in rows:
        curve = r.get("valid_ndcg_by_epoch") or []
        stop = STOP_NAMES.get(r["stopped"], r["stopped"])
        a3.plot(range(len(curve)), curve, "-", lw=1, label=f"{r['max_len']} ({stop})")
    a3.set_xlabel("epoch")
    a3.set_ylabel("validation NDCG@10")
    a3.legend(fontsize=6)
    a3.set_title("validation NDCG@10 per epoch, by max_len", fontsize=9)
    a2.plot(x, [r["examples_per_s"] for r in rows], "o-", label="windows/s")
    a2.plot(x, [r["targets_per_s"] / 10 for r in rows], "s-", label="targets/s / 10")
    a2.set_xticks(x, labels)
    a2.set_xlabel("tenant max_len")
    a2.set_yscale("log")
    a2.legend(fontsize=7)
    a2.set_title("training throughput (CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM ends the process through ``SystemExit``, so the rung's process log records
    the stop; training resumes from the last checkpoint in the next process."""
    raise SystemExit(128 + signum)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--out", required=True, help="run directories (checkpoints, models)")
    p.add_argument("--results", default=None,
                   help="where the table, plot and each rung's metrics go (default: --out)")
    p.add_argument("--code-commit", default=None,
                   help="the commit the code was taken from, for a copy outside git "
                   "(default: git rev-parse HEAD of this checkout)")
    p.add_argument("--lengths", default="10,25,50,100,200,all")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=10,
                   help="epochs without a better validation NDCG@10 before a rung stops")
    p.add_argument("--budget-s", type=float, default=14400.0,
                   help="no new rung starts after this many seconds")
    p.add_argument("--rung-budget-s", type=float, default=None,
                   help="a rung starts no epoch after this many seconds and is tested at its "
                   "best epoch (stopped = budget; 0 tests a cut-off rung's checkpoint at once)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-cells", type=int, default=EVAL_CELLS,
                   help="most attention cells (requests x width squared) an evaluation pass "
                   f"holds (default {EVAL_CELLS:,}: 512 requests at length 50, one at a time "
                   "for the whole history); metrics do not depend on it, memory does")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-order", choices=("hidden", "row"), default="hidden")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, _terminated)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lengths = tuple(WHOLE_HISTORY if s in ("all", "whole") else int(s)
                    for s in a.lengths.split(","))
    run_ladder(a.dataset, Path(a.out), lengths=lengths, epochs=a.epochs, patience=a.patience,
               budget_s=a.budget_s, threads=a.threads, tie_order=a.tie_order, seed=a.seed,
               lr=a.lr, dropout=a.dropout, rung_budget_s=a.rung_budget_s,
               results=Path(a.results) if a.results else None, commit=a.code_commit,
               eval_cells=a.eval_cells)


if __name__ == "__main__":
    main()
