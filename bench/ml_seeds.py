"""Seeds of one training configuration on real data: run ``lmat train`` once per seed (or collect
finished runs) and tabulate each seed's test HR@10 / NDCG@10, with and without seen-item
filtering, and their mean and standard error over seeds (``seeds.md``, ``seeds.json``).

Every run must share the configuration (model, tenant, training settings other than the seed,
data set, tie order and training stride); runs that differ are refused, so a table never mixes
recipes. The table reports every seed and the mean, never a best seed. Validation NDCG@10 (the
early-stopping criterion, the only figure settings may be chosen by) is in the table too::

    python -m bench.ml_seeds --out /tmp/seeds-row --seeds 2020,1,2 --parallel 2 \\
        -- ml-100k --tie-order row --max-len 50 --threads 1
    python -m bench.ml_seeds --out DIR --collect RUN_DIR [RUN_DIR ...]   # finished runs only

A seed's run directory is ``OUT/seed-S``; one whose ``metrics.json`` exists is not run again,
and one cut off resumes from its checkpoint (``lmat train`` resumes), so rerunning the same line
continues. ``--nice N`` runs every training under ``nice -n N``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmat_platform.exceptions import InputFileError

METRICS_FILE = "metrics.json"
KEYS = ("hr@10", "ndcg@10", "hr@10_filtered", "ndcg@10_filtered")
IGNORED_TRAIN = ("seed", "budget_s", "checkpoint_every", "num_workers", "threads", "device",
                 "max_steps", "eval_batch_size", "eval_cells")
"""Training settings that may differ between seeds of one configuration (they do not change
what is trained, or only the seed does)."""

log = logging.getLogger("bench.ml_seeds")


def configuration(m: dict[str, Any]) -> dict[str, Any]:
    """What a run's ``metrics.json`` says it trained, less the seed and run-control settings."""
    from dataclasses import asdict

    from lmat_platform.train import TrainConfig

    ds = m.get("dataset", {})
    train = {**asdict(TrainConfig()), **m["train"]}  # settings newer than the run: defaults
    return {
        "model": m["model"],
        "tenant": m["tenant"],
        "train": {k: v for k, v in train.items() if k not in IGNORED_TRAIN},
        "dataset": {k: ds.get(k) for k in ("source", "tie_order", "users", "train_stride",
                                           "items")},
    }


