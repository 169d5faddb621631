"""Where a thin table's bytes go (issue 16: streaming tails against batch rows).

Reads the Parquet footers of every live file of one or more thin tables (Delta) and prints the
compressed bytes each column costs per request, the file bytes per request, and for a
streaming table how many tail events it stores per request (each user's tail once per file,
thin format 2) with the bytes each stored event costs per field. Nothing is decoded but the
``tail_item_id`` list lengths.

Run on demand, e.g. on the demo's two paths::

    lmat demo --dir /tmp/demo
    python -m bench.thin_bytes /tmp/demo/thin/log /tmp/demo/thin/examples
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Any

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
            and k not in ("tail_len", "tail_block", "tail_start")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.thin_bytes", description=__doc__.split("\n")[0])
    p.add_argument("tables", nargs="+", help="thin tables (Delta folders)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    for t in args.tables:
        if not os.path.isdir(os.path.join(t, "_delta_log")):
            print(f"thin_bytes: {t} is not a Delta table (no _delta_log)", file=sys.stderr)
            return 2
    results = [column_bytes(t) for t in args.tables]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(f"{r['table']}: {r['requests']:,} requests in {r['files']} files, "
              f"{r['file_bytes_per_request']:.1f} B a request on disk; "
              f"tail events stored a request {r['tail_events_stored_per_request']:.2f}")
        for k, v in r["columns_per_request"].items():
            print(f"  {k:<24} {v:7.2f} B/request")
        if "bytes_per_stored_tail_event" in r:
            each = ", ".join(f"{k} {v:.2f}" for k, v in r["bytes_per_stored_tail_event"].items())
            print(f"  per stored tail event: {each}")
    if len(results) == 2:
        a, b = (r["file_bytes_per_request"] for r in results)
        print(f"first / second: {a / b:.2f}x bytes a request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
