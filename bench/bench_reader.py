"""Reader benchmark (issue 4, item 6): SequenceLoader against a fat-row reader, per tenant.

Run on demand::

    python -m bench.bench_reader                 # default scale, a few minutes on 2 cores
    python -m bench.bench_reader --scale 4       # bigger
    python -m bench.bench_reader --smoke         # tiny, seconds (what the test runs)

One run builds a generated workload and store (snapshots every ``--snapshot-hours``, so stored
tails stay short, as with a production snapshot cadence), writes thin rows on the streaming path
and one fat-row file per tenant with :func:`lmat_platform.write_fat_rows`, checks that both
readers produce the same sequences on a sample, and then measures each (tenant, reader) pair in
its own subprocess so that peak RSS (``getrusage`` max RSS) is the reader's alone:

* examples/s: the median of ``--reps`` full passes after one warm-up pass (batches of
  ``--batch-size``, tensors built as training gets them; opening and planning the reader
  included);
* bytes read per example: compressed bytes of the Parquet column chunks read (fat), or of the UIH
  row groups read plus the thin files read (SequenceLoader);
* p50 / p99 latency between consecutive batches; peak RSS.

It prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("bench.reader")

TENANTS = (
    {"name": "short", "columns": ["item_id", "action"], "max_len": 256},
    {"name": "medium", "columns": ["item_id", "action", "event_ts"], "max_len": 2048},
    {"name": "long", "columns": ["item_id", "action", "dwell_ms"], "max_len": 16384},
)


def _tenant(d: dict[str, Any]) -> Any:
    from lmat_platform.tenants import Tenant

    return Tenant(d["name"], tuple(d["columns"]), int(d["max_len"]))


# ----------------------------------------------------------------------------- setup


def build(work: Path, *, scale: float, smoke: bool, snapshot_hours: int,
          history_days: int = 20, train_days: int = 2) -> dict[str, Any]:
    """Workload, store, thin rows and fat files; returns their paths and sizes."""
    from lmat_platform import synth
    from lmat_platform.fatrows import write_fat_rows
    from lmat_platform.protocol.thin import write_thin
    from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot

    if smoke:
        cfg = synth.WorkloadConfig(seed=0, n_users=30, days=2, events_per_day=4000,
                                   requests_per_day=150, user_zipf=1.1)
        n_buckets, rg = 2, 512
        snapshot_hours = max(snapshot_hours, 12)
        history_days, train_days = 0, 2
    else:
        # The regime late materialization is for (the paper's): lifelong histories built over
        # many days, and many impressions per active user per day. ``history_days`` of events
        # only (the backlog in the tier, one snapshot a day), then ``train_days`` whose requests
        # are the training examples, with a snapshot every ``snapshot_hours``. Zipf activity
        # gives the heaviest users 10^4..10^5 events, so every tenant's max_len binds for some.
        cfg = synth.WorkloadConfig(
            seed=0, n_users=int(300 * scale), days=history_days + train_days,
            events_per_day=int(20_000 * scale), requests_per_day=int(8_000 * scale),
            user_zipf=1.05,
        )
        n_buckets, rg = 8, 4096
    t0 = time.perf_counter()
    wl = synth.write_workload(cfg, work / "wl")
    st = init_store(str(work / "store"), n_buckets=n_buckets, row_group_rows=rg)
    thin = str(work / "thin")
    train_files = []
    for d, (ef, rf) in enumerate(zip(wl.event_files, wl.request_files, strict=True)):
        ingest_files(st, [str(ef)])
        start, end = synth.day_bounds(cfg, d)
        step = (snapshot_hours if d >= history_days else 24) * 3600 * 10**6
        for w in range(start + step, end + 1, step):
            publish_snapshot(st, w, published_at=w + 600 * 10**6)
        if d == history_days - 1:
            compact_buckets(st)
        if d >= history_days:
            write_thin(st, str(rf), thin, path="log")
            train_files.append(rf)
    compact_buckets(st)
    setup_s = time.perf_counter() - t0
    requests = pa.concat_tables([pq.read_table(str(f)) for f in train_files])
    fat: dict[str, str] = {}
    t1 = time.perf_counter()
    for spec in TENANTS:
        name = str(spec["name"])
        fat[name] = str(work / f"fat-{name}.parquet")
        write_fat_rows(st, requests, _tenant(spec), fat[name])
    return {
        "store": str(work / "store"),
        "thin": thin,
        "fat": fat,
        "events": wl.n_events,
        "requests": requests.num_rows,
        "setup_s": round(setup_s, 1),
        "fat_write_s": round(time.perf_counter() - t1, 1),
        "config": {"n_users": cfg.n_users, "days": cfg.days, "history_days": history_days,
                   "train_days": train_days,
                   "events_per_day": cfg.events_per_day,
                   "requests_per_day": cfg.requests_per_day, "n_buckets": n_buckets,
                   "row_group_rows": rg, "snapshot_hours": snapshot_hours},
    }


# ----------------------------------------------------------------------------- readers


def fat_batches(path: str, columns: list[str], batch_size: int) -> Any:
    """The fat-row reader: Parquet list columns -> the same tensors as a :class:`Batch`.

    Yields (batch, compressed bytes read for it); bytes are those of the column chunks read,
    attributed to the first batch of each row group."""
    import torch

    from lmat_platform.reader import Batch

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    ctx = [c for c in ("label", "candidate_item_id", "position") if c in names]
    want = ["request_id", "user_id", "request_ts", *columns, *ctx]
    md = pf.metadata
    leaf = [md.schema.column(i).path.split(".")[0] for i in range(md.num_columns)]
    idx = [i for i, n in enumerate(leaf) if n in want]
    nbytes = sum(md.row_group(g).column(i).total_compressed_size
                 for g in range(md.num_row_groups) for i in idx)
    pending = nbytes  # all row groups are read by the end of the pass; spread per batch below
    n_rows = md.num_rows
    seen = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=want):
        first = rb.column(columns[0])
        off = first.offsets.to_numpy()
        lengths = np.diff(off).astype(np.int64)
        values = {}
        for c in columns:
            a = rb.column(c)
            o = a.offsets.to_numpy()
            v = a.values.slice(int(o[0]), int(o[-1] - o[0]))
            values[c] = torch.from_numpy(np.array(v.to_numpy(zero_copy_only=False), copy=True))
        b = Batch(
            request_id=torch.from_numpy(rb.column("request_id").to_numpy().copy()),
            lengths=torch.from_numpy(lengths),
            values=values,
            context={c: torch.from_numpy(rb.column(c).to_numpy(zero_copy_only=False).copy())
                     for c in ctx},
            user_id=torch.from_numpy(rb.column("user_id").to_numpy().copy()),
            request_ts=torch.from_numpy(rb.column("request_ts").to_numpy().copy()),
        )
        share = nbytes * (seen + rb.num_rows) // n_rows - nbytes * seen // n_rows
        seen += rb.num_rows
        pending -= share
        b.bytes_read = share
        yield b


def seq_batches(store: str, thin: str, tenant: Any, batch_size: int, num_workers: int) -> Any:
    from lmat_platform.reader import SequenceLoader

    return iter(SequenceLoader(store, thin, tenant=tenant, batch_size=batch_size,
                               num_workers=num_workers))


def measure(reader: str, setup: dict[str, Any], tenant_d: dict[str, Any], batch_size: int,
            num_workers: int, reps: int = 5) -> dict[str, Any]:
    """Full passes of one reader over one tenant, run in a fresh subprocess: one untimed
    warm-up pass, then the median of ``reps`` timed passes (latencies from all of them)."""
    tenant = _tenant(tenant_d)

    def make() -> Any:
        if reader == "fat":
            return fat_batches(setup["fat"][tenant.name], list(tenant.columns), batch_size)
        return seq_batches(setup["store"], setup["thin"], tenant, batch_size, num_workers)

    # The warm-up pass (imports, footers, page cache) is the same for both readers; each timed
    # pass includes opening and planning the reader.
    for _ in make():
        pass
    walls: list[float] = []
    lat: list[float] = []
    n = events = nbytes = 0
    for _ in range(max(reps, 1)):
        n = events = nbytes = 0
        t0 = last = time.perf_counter()
        for b in make():
            now = time.perf_counter()
            lat.append(now - last)
            last = now
            n += len(b)
            events += int(b.lengths.sum())
            nbytes += b.bytes_read
        walls.append(time.perf_counter() - t0)
    wall = float(np.median(walls))
    return {
        "reader": reader, "tenant": tenant.name, "max_len": tenant.max_len,
        "examples": n, "events": events, "seconds": round(wall, 3), "reps": len(walls),
        "all_seconds": [round(w, 4) for w in walls],
        "examples_per_s": round(n / wall, 1) if wall else None,
        "bytes_read": nbytes, "bytes_per_example": round(nbytes / max(n, 1), 1),
        "p50_batch_ms": round(float(np.percentile(lat, 50)) * 1e3, 2) if lat else None,
        "p99_batch_ms": round(float(np.percentile(lat, 99)) * 1e3, 2) if lat else None,
        "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
    }


def peak_rss_bytes() -> int:
    """Peak RSS of this process. VmHWM (Linux) is per address space, so unlike getrusage's
    ru_maxrss it does not inherit the peak of the parent that spawned us across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_parity(setup: dict[str, Any], batch_size: int, sample: int = 300) -> dict[str, int]:
    """Both readers give the same sequences for a sample of requests of every tenant."""
    from lmat_platform.reader import SequenceLoader

    checked = {}
    for d in TENANTS:
        tenant = _tenant(d)
        got: dict[int, dict[str, np.ndarray]] = {}
        for b in SequenceLoader(setup["store"], setup["thin"], tenant=tenant,
                                batch_size=batch_size, shuffle=True, seed=1):
            off = b.offsets().numpy()
            for i, r in enumerate(b.request_id.tolist()[: sample - len(got)]):
                got[r] = {c: v[off[i]:off[i + 1]].numpy() for c, v in b.values.items()}
            if len(got) >= sample:
                break
        fat = pq.read_table(setup["fat"][tenant.name], columns=["request_id", *tenant.columns])
        mask = np.isin(fat.column("request_id").to_numpy(), np.array(list(got)))
        fat = fat.filter(pa.array(mask))
        if fat.num_rows != len(got):
            raise AssertionError(f"{tenant.name}: {len(got) - fat.num_rows} sampled requests "
                                 "missing from the fat rows")
        for j, r in enumerate(fat.column("request_id").to_pylist()):
            for c in tenant.columns:
                want = np.asarray(fat.column(c)[j].values.to_numpy(zero_copy_only=False))
                if not np.array_equal(want.astype(float), got[r][c].astype(float), equal_nan=True):
                    raise AssertionError(f"{tenant.name}: request {r} column {c} differs "
                                         "between SequenceLoader and fat rows")
        checked[tenant.name] = len(got)
    return checked


