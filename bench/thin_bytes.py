"""Where a thin table's bytes go (issue 16: streaming tails against batch rows).

Reads the Parquet footers of every live file of one or more thin tables (Delta) and prints the
compressed bytes each column costs per request, the file bytes per request, and for a
streaming table how many tail events it stores per request (each user's tail once per file,
thin format 2) with the bytes each stored event costs per field. Nothing is decoded but the
``tail_item_id`` list lengths.

Run on demand, e.g. on the demo's two paths::

    lmat demo --dir /tmp/demo
    python -m bench.thin_bytes /tmp/demo/thin/log /tmp/demo/thin/examples
    python -m bench.thin_bytes /tmp/demo/thin/log /tmp/other/thin/log --decode item_id,action

``--decode COLS``: also the CPU seconds a reader spends decoding each table's thin files and
flattening the stored tails of the event columns ``COLS`` (what a cache-off pass's
``thin_read`` and ``thin_tails`` do, every bucket once), tables alternated, median of
``--reps``, so that a byte saving that costs decode time shows.

``--sweep R1,R2,..``: the streaming / batch ratio at several request densities of the
synthetic workload: the demo's ``small`` scale (500 users, 40,000 events a day, snapshots
every ``--snapshot-hours``) for ``--days`` days with ``requests_per_day`` set to each Ri, each
day ingested, snapshotted and logged on the streaming path as ``lmat demo`` does, every
request written again on the batch path; also the streaming table merged to one file per
bucket (``compact_thin``). Streaming bytes a request are the pointer and request columns plus
(tail events stored a request) x (bytes a stored event)::

    python -m bench.thin_bytes --sweep 1000,4000,16000,64000 --workdir /tmp/sweep
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable

TAIL_PREFIX = "tail_"


def column_bytes(table: str) -> dict[str, Any]:
    """Compressed bytes per request of each column of the Delta thin table at ``table``."""
    files = DeltaTable(table).file_uris()
    per_column: collections.Counter[str] = collections.Counter()
    rows = disk = stored_events = 0
    for uri in files:
        path = uri.removeprefix("file://")
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        disk += os.path.getsize(path)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                per_column[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
        if "tail_item_id" in pq.read_schema(path).names:
            lists = pq.read_table(path, columns=["tail_item_id"]).column("tail_item_id")
            stored_events += int(pc.sum(pc.list_value_length(lists)).as_py() or 0)
    if rows == 0:
        raise SystemExit(f"thin_bytes: {table} has no rows")
    out: dict[str, Any] = {
        "table": table, "files": len(files), "requests": rows,
        "file_bytes_per_request": disk / rows,
        "columns_per_request": {k: v / rows for k, v in per_column.most_common()},
        "tail_events_stored_per_request": stored_events / rows,
    }
    if stored_events:
        out["bytes_per_stored_tail_event"] = {
            k.removeprefix(TAIL_PREFIX): v / stored_events
            for k, v in per_column.most_common() if k.startswith(TAIL_PREFIX)
            and k not in TAIL_POINTER}
    # Bytes a request = pointer and request columns + the tail event columns (tail events
    # stored a request x bytes a stored event; the batch path's null lists) + file overhead
    # (footers, and pages' headers outside column chunks).
    tail = sum(v for k, v in per_column.items()
               if k.startswith(TAIL_PREFIX) and k not in TAIL_POINTER)
    out["tail_event_bytes_per_request"] = tail / rows
    out["pointer_and_request_bytes_per_request"] = (sum(per_column.values()) - tail) / rows
    out["file_overhead_per_request"] = (disk - sum(per_column.values())) / rows
    return out


#: Tail columns that are per request (its length and where its events are), not per event.
TAIL_POINTER = ("tail_len", "tail_block", "tail_start")


def decode_cpu(tables: list[str], columns: list[str], reps: int) -> list[dict[str, Any]]:
    """CPU seconds to read every live file of each thin table and flatten the stored tails of
    event ``columns`` (as a cache-off pass does, bucket by bucket: ``read_thin_file`` then
    ``ThinRows.from_table``); tables alternated round by round, median of ``reps``."""
    import pyarrow.dataset as pads

    from lmat_platform.protocol.thin import read_thin_file
    from lmat_platform.reconstruct import ThinRows, thin_columns
    from lmat_platform.tenants import Tenant

    tenant = Tenant("decode", tuple(columns), 1 << 20)
    work = []
    for t in tables:
        dt = DeltaTable(t)
        ds = pads.dataset(dt.file_uris(), format="parquet", partitioning="hive")
        schema = pa.schema(dt.schema().to_arrow())
        cols = thin_columns(tenant, schema.names)
        events = list(dict.fromkeys(["event_ts", "event_id", *columns]))
        store_schema = pa.schema([pa.field(c, schema.field(TAIL_PREFIX + c).type.value_type)
                                  for c in events])
        by_bucket: dict[str, list[Any]] = collections.defaultdict(list)
        for frag in ds.get_fragments():
            by_bucket[os.path.basename(os.path.dirname(frag.path))].append(frag)
        work.append((schema, cols, events, store_schema, list(by_bucket.values())))
    times: list[list[float]] = [[] for _ in tables]
    for _ in range(reps):
        for i, (schema, cols, events, store_schema, buckets) in enumerate(work):
            c0 = time.process_time()
            for frags in buckets:
                parts = [read_thin_file(f, schema, cols) for f in frags]
                rows = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
                ThinRows.from_table(rows, events, store_schema)
            times[i].append(time.process_time() - c0)
    return [{"table": t, "columns": ",".join(columns), "cpu_s_median": statistics.median(x),
             "cpu_s_all": [round(v, 4) for v in x]} for t, x in zip(tables, times, strict=True)]


def sweep(work: Path, densities: list[int], *, days: int, snapshot_hours: int,
          scale: str = "small", seed: int = 0) -> list[dict[str, Any]]:
    """The streaming and batch thin tables of the demo's workload of ``scale`` at each request
    density (``requests_per_day``), measured as :func:`column_bytes` does, also after the
    streaming table is merged to one file per bucket."""
    import pyarrow.parquet as pq

    from lmat_platform import synth
    from lmat_platform.demo import HOUR_US, SCALES
    from lmat_platform.protocol.thin import compact_thin, write_thin
    from lmat_platform.store import ingest_files, init_store
    from lmat_platform.store.snapshots import publish_snapshot

    out = []
    for r in densities:
        root = work / f"requests-{r}"
        cfg = synth.WorkloadConfig(seed=seed, days=days,
                                   **{**SCALES[scale], "requests_per_day": r})  # type: ignore[arg-type]
        wl = synth.write_workload(cfg, root / "landing")
        store = init_store(str(root / "store"), n_buckets=16, row_group_rows=2048)
        log_t, batch_t = str(root / "thin-log"), str(root / "thin-examples")
        t0 = time.perf_counter()
        for d, (ef, rf) in enumerate(zip(wl.event_files, wl.request_files, strict=True)):
            ingest_files(store, [str(ef)])
            start, end = synth.day_bounds(cfg, d)
            step = snapshot_hours * HOUR_US
            for w in range(start + step, end + 1, step):
                publish_snapshot(store, w, published_at=w + 10 * 60 * 1_000_000)
            write_thin(store, str(rf), log_t, path="log")
        everything = str(root / "requests-all.parquet")
        pq.write_table(pa.concat_tables([pq.read_table(str(p)) for p in wl.request_files]),
                       everything)
        write_thin(store, everything, batch_t, path="examples")
        streaming, batch = column_bytes(log_t), column_bytes(batch_t)
        compact_thin(store, log_t)
        DeltaTable(log_t).vacuum(retention_hours=0, enforce_retention_duration=False,
                                 dry_run=False)
        merged = column_bytes(log_t)
        out.append({
            "scale": scale, "requests_per_day": r, "events_per_day": cfg.events_per_day,
            "users": cfg.n_users,
            "days": days, "snapshot_hours": snapshot_hours,
            "requests_per_event": r / cfg.events_per_day, "seconds": time.perf_counter() - t0,
            "streaming": streaming, "batch": batch, "streaming_merged": merged,
            "ratio": streaming["file_bytes_per_request"] / batch["file_bytes_per_request"],
            "ratio_merged": merged["file_bytes_per_request"] / batch["file_bytes_per_request"],
        })
    return out


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep as a Markdown table."""
    lines = [
        "| requests a day (per event) | tail events stored a request | B a stored event "
        "| pointer + request B | streaming B/req | batch B/req | ratio | merged: streaming B/req "
        "| ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, b, m = r["streaming"], r["batch"], r["streaming_merged"]
        per_event = sum(s.get("bytes_per_stored_tail_event", {}).values())
        lines.append(
            f"| {r['requests_per_day']:,} ({r['requests_per_event']:.2f}) "
            f"| {s['tail_events_stored_per_request']:.2f} | {per_event:.1f} "
            f"| {s['pointer_and_request_bytes_per_request']:.1f} "
            f"| {s['file_bytes_per_request']:.1f} | {b['file_bytes_per_request']:.1f} "
            f"| {r['ratio']:.2f}x | {m['file_bytes_per_request']:.1f} | {r['ratio_merged']:.2f}x |")
    return "\n".join(lines)


def _csv_ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.thin_bytes", description=__doc__.split("\n")[0])
    p.add_argument("tables", nargs="*", help="thin tables (Delta folders)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--decode", metavar="COLS", default=None,
                   help="also time decoding each table's tails of these event columns")
    p.add_argument("--reps", type=int, default=7, help="--decode: timed passes per table")
    p.add_argument("--sweep", metavar="R1,R2,..", type=_csv_ints, default=None,
                   help="requests a day of each run of the density sweep")
    p.add_argument("--days", type=int, default=2, help="--sweep: days a run")
    p.add_argument("--scale", default="small", choices=("tiny", "small", "medium"),
                   help="--sweep: the demo's scale (users, events a day)")
    p.add_argument("--snapshot-hours", type=int, default=4, help="--sweep: snapshot interval")
    p.add_argument("--workdir", default=None, help="--sweep: where the runs are written")
    p.add_argument("--out", default=None, help="--sweep: also write the results here (JSON)")
    args = p.parse_args(argv)
    if args.sweep:
        if args.days < 2 or args.snapshot_hours < 1 or 24 % args.snapshot_hours:
            print("thin_bytes: --days must be >= 2 and --snapshot-hours divide 24",
                  file=sys.stderr)
            return 2
        work = Path(args.workdir or tempfile.mkdtemp(prefix="lmat-thin-sweep-"))
        rows = sweep(work, args.sweep, days=args.days, snapshot_hours=args.snapshot_hours,
                     scale=args.scale)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows, indent=1) if args.json else sweep_markdown(rows))
        return 0
    if not args.tables:
        print("thin_bytes: give thin tables, or --sweep", file=sys.stderr)
        return 2
    for t in args.tables:
        if not os.path.isdir(os.path.join(t, "_delta_log")):
            print(f"thin_bytes: {t} is not a Delta table (no _delta_log)", file=sys.stderr)
            return 2
    results = [column_bytes(t) for t in args.tables]
    if args.decode:
        cols = [c for c in args.decode.split(",") if c]
        for r, d in zip(results, decode_cpu(args.tables, cols, args.reps), strict=True):
            r["decode"] = d
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(f"{r['table']}: {r['requests']:,} requests in {r['files']} files, "
              f"{r['file_bytes_per_request']:.1f} B a request on disk "
              f"(file overhead {r['file_overhead_per_request']:.1f}, pointer and request "
              f"columns {r['pointer_and_request_bytes_per_request']:.1f}); "
              f"tail events stored a request {r['tail_events_stored_per_request']:.2f}")
        for k, v in r["columns_per_request"].items():
            print(f"  {k:<24} {v:7.2f} B/request")
        if "bytes_per_stored_tail_event" in r:
            each = ", ".join(f"{k} {v:.2f}" for k, v in r["bytes_per_stored_tail_event"].items())
            total = sum(r["bytes_per_stored_tail_event"].values())
            print(f"  per stored tail event: {total:.2f} B ({each})")
        if "decode" in r:
            d = r["decode"]
            print(f"  decode CPU ({d['columns']}): {d['cpu_s_median'] * 1e3:.1f} ms "
                  f"(median of {len(d['cpu_s_all'])})")
    if len(results) == 2:
        a, b = (r["file_bytes_per_request"] for r in results)
        print(f"first / second: {a / b:.2f}x bytes a request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
