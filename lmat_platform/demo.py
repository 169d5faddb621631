"""``lmat demo``: the whole flow on generated data in a fresh local store.

Generates a workload, ingests it day by day with a snapshot each day, logs every day's requests
on the streaming path as they happen and all of them again on the batch path, compacts the tier,
materializes two tenants from both paths, checks them against each other and against the naive
reference, and compares thin-row storage with fat rows.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from lmat_platform import synth
from lmat_platform.exceptions import LmatError
from lmat_platform.fatrows import write_fat_rows
from lmat_platform.protocol.thin import write_thin
from lmat_platform.reconstruct import materialize
from lmat_platform.store import (
    compact_buckets,
    disk_bytes,
    ingest_files,
    init_store,
    list_snapshots,
    live_bytes,
)
from lmat_platform.store.ingest import REASONS
from lmat_platform.store.snapshots import publish_snapshot
from lmat_platform.tenants import load_tenants
from lmat_platform.validate import check_leakage, compare_outputs, reference_sequences

log = logging.getLogger(__name__)

MARKER = ".lmat-demo"
HOUR_US = 3600 * 1_000_000

DEMO_TENANTS = {
    "tenants": [
        {"name": "retrieval", "columns": ["item_id", "action", "event_id"], "max_len": 256,
         "actions": [1, 2]},
        {"name": "ranking", "columns": ["item_id", "action", "event_ts", "event_id", "dwell_ms"],
         "max_len": 2048, "window_days": 365},
    ]
}

SCALES = {
    "tiny": dict(n_users=60, events_per_day=3_000, requests_per_day=300),
    "small": dict(n_users=500, events_per_day=40_000, requests_per_day=4_000),
    "medium": dict(n_users=5_000, events_per_day=400_000, requests_per_day=40_000),
}


def _fresh_dir(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).exists():
            raise LmatError(f"{root}: exists and was not made by 'lmat demo'; pick another --dir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by lmat demo; safe to delete\n")


def run_demo(
    root: str | os.PathLike[str] = "lmat-demo",
    *,
    scale: str = "small",
    days: int = 4,
    seed: int = 0,
    n_buckets: int = 16,
    snapshot_hours: int = 4,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo into ``root`` (recreated if a previous demo made it); returns the summary."""
    if scale not in SCALES:
        raise LmatError(f"--scale: unknown scale '{scale}' (choose from {', '.join(SCALES)})")
    if snapshot_hours < 1 or 24 % snapshot_hours:
        raise LmatError(f"--snapshot-hours: must divide 24, but got {snapshot_hours}")
    if days < 2:
        raise LmatError(f"--days: need at least 2 days, but got {days}")
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    root_p = Path(root).absolute()
    _fresh_dir(root_p)
    cfg = synth.WorkloadConfig(seed=seed, days=days, **SCALES[scale])  # type: ignore[arg-type]
    say(f"generating {days} days of events and requests ({scale})")
    wl = synth.write_workload(cfg, root_p / "landing", progress=say)
    store_dir = str(root_p / "store")
    store = init_store(store_dir, n_buckets=n_buckets, row_group_rows=2048)
    thin_log = str(root_p / "thin" / "log")
    thin_batch = str(root_p / "thin" / "examples")
    totals: dict[str, Any] = {"accepted": 0, "duplicates": 0,
                              "quarantined": {r: 0 for r in REASONS}}
    for d, (ef, rf) in enumerate(zip(wl.event_files, wl.request_files, strict=True)):
        res = ingest_files(store, [str(ef)])
        totals["accepted"] += res.accepted
        totals["duplicates"] += res.duplicates
        for r, n in res.quarantined.items():
            totals["quarantined"][r] += n
        # Snapshots every few hours, each published a few minutes after its watermark; serving
        # logs each request against the newest snapshot published by its time.
        start, end = synth.day_bounds(cfg, d)
        for w in range(start + snapshot_hours * HOUR_US, end + 1, snapshot_hours * HOUR_US):
            publish_snapshot(store, w, published_at=w + 10 * 60 * 1_000_000)
        write_thin(store, str(rf), thin_log, path="log")
        say(f"day {d + 1}/{days}: ingested {res.accepted:,} events, published snapshots, "
            f"logged {pq.read_metadata(str(rf)).num_rows:,} requests")
    say("backfilling every request on the batch path")
    all_req = pa.concat_tables([pq.read_table(str(p)) for p in wl.request_files])
    req_all_path = str(root_p / "landing" / "requests-all.parquet")
    pq.write_table(all_req, req_all_path)
    write_thin(store, req_all_path, thin_batch, path="examples")
    say("compacting the UIH tier")
    compact_buckets(store)

    tenants_path = str(root_p / "tenants.yaml")
    with open(tenants_path, "w") as f:
        yaml.safe_dump(DEMO_TENANTS, f, sort_keys=False)
    tenants = load_tenants(tenants_path)
    raw = store.read_table("raw")
    assert raw is not None
    rng = np.random.default_rng(seed)
    sample = all_req.take(pa.array(np.sort(rng.choice(all_req.num_rows,
                                                      min(300, all_req.num_rows), replace=False))))
    parity: dict[str, Any] = {}
    out_dir = root_p / "materialized"
    out_dir.mkdir()
    for name, tenant in tenants.items():
        say(f"materializing tenant '{name}' from both paths")
        outs = {}
        for path_name, thin in (("streaming", thin_log), ("batch", thin_batch)):
            out = str(out_dir / f"{name}-{path_name}.parquet")
            materialize(store, thin, tenant, out)
            outs[path_name] = pq.read_table(out)
        both = compare_outputs(outs["streaming"], outs["batch"], name="streaming_vs_batch")
        sample_ids = pa.array(sample.column("request_id"))
        got = outs["streaming"].filter(pads.field("request_id").isin(sample_ids))
        ref = compare_outputs(got, reference_sequences(raw, sample, tenant), name="vs_reference")
        leak = check_leakage(outs["streaming"], raw, tenant)
        parity[name] = {
            "streaming_vs_batch": both.ok,
            "vs_reference_sample": ref.ok,
            "future_leakage": leak.counts.get("future_leakage", 0),
            "ok": both.ok and ref.ok and leak.ok,
            "events": int(pc.sum(outs["streaming"].column("length")).as_py() or 0),
        }
    say("writing fat rows for the union of tenants (the baseline)")
    fat = write_fat_rows(store, all_req, list(tenants.values()), str(root_p / "fat_union.parquet"))
    sizes = live_bytes(store)
    on_disk = disk_bytes(store)
    thin_bytes = {p: _dir_bytes(Path(p)) for p in (thin_log, thin_batch)}
    summary = {
        "store": store_dir,
        "days": days,
        "scale": scale,
        "events_generated": wl.n_events,
        "requests": all_req.num_rows,
        "accepted": totals["accepted"],
        "duplicates": totals["duplicates"],
        "quarantined": totals["quarantined"],
        "snapshots": len(list_snapshots(store)),
        "bytes_live": sizes,
        "bytes_on_disk": on_disk,
        "uih_bytes": sizes["uih"],
        "thin_bytes_streaming": thin_bytes[thin_log],
        "thin_bytes_batch": thin_bytes[thin_batch],
        "fat_union_bytes": fat["bytes"],
        "fat_over_thin_plus_uih": round(int(str(fat["bytes"])) / max(1, thin_bytes[thin_batch] + sizes["uih"]), 2),
        "parity": parity,
        "ok": all(p["ok"] for p in parity.values()),
        "tenants_file": tenants_path,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return summary


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def format_summary(s: dict[str, Any]) -> str:
    """A readable multi-line summary of :func:`run_demo`'s result."""
    mb = 1 / 1e6
    q = s["quarantined"]
    lines = [
        f"lmat demo: {s['days']} simulated days, scale {s['scale']}, store {s['store']}",
        f"  events generated   {s['events_generated']:>12,}",
        f"  accepted           {s['accepted']:>12,}",
        f"  duplicates dropped {s['duplicates']:>12,}",
        "  quarantined        "
        + ", ".join(f"{k} {v:,}" for k, v in q.items()),
        f"  snapshots          {s['snapshots']:>12,}",
        f"  requests           {s['requests']:>12,}",
        "  live table bytes   "
        + ", ".join(f"{k} {v * mb:.2f} MB" for k, v in s["bytes_live"].items() if v),
        f"  bytes on disk      {sum(s['bytes_on_disk'].values()) * mb:.2f} MB "
        "(including files awaiting vacuum)",
        f"  thin rows          streaming {s['thin_bytes_streaming'] * mb:.2f} MB, "
        f"batch {s['thin_bytes_batch'] * mb:.2f} MB",
        f"  fat rows (union)   {s['fat_union_bytes'] * mb:.2f} MB = "
        f"{s['fat_over_thin_plus_uih']}x (batch thin rows + UIH tier)",
    ]
    for name, p in s["parity"].items():
        lines.append(
            f"  tenant {name:<10} streaming==batch {p['streaming_vs_batch']}, "
            f"==reference {p['vs_reference_sample']}, future leakage {p['future_leakage']}, "
            f"events {p['events']:,}"
        )
    lines.append(f"  {'OK' if s['ok'] else 'FAILED'} in {s['seconds']} s")
    return "\n".join(lines)