# ----------------------------------------------------------------------------- driver


def _run_child(args: argparse.Namespace) -> None:
    setup = json.loads(Path(args.child_setup).read_text())
    tenant = next(d for d in TENANTS if d["name"] == args.child_tenant)
    res = measure(args.child_reader, setup, tenant, args.batch_size, args.num_workers,
                  args.reps)
    print(json.dumps(res))


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'tenant':<8}{'max_len':>8} {'reader':<6}{'examples/s':>12}{'bytes/ex':>12}"
            f"{'p50 ms':>9}{'p99 ms':>9}{'RSS MiB':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['tenant']:<8}{r['max_len']:>8} {r['reader']:<6}{r['examples_per_s']:>12}"
                   f"{r['bytes_per_example']:>12}{r['p50_batch_ms']:>9}{r['p99_batch_ms']:>9}"
                   f"{r['peak_rss_mib']:>9}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmat-bench-reader-"))
    work.mkdir(parents=True, exist_ok=True)
    setup = build(work, scale=args.scale, smoke=args.smoke, snapshot_hours=args.snapshot_hours,
                  history_days=args.history_days, train_days=args.train_days)
    parity = check_parity(setup, args.batch_size, sample=50 if args.smoke else 300)
    setup_file = work / "setup.json"
    setup_file.write_text(json.dumps(setup))
    rows = []
    for d in TENANTS:
        for reader in ("seq", "fat"):
            cmd = [sys.executable, "-m", "bench.bench_reader", "--child-setup", str(setup_file),
                   "--child-tenant", str(d["name"]), "--child-reader", reader,
                   "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
                   "--reps", str(args.reps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 cwd=Path(__file__).resolve().parent.parent)
            if out.returncode:
                raise RuntimeError(f"{reader}/{d['name']} failed:\n{out.stderr[-4000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for d in TENANTS:
        s = next(r for r in rows if r["tenant"] == d["name"] and r["reader"] == "seq")
        f = next(r for r in rows if r["tenant"] == d["name"] and r["reader"] == "fat")
        summary[d["name"]] = {
            "speedup": round(s["examples_per_s"] / f["examples_per_s"], 2),
            "bytes_reduction": round(1 - s["bytes_per_example"] / max(f["bytes_per_example"], 1), 3),
        }
    result = {"setup": {k: v for k, v in setup.items() if k not in ("fat",)},
              "parity_checked": parity, "results": rows, "summary": summary,
              "batch_size": args.batch_size, "num_workers": args.num_workers}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="workload scale (default 1)")
    p.add_argument("--smoke", action="store_true", help="tiny workload, seconds")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_reader.json"),
                   help="JSON results path (default bench/results/bench_reader.json)")
    p.add_argument("--workdir", default=None, help="where to build the store (default: a temp dir)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--reps", type=int, default=5, help="timed passes per reader (median)")
    p.add_argument("--num-workers", type=int, default=0, help="SequenceLoader worker processes")
    p.add_argument("--snapshot-hours", type=int, default=1,
                   help="snapshot cadence during the training days (default 1)")
    p.add_argument("--history-days", type=int, default=20,
                   help="days of events before the training days (the tier's backlog)")
    p.add_argument("--train-days", type=int, default=2, help="days whose requests are examples")
    p.add_argument("--child-setup", help=argparse.SUPPRESS)
    p.add_argument("--child-tenant", help=argparse.SUPPRESS)
    p.add_argument("--child-reader", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_setup:
        _run_child(args)
        return 0
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    print(table(result["results"]))
    for name, s in result["summary"].items():
        print(f"{name}: SequenceLoader {s['speedup']}x fat examples/s, "
              f"{100 * s['bytes_reduction']:.1f}% fewer bytes per example")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