def seed_row(m: dict[str, Any], run: str) -> dict[str, Any]:
    return {
        "run": run, "seed": m["train"]["seed"], "epochs": m["epochs_run"],
        "best_epoch": m.get("best_epoch"), "stopped": m["stopped"],
        "valid_ndcg@10": m["valid"]["ndcg@10"], "test": {k: m["test"][k] for k in KEYS},
        "data_wait_share": m["data_wait_share"], "examples_per_s": m["examples_per_s"],
    }


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed rows and mean / standard error over seeds of finished runs' metrics
    (``{run_dir: metrics}``); raises ``InputFileError`` if they do not share one configuration
    or two runs share a seed."""
    if not runs:
        raise InputFileError("no finished run (metrics.json) to summarize")
    items = sorted(runs.items(), key=lambda kv: kv[1]["train"]["seed"])
    first_run, first = items[0]
    ref = configuration(first)
    seeds: set[int] = set()
    for run, m in items:
        if "test" not in m or "valid" not in m:
            raise InputFileError(f"{run}/{METRICS_FILE}: no test or valid metrics")
        cfg = configuration(m)
        if cfg != ref:
            diff = sorted(f"{part}.{k}" for part in ref for k in set(ref[part]) | set(cfg[part])
                          if ref[part].get(k) != cfg[part].get(k))
            raise InputFileError(f"{run}/{METRICS_FILE}: configuration differs from "
                                 f"{first_run} in {', '.join(diff)}")
        if m["train"]["seed"] in seeds:
            raise InputFileError(f"{run}/{METRICS_FILE}: seed {m['train']['seed']} appears twice")
        seeds.add(m["train"]["seed"])
    rows = [seed_row(m, run) for run, m in items]
    n = len(rows)

    def stats(values: list[float]) -> dict[str, float]:
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n) if n > 1 else math.nan,
                "min": min(values), "max": max(values)}

    agg = {k: stats([r["test"][k] for r in rows]) for k in KEYS}
    agg["valid_ndcg@10"] = stats([r["valid_ndcg@10"] for r in rows])
    agg["data_wait_share"] = stats([r["data_wait_share"] for r in rows])
    return {"configuration": ref, "seeds": [r["seed"] for r in rows], "rows": rows, "mean": agg}


def markdown(s: dict[str, Any], title: str) -> str:
    lines = [
        title, "",
        "| seed | epochs (best), stop | valid NDCG@10 | HR@10 | NDCG@10 | HR@10 f | NDCG@10 f "
        "| data wait |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in s["rows"]:
        t = r["test"]
        lines.append(
            f"| {r['seed']} | {r['epochs']} ({r['best_epoch']}), {r['stopped']} | "
            f"{r['valid_ndcg@10']:.4f} | " + " | ".join(f"{t[k]:.4f}" for k in KEYS)
            + f" | {100 * r['data_wait_share']:.1f}% |")
    a = s["mean"]
    lines.append(
        f"| **mean of {len(s['rows'])}** | | {a['valid_ndcg@10']['mean']:.4f} | "
        + " | ".join(f"**{a[k]['mean']:.4f}**" for k in KEYS)
        + f" | {100 * a['data_wait_share']['mean']:.1f}% |")
    lines.append(
        "| standard error | | " + " | ".join(f"{a[k]['se']:.4f}" for k in ("valid_ndcg@10",) + KEYS)
        + " | |")
    c = s["configuration"]
    lines += ["", f"Configuration: model {json.dumps(c['model'])}; tenant "
              f"{json.dumps(c['tenant'])}; training {json.dumps(c['train'])}; data "
              f"{json.dumps(c['dataset'])}."]
    return "\n".join(lines) + "\n"


def load_runs(dirs: list[str]) -> dict[str, dict[str, Any]]:
    runs = {}
    for d in dirs:
        path = os.path.join(d, METRICS_FILE)
        if not os.path.exists(path):
            raise InputFileError(f"{path}: no such file (is the run finished?)")
        with open(path) as f:
            runs[d] = json.load(f)
    return runs


def run_seeds(out: Path, seeds: list[int], train_args: list[str], *, parallel: int = 1,
              nice: int | None = None) -> list[str]:
    """Run ``lmat train TRAIN_ARGS --out OUT/seed-S --seed S`` for every seed without a
    ``metrics.json``, at most ``parallel`` at a time; the run directories of all seeds."""
    if any(a == "--seed" or a.startswith("--seed=") or a == "--out" or a.startswith("--out=")
           for a in train_args):
        raise InputFileError("train arguments: leave --seed and --out to bench.ml_seeds")
    dirs = [str(out / f"seed-{s}") for s in seeds]
    todo = [(s, d) for s, d in zip(seeds, dirs, strict=True)
            if not os.path.exists(os.path.join(d, METRICS_FILE))]
    running: list[tuple[int, subprocess.Popen[bytes], Any]] = []
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            s, d = todo.pop(0)
            os.makedirs(d, exist_ok=True)
            cmd = ([] if nice is None else ["nice", "-n", str(nice)]) + [
                sys.executable, "-m", "lmat_platform.cli", "-v", "train", *train_args,
                "--out", d, "--seed", str(s)]
            log.info("seed %d: %s", s, " ".join(cmd))
            logf = open(os.path.join(d, "train.log"), "ab")  # noqa: SIM115 - closed below
            running.append((s, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT),
                            logf))
        time.sleep(2)
        for entry in list(running):
            s, proc, logf = entry
            if proc.poll() is not None:
                logf.close()
                running.remove(entry)
                log.info("seed %d finished: exit %d", s, proc.returncode)
                if proc.returncode != 0:
                    failed.append(s)
    if failed:
        raise InputFileError(f"seeds {failed}: lmat train failed (see OUT/seed-S/train.log)")
    return dirs


def write_summary(out: Path, s: dict[str, Any], title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(s, indent=2))
    (out / "seeds.md").write_text(markdown(s, title))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the seeds' runs and the table")
    p.add_argument("--seeds", default="2020,1,2", help="comma-separated seeds (default 2020,1,2)")
    p.add_argument("--parallel", type=int, default=1, help="trainings at a time (default 1)")
    p.add_argument("--nice", type=int, default=None, help="run each training under nice -n N")
    p.add_argument("--collect", nargs="+", default=None, metavar="RUN_DIR",
                   help="summarize these finished runs instead of training")
    p.add_argument("--title", default=None, help="the table's heading line")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(a.out)
    try:
        if a.collect:
            if train_args:
                raise InputFileError("--collect takes no train arguments after --")
            dirs = a.collect
        else:
            if not train_args:
                raise InputFileError("give lmat train's arguments after --, e.g. "
                                     "-- ml-100k --tie-order row --threads 1")
            try:
                seeds = [int(v) for v in a.seeds.split(",")]
            except ValueError:
                raise InputFileError(f"--seeds: expected integers, but got {a.seeds!r}") from None
            if a.parallel < 1:
                raise InputFileError(f"--parallel: must be >= 1, but got {a.parallel}")
            dirs = run_seeds(out, seeds, train_args, parallel=a.parallel, nice=a.nice)
        s = summarize(load_runs(dirs))
    except InputFileError as e:
        print(f"ml_seeds: error: {e}", file=sys.stderr)
        return 2
    ds = s["configuration"]["dataset"]
    title = a.title or (f"{os.path.basename(str(ds['source']))}, ties {ds['tie_order']}: "
                        f"test metrics over {len(s['rows'])} seeds (full ranking; f = seen "
                        "items filtered)")
    write_summary(out, s, title)
    print(markdown(s, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
