"""The sequence-length ladder on real data: the same next-item model trained with tenant
``max_len`` 10, 25, 50, 100, 200 and the whole history; test quality and training throughput
against length, as a table (``ladder.md``), JSON (``ladder.json``) and a plot (``ladder.png``).

Every rung trains through ``SequenceLoader`` on the platform's thin rows: the ``all``-positions
loss on windows with stride ``max_len / 2`` and ``128 x 50 / max_len`` requests a step. That is
the same work a rung only while users have more than ``max_len`` ratings: a window longer than a
user's history holds just that history, so the long rungs train fewer targets an epoch and a
step (ML-100K: 1.77 targets per training rating an epoch and about 5,100 a step at 50, 1.02 and
about 830 for the whole history; see docs/real_data.md, "Loss"). A rung whose
``metrics.json`` exists is not run again (rerun to continue after a time budget ran out; a rung
that was cut off resumes from its checkpoint)::

    nice python -m bench.ml_ladder --dataset ml-100k --out bench/results/ladder-ml-100k \\
        --epochs 12 --patience 4 --budget-s 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from lmat_platform.datasets.commands import resolve_prepared
from lmat_platform.models.sasrec import SASRecConfig
from lmat_platform.train import METRICS_FILE, WHOLE_HISTORY, TrainConfig, train_on_dataset

LENGTHS = (10, 25, 50, 100, 200, WHOLE_HISTORY)
TOKENS_PER_STEP = 128 * 50


def rung_name(max_len: int) -> str:
    return "whole" if max_len >= WHOLE_HISTORY else str(max_len)


def run_ladder(data: str, out: Path, *, lengths: tuple[int, ...] = LENGTHS, epochs: int = 12,
               patience: int = 4, budget_s: float = 3000.0, threads: int = 1,
               tie_order: str = "hidden", seed: int = 0) -> list[dict[str, Any]]:
    prep = resolve_prepared(data, tie_order=tie_order)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows = []
    for L in lengths:
        model_len = min(L, prep.max_history)
        run = out / f"len-{rung_name(L)}"
        mpath = run / METRICS_FILE
        if not mpath.exists():
            left = budget_s - (time.monotonic() - t0)
            if left <= 0:
                logging.warning("budget spent: rung %s not run", rung_name(L))
                continue
            cfg = TrainConfig(
                epochs=epochs, patience=patience, lr=2e-3, threads=threads, seed=seed,
                batch_size=max(8, TOKENS_PER_STEP // model_len), checkpoint_every=50,
            )
            train_on_dataset(prep, str(run), max_len=L, config=cfg,
                             model=SASRecConfig(n_items=prep.n_items, max_len=model_len))
        m = json.loads(mpath.read_text())
        rows.append({
            "max_len": rung_name(L), "model_len": model_len,
            "epochs": m["epochs_run"], "best_epoch": m.get("best_epoch"),
            "stride": m["dataset"]["train_stride"], "batch_size": m["train"]["batch_size"],
            "test": m["test"], "valid": m["valid"],
            "examples_per_s": m["examples_per_s"], "targets_per_s": m["targets_per_s"],
            "data_wait_share": m["data_wait_share"], "train_step_s": m["step_s"],
        })
        write_outputs(prep.source, rows, out)
    return rows


def write_outputs(source: str, rows: list[dict[str, Any]], out: Path) -> None:
    (out / "ladder.json").write_text(json.dumps({"dataset": source, "rungs": rows}, indent=2))
    lines = [
        f"Sequence-length ladder on {source} (test, full ranking; `f` = seen items filtered)",
        "",
        "| max_len | HR@10 | NDCG@10 | HR@10 f | NDCG@10 f | epochs (best) | requests/s | "
        "targets/s | data wait |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = r["test"]
        lines.append(
            f"| {r['max_len']} | {t['hr@10']:.4f} | {t['ndcg@10']:.4f} | "
            f"{t['hr@10_filtered']:.4f} | {t['ndcg@10_filtered']:.4f} | "
            f"{r['epochs']} ({r['best_epoch']}) | {r['examples_per_s']:.0f} | "
            f"{r['targets_per_s']:.0f} | {100 * r['data_wait_share']:.1f}% |"
        )
    (out / "ladder.md").write_text("\n".join(lines) + "\n")
    plot(source, rows, out / "ladder.png")


def plot(source: str, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    labels = [r["max_len"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("hr@10", "o-"), ("ndcg@10", "s-"), ("hr@10_filtered", "o--"),
                       ("ndcg@10_filtered", "s--")):
        a1.plot(x, [r["test"][key] for r in rows], style, label=key)
    a1.set_xticks(x, labels)
    a1.set_xlabel("tenant max_len")
    a1.set_ylabel("test metric")
    a1.legend(fontsize=7)
    a1.set_title(f"{source}: quality vs history length", fontsize=9)
    a2.plot(x, [r["examples_per_s"] for r in rows], "o-", label="requests/s")
    a2.plot(x, [r["targets_per_s"] / 10 for r in rows], "s-", label="targets/s / 10")
    a2.set_xticks(x, labels)
    a2.set_xlabel("tenant max_len")
    a2.set_yscale("log")
    a2.legend(fontsize=7)
    a2.set_title("training throughput (CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", default="10,25,50,100,200,all")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=3000.0,
                   help="no new rung starts after this many seconds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tie-order", choices=("hidden", "row"), default="hidden")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lengths = tuple(WHOLE_HISTORY if s in ("all", "whole") else int(s)
                    for s in a.lengths.split(","))
    run_ladder(a.dataset, Path(a.out), lengths=lengths, epochs=a.epochs, patience=a.patience,
               budget_s=a.budget_s, threads=a.threads, tie_order=a.tie_order)


if __name__ == "__main__":
    main()
