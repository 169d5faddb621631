"""``lmat demo``: the whole flow on generated data in a fresh local store.

Generates a workload, ingests it day by day with a snapshot every few hours, logs every day's
requests on the streaming path as they happen and all of them again on the batch path, compacts
the tier, materializes two tenants from both paths, checks them against each other and against
the naive reference, and compares every byte the store and each path's thin rows keep with fat
rows.

What it leaves in its folder (``lmat-demo`` by default; ``lmat ui`` serves it)::

    lmat-demo/
      store/                          the lmat store (raw log, UIH tier, heads, snapshots, ...)
      thin/log/                       thin rows of the streaming path (pointer + tail)
      thin/examples/                  thin rows of the batch path (pointer only)
      tenants.yaml                    the two tenants, retrieval and ranking
      landing/events/DATE.parquet     the generated event files, one per day
      landing/requests/DATE.parquet   the generated request files
      requests-all.parquet            every request (the batch path's input)
      materialized/TENANT-PATH.parquet  each tenant's sequences from each path
      fat_union.parquet               the fat-row baseline at the union of the tenants
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
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
from lmat_platform.ui import DEMO_MARKER, land_workload
from lmat_platform.validate import check_leakage, compare_outputs, reference_sequences

log = logging.getLogger(__name__)

MARKER = DEMO_MARKER
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
    # Landed as `lmat ui`'s Dagster assets expect them (LANDING/events/DATE.parquet), so the UI
    # can serve this very store: re-ingesting a landed file there is a no-op.
    landing = root_p / "landing"
    day_keys = land_workload(cfg, landing, progress=say)
    event_files = [landing / "events" / f"{k}.parquet" for k in day_keys]
    request_files = [landing / "requests" / f"{k}.parquet" for k in day_keys]
    n_events = sum(pq.read_metadata(str(p)).num_rows for p in event_files)
    store_dir = str(root_p / "store")
    store = init_store(store_dir, n_buckets=n_buckets, row_group_rows=2048)
    thin_log = str(root_p / "thin" / "log")
    thin_batch = str(root_p / "thin" / "examples")
    totals: dict[str, Any] = {"accepted": 0, "duplicates": 0,
                              "quarantined": {r: 0 for r in REASONS}}
    for d, (ef, rf) in enumerate(zip(event_files, request_files, strict=True)):
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
    all_req = pa.concat_tables([pq.read_table(str(p)) for p in request_files])
    req_all_path = str(root_p / "requests-all.parquet")
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
    fat_bytes = int(str(fat["bytes"]))
    summary = {
        "dir": str(root_p),
        "store": store_dir,
        "thin_log": thin_log,
        "thin_examples": thin_batch,
        "tenants_file": tenants_path,
        "landing": str(landing),
        "days": days,
        "first_day": day_keys[0],
        "last_day": day_keys[-1],
        "scale": scale,
        "events_generated": n_events,
        "requests": all_req.num_rows,
        "accepted": totals["accepted"],
        "duplicates": totals["duplicates"],
        "quarantined": totals["quarantined"],
        "snapshots": len(list_snapshots(store)),
        "storage": storage_accounting(store, store_dir, thin_log, thin_batch, fat_bytes),
        "parity": parity,
        "ok": all(p["ok"] for p in parity.values()),
        "reader_command": reader_command(store_dir, thin_batch, tenants_path, "ranking"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return summary


def storage_accounting(
    store: Any, store_dir: str, thin_log: str, thin_batch: str, fat_bytes: int
) -> dict[str, Any]:
    """Every byte each path keeps, against the fat rows.

    A path keeps the whole store (raw log, quarantine, ingest records, UIH tier, heads, snapshot
    registry, and anything else under the store's folder) plus its own thin rows. ``on_disk``
    counts every file there now, including those a compaction replaced and vacuum has not yet
    removed; ``live`` counts only the files the tables' latest versions reference (what is left
    after vacuum). The fat rows are one file, counted whole.
    """
    tables_disk = disk_bytes(store)
    tables_live = live_bytes(store)
    store_disk = _dir_bytes(Path(store_dir))
    other = store_disk - sum(tables_disk.values())  # _lmat.json, locks, new tables
    thin_disk = {"streaming": _dir_bytes(Path(thin_log)), "batch": _dir_bytes(Path(thin_batch))}
    thin_live = {"streaming": _delta_live_bytes(thin_log), "batch": _delta_live_bytes(thin_batch)}
    store_live = sum(tables_live.values()) + other
    paths = {}
    for name in ("streaming", "batch"):
        disk = store_disk + thin_disk[name]
        live = store_live + thin_live[name]
        paths[name] = {
            "store_bytes": store_disk,
            "thin_bytes": thin_disk[name],
            "total_bytes": disk,
            "fat_over_total": round(fat_bytes / max(1, disk), 2),
            "live_total_bytes": live,
            "fat_over_live_total": round(fat_bytes / max(1, live), 2),
        }
    return {
        "store_tables_on_disk": tables_disk | {"other": other},
        "store_tables_live": tables_live,
        "store_on_disk": store_disk,
        "thin_on_disk": thin_disk,
        "fat_union_bytes": fat_bytes,
        "paths": paths,
    }


def reader_command(store: str, thin: str, tenants_file: str, tenant: str) -> str:
    """A shell line that reads the first batch of ``thin`` for ``tenant`` with SequenceLoader."""
    q = json.dumps  # double-quoted literals, so the shell's single quotes wrap the code cleanly
    code = (
        "import lmat_platform as lmat; "
        f"t = lmat.load_tenants({q(tenants_file)})[{q(tenant)}]; "
        f"loader = lmat.SequenceLoader({q(store)}, {q(thin)}, tenant=t, batch_size=512); "
        "b = next(iter(loader)); "
        'print(len(b.request_id), "requests; lengths", b.lengths[:8].tolist(), '
        '"first items", b.values["item_id"][:8].tolist())'
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def ui_command(demo_dir: str) -> str:
    """The ``lmat ui`` line that serves a demo folder (no option for ``./lmat-demo``)."""
    if Path(demo_dir) == Path.cwd() / "lmat-demo":
        return "lmat ui"
    return f"lmat ui --demo {shlex.quote(demo_dir)}"


def _delta_live_bytes(uri: str) -> int:
    from deltalake import DeltaTable

    t = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    return int(pc.sum(t.column("size_bytes")).as_py() or 0) if t.num_rows else 0


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def format_summary(s: dict[str, Any]) -> str:
    """A readable multi-line summary of :func:`run_demo`'s result, ending with where things are
    and a line that reads them."""
    mb = 1 / 1e6
    q = s["quarantined"]
    st = s["storage"]
    lines = [
        f"lmat demo: {s['days']} simulated days ({s['first_day']} to {s['last_day']}), "
        f"scale {s['scale']}",
        f"  events generated   {s['events_generated']:>12,}",
        f"  accepted           {s['accepted']:>12,}",
        f"  duplicates dropped {s['duplicates']:>12,}",
        "  quarantined        " + ", ".join(f"{k} {v:,}" for k, v in q.items()),
        f"  snapshots          {s['snapshots']:>12,}",
        f"  requests           {s['requests']:>12,}",
        "  store on disk      "
        + ", ".join(f"{k} {v * mb:.2f}" for k, v in st["store_tables_on_disk"].items() if v)
        + f" = {st['store_on_disk'] * mb:.2f} MB",
        f"  fat rows (union)   {st['fat_union_bytes'] * mb:.2f} MB, against every byte a path "
        "keeps (the whole store + its thin rows):",
    ]
    for name, p in st["paths"].items():
        lines.append(
            f"    {name + ' path':<15} {p['store_bytes'] * mb:.2f} + thin {p['thin_bytes'] * mb:.2f}"
            f" = {p['total_bytes'] * mb:.2f} MB -> fat is {p['fat_over_total']}x "
            f"({p['fat_over_live_total']}x once vacuum removes replaced files)"
        )
    for name, p in s["parity"].items():
        lines.append(
            f"  tenant {name:<10} streaming==batch {p['streaming_vs_batch']}, "
            f"==reference {p['vs_reference_sample']}, future leakage {p['future_leakage']}, "
            f"events {p['events']:,}"
        )
    lines += [
        f"  {'OK' if s['ok'] else 'FAILED'} in {s['seconds']} s",
        "",
        "Where things are:",
        f"  store                  {s['store']}",
        f"  thin rows, streaming   {s['thin_log']}",
        f"  thin rows, batch       {s['thin_examples']}",
        f"  tenants file           {s['tenants_file']}   (tenants: {', '.join(s['parity'])})",
        f"  landed files           {s['landing']}",
        "Read the first batch of tenant 'ranking' (paste into a shell):",
        f"  {s['reader_command']}",
        f"Browse it in the Dagster UI: {ui_command(s['dir'])}",
    ]
    return "\n".join(lines)
