"""PNG plots of the suite's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PEERS = ("lmat", "fat", "duckdb", "polars", "lance", "naive_delta")
COLORS = {
    "lmat": "#1b7837",
    "fat": "#762a83",
    "duckdb": "#e08214",
    "polars": "#2166ac",
    "lance": "#8c510a",
    "naive_delta": "#b2182b",
}


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def bytes_written(res: dict[str, Any], out: Path) -> str:
    days = res["paper_metrics"]["bytes_written"]["per_day"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = list(range(len(days)))
    w = 0.27
    ax.bar(
        [i - w for i in x],
        [d["fat_bytes"] / 1e6 for d in days],
        w,
        label="fat union",
        color=COLORS["fat"],
    )
    for off, key, label in (
        (0, "thin_bytes", "lmat (streaming thin)"),
        (w, "thin_batch_bytes", "lmat (batch thin)"),
    ):
        uih = [(d["uih_bytes"] + d["heads_bytes"]) / 1e6 for d in days]
        thin = [d[key] / 1e6 for d in days]
        ax.bar(
            [i + off for i in x],
            uih,
            w,
            color=COLORS["lmat"],
            label="lmat UIH + heads" if off == 0 else None,
        )
        ax.bar(
            [i + off for i in x],
            thin,
            w,
            bottom=uih,
            color="#a6dba0" if off == 0 else "#d9f0d3",
            label=label,
        )
    ax.set_xticks(x, [f"day {d['day']}" for d in days])
    ax.set_ylabel("MB written")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.05)
    ax.set_title("Bytes written per training day")
    ax.legend(fontsize=8)
    return _save(fig, out / "bytes_written.png")


def throughput(res: dict[str, Any], out: Path) -> str:
    tenants = res["peers"]["tenants"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(tenants)
    w = 0.8 / len(PEERS)
    for j, p in enumerate(PEERS):
        vals = [tenants[t].get(p, {}).get("examples_per_s") or 0 for t in names]
        ax.bar(
            [i + (j - len(PEERS) / 2 + 0.5) * w for i in range(len(names))],
            vals,
            w,
            label=p,
            color=COLORS[p],
        )
    ax.set_xticks(
        range(len(names)),
        [f"{t}\n(max_len {res['paper_metrics']['tenants'][t]['max_len']})" for t in names],
    )
    ax.set_yscale("log")
    ax.set_ylabel("examples / s")
    ax.set_title("Reader throughput (peers verified equal before timing)")
    ax.legend(fontsize=8, ncol=3)
    return _save(fig, out / "throughput.png")


def bytes_read(res: dict[str, Any], out: Path) -> str:
    tenants = res["paper_metrics"]["tenants"]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(tenants)
    fat = [tenants[t].get("fat", {}).get("bytes_read", 0) / 1e6 for t in names]
    lm = [tenants[t]["lmat"]["bytes_read"] / 1e6 for t in names]
    ax.bar([i - 0.2 for i in range(len(names))], fat, 0.4, label="fat union", color=COLORS["fat"])
    ax.bar([i + 0.2 for i in range(len(names))], lm, 0.4, label="lmat", color=COLORS["lmat"])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("MB read per training pass")
    ax.set_title("Bytes read per pass")
    ax.legend()
    return _save(fig, out / "bytes_read.png")


def scaling(res: dict[str, Any], out: Path) -> str:
    sc = res["scaling"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    h = sc["history"]
    a.plot([r["history"] for r in h], [r["us_per_example"] for r in h], "o-", color=COLORS["lmat"])
    a.set_xscale("log")
    a.set_ylim(bottom=0)
    a.set_xlabel("events per user history")
    a.set_ylabel("us per example")
    a.set_title(f"max_len {sc['tenant']['max_len']}: history grows")
    r = sc["requests"]
    b.plot([x["requests"] for x in r], [x["us_per_example"] for x in r], "o-", color=COLORS["lmat"])
    b.set_xscale("log")
    b.set_ylim(bottom=0)
    b.set_xlabel("requests in the pass")
    b.set_title("requests grow")
    return _save(fig, out / "scaling.png")


def ablations(res: dict[str, Any], out: Path) -> str:
    ab = res["ablations"]
    names = list(ab["affinity"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(names))
    a.bar(
        [i - 0.2 for i in x],
        [ab["affinity"][t]["off"]["examples_per_s"] for t in names],
        0.4,
        label="affinity off",
        color="#bbbbbb",
    )
    a.bar(
        [i + 0.2 for i in x],
        [ab["affinity"][t]["on"]["examples_per_s"] for t in names],
        0.4,
        label="affinity on",
        color=COLORS["lmat"],
    )
    a.set_yscale("log")
    a.set_xticks(list(x), names)
    a.set_ylabel("examples / s")
    a.set_title("Data affinity")
    a.legend(fontsize=8)
    p = ab["prefetch"]
    b.bar(
        [i - 0.2 for i in x],
        [p[t]["with_step"]["off_examples_per_s"] for t in names],
        0.4,
        label="prefetch off",
        color="#bbbbbb",
    )
    b.bar(
        [i + 0.2 for i in x],
        [p[t]["with_step"]["on_examples_per_s"] for t in names],
        0.4,
        label="prefetch on",
        color=COLORS["lmat"],
    )
    b.set_xticks(list(x), names)
    b.set_title("Prefetch (with a simulated training step)")
    b.legend(fontsize=8)
    return _save(fig, out / "ablations.png")


def make_all(res: dict[str, Any], out: Path) -> list[str]:
    """Every plot; returns the file names written under ``out``."""
    return [f(res, out) for f in (bytes_written, throughput, bytes_read, scaling, ablations)]
