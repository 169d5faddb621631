"""Deduplicated (RecD) batches against plain ones (issue 16), on the suite's standard 3-tenant
workload (:mod:`bench.workload`): bytes a batch moves and examples/s.

Run on demand::

    python -m bench.recd                     # default scale (builds the workload in TMPDIR: minutes)
    python -m bench.recd --workdir DIR       # reuse a workload built there (bench.cold_pass's)
    python -m bench.recd --scale tiny        # seconds (tests/test_recd_bench.py, bench marker)

For each tenant and format (``SequenceLoader(dedup=False | True)``) a fresh subprocess reads the
streaming thin table: one untimed pass (start-up), then ``--reps`` timed passes, the median
kept; the formats alternate round by round (``--rounds``, median over rounds) so the machine's
noise falls on both. Two cache settings: ``cold`` (``LMAT_DECODE_CACHE_MB=0``: every pass
decodes, checks and plans its rows again) and ``warm`` (the decoded cache on: later passes of
one process). Per batch: ``Batch.nbytes`` (every tensor of the batch: what moves to the trainer
process or the accelerator), the sequences it holds and the values of its columns. Both formats
are checked to yield the same requests, and every deduplicated batch to expand to the plain one
(first round). Writes ``--out`` (JSON) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.recd")

ROOT = Path(__file__).resolve().parent.parent
BATCH = 512
MODES = {"cold": {"LMAT_DECODE_CACHE_MB": "0"}, "warm": {}}


def child(store: str, thin: str, tenant: str, dedup: bool, reps: int, check: bool) -> dict[str, Any]:
    """One loader's passes: examples/s and bytes per batch (run in a fresh process)."""
    import torch

    from bench.workload import TENANTS
    from lmat_platform.reader import SequenceLoader

    t = next(x for x in TENANTS if x.name == tenant)
    loader = SequenceLoader(store, thin, tenant=t, batch_size=BATCH, dedup=dedup)
    plain = SequenceLoader(store, thin, tenant=t, batch_size=BATCH) if check and dedup else None
    nbytes = seqs = values = batches = examples = 0
    ids: list[int] = []
    for b in loader:  # start-up pass: sizes, and the check against the plain format
        nbytes += b.nbytes
        seqs += b.num_sequences
        values += sum(v.numel() for v in b.values.values())
        batches += 1
        examples += len(b)
        ids.append(int(b.request_id.sum()))
    if plain is not None:
        for a, b in zip(plain, loader, strict=True):
            e = b.expand()
            if not (torch.equal(a.request_id, e.request_id) and torch.equal(a.lengths, e.lengths)
                    and all(torch.equal(a.values[c], e.values[c]) for c in a.values)):
                raise AssertionError(f"tenant {tenant}: a deduplicated batch differs from the plain")
    secs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        n = sum(len(b) for b in loader)
        secs.append(time.perf_counter() - t0)
        if n != examples:
            raise AssertionError(f"tenant {tenant}: {n} examples in a pass, {examples} in the first")
    loader.close()
    med = statistics.median(secs)
    return {
        "examples": examples, "batches": batches, "seconds": med,
        "all_seconds": [round(s, 4) for s in secs], "examples_per_s": examples / med,
        "bytes_per_batch": nbytes / max(batches, 1), "sequences_per_batch": seqs / max(batches, 1),
        "values_per_batch": values / max(batches, 1), "request_id_sum": sum(ids),
    }


def _run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.recd", "--child", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env})
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def build(work: Path, scale: str) -> dict[str, Any]:
    """The workload's store and streaming thin table (built unless ``work`` holds them)."""
    from bench.workload import SCALES, build_union_workload

    if (work / "store").is_dir() and (work / "thin").is_dir():
        return {"store": str(work / "store"), "thin": str(work / "thin"), "built": False}
    b = build_union_workload(work, SCALES[scale])
    return {"store": b.store, "thin": b.thin, "built": True}


def run(work: Path, scale: str, rounds: int, reps: int, modes: list[str]) -> dict[str, Any]:
    from bench.workload import TENANTS

    setup = build(work, scale)
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for mode in modes:
        for t in TENANTS:
            per = runs.setdefault(mode, {}).setdefault(t.name, {"plain": [], "dedup": []})
            for r in range(rounds):
                for fmt in ("plain", "dedup") if r % 2 == 0 else ("dedup", "plain"):
                    args = [setup["store"], setup["thin"], t.name, str(fmt == "dedup"), str(reps),
                            str(r == 0)]
                    per[fmt].append(_run_child(args, MODES[mode]))
                    log.info("%s %s %s round %d: %.0f examples/s", mode, t.name, fmt, r,
                             per[fmt][-1]["examples_per_s"])
    table: dict[str, dict[str, Any]] = {}
    for mode, by_t in runs.items():
        for name, by_f in by_t.items():
            row: dict[str, Any] = {}
            for fmt, rs in by_f.items():
                row[fmt] = {k: statistics.median(x[k] for x in rs)
                            for k in ("examples_per_s", "bytes_per_batch",
                                      "sequences_per_batch", "values_per_batch")}
                row[fmt]["examples"] = rs[0]["examples"]
            if by_f["plain"][0]["request_id_sum"] != by_f["dedup"][0]["request_id_sum"]:
                raise AssertionError(f"{name}: the formats served different requests")
            row["bytes_ratio"] = row["dedup"]["bytes_per_batch"] / row["plain"]["bytes_per_batch"]
            row["speed_ratio"] = row["dedup"]["examples_per_s"] / row["plain"]["examples_per_s"]
            table.setdefault(mode, {})[name] = row
    return {"scale": scale, "workdir": str(work), "batch_size": BATCH, "rounds": rounds,
            "reps": reps, "cpu_count": os.cpu_count(), "results": table, "runs": runs,
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(res: dict[str, Any]) -> str:
    """The README table of a :func:`run` result."""
    lines = [
        f"| cache | tenant | plain: KB/batch | dedup: KB/batch | dedup/plain bytes | "
        f"sequences per {res['batch_size']}-request batch | plain ex/s | dedup ex/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, by_t in res["results"].items():
        for name, r in by_t.items():
            p, d = r["plain"], r["dedup"]
            lines.append(
                f"| {mode} | {name} | {p['bytes_per_batch'] / 1024:,.0f} | "
                f"{d['bytes_per_batch'] / 1024:,.0f} | {r['bytes_ratio']:.2f}x | "
                f"{d['sequences_per_batch']:.0f} | {p['examples_per_s'] / 1e3:.1f}K | "
                f"{d['examples_per_s'] / 1e3:.1f}K |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="default", help="bench.workload scale (tiny|default|large)")
    p.add_argument("--workdir", default=None, help="where the workload is (or is built)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "recd.json"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="cold,warm", help="comma-separated: cold, warm")
    p.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        store, thin, tenant, dedup, reps, check = a.child
        print(json.dumps(child(store, thin, tenant, dedup == "True", int(reps), check == "True")))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(a.workdir or Path(tempfile.gettempdir()) / f"lmat-recd-{a.scale}")
    res = run(work, a.scale, a.rounds, a.reps, [m for m in a.modes.split(",") if m])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
