"""Shared workload builder for the benchmark suite (``python -m bench.suite``).

Builds, day by day, the 3-tenant union workload the suite measures, the way production would:

* ``history_days`` of events only (the users' backlog: ingest, one snapshot a day), compacted;
* then ``train_days`` whose requests are the training examples. Every such day: ingest the day's
  events, publish a snapshot every ``snapshot_hours`` (published 10 simulated minutes after its
  watermark), log the day's requests on the streaming path (thin rows with pointer and tail),
  write the same requests' pointer-only thin rows on the batch path (for their bytes), and write
  the day's **fat rows for the union** of the three tenants (what a fat-row pipeline writes);
* after each training day the bytes each side has written are recorded (files on disk, so
  rewrites count), which gives bytes written per day;
* at the end the UIH tier is compacted again (that rewrite is reported on its own), with its
  stripes ranked as of the oldest snapshot the logged requests point at
  (``compact_buckets(stripes_as_of=...)``), the layout a store compacted during training has,
  and the streaming thin table merged to one file per bucket (``compact_thin``).

The regime is the one late materialization is for, as in the reader benchmark: long histories
built over many days, and many requests per active user per day.

The tenants are the reader benchmark's (:data:`bench.bench_reader.TENANTS`): ``max_len`` 256,
2048 and 16384, with different columns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.tenants import Tenant

log = logging.getLogger("bench.workload")

HOUR_US = 3600 * 1_000_000

_TENANT_DICTS: tuple[dict[str, Any], ...]
try:  # the reader benchmark's tenants, so both benchmarks measure the same projections
    from bench.bench_reader import TENANTS as _TENANT_DICTS
except ImportError:  # pragma: no cover - bench_reader is part of the same package
    _TENANT_DICTS = (
        {"name": "short", "columns": ["item_id", "action"], "max_len": 256},
        {"name": "medium", "columns": ["item_id", "action", "event_ts"], "max_len": 2048},
        {"name": "long", "columns": ["item_id", "action", "dwell_ms"], "max_len": 16384},
    )

TENANTS: tuple[Tenant, ...] = tuple(
    Tenant(d["name"], tuple(d["columns"]), int(d["max_len"])) for d in _TENANT_DICTS
)


@dataclass(frozen=True)
class Scale:
    """Knobs of one benchmark scale."""

    name: str
    n_users: int
    #: Days of events only (the history backlog; one snapshot a day), then ``train_days`` whose
    #: requests are logged as training examples (a snapshot every ``snapshot_hours``).
    history_days: int
    train_days: int
    events_per_day: int
    requests_per_day: int
    user_zipf: float
    n_buckets: int
    row_group_rows: int
    snapshot_hours: int = 6
    #: Requests per scaling store and history lengths of the scaling sweep.
    scaling_histories: tuple[int, ...] = (1_000, 10_000, 100_000)
    scaling_users: int = 8
    scaling_requests_per_user: int = 64
    scaling_request_counts: tuple[int, ...] = (128, 512, 2048)
    #: Requests sampled for per-request peers (naive lookups, affinity off).
    per_request_sample: int = 60
    #: Requests every peer is checked on (equal sequences) before it is timed.
    parity_sample: int = 100
    #: Random requests the slow peers (DuckDB, polars, Lance) are timed on.
    peer_sample: int = 1000
    #: Repetitions of each timed pass (median reported), after one warm-up pass.
    reps: int = 5


SCALES: dict[str, Scale] = {
    # Seconds: what the smoke test runs.
    "tiny": Scale(
        "tiny",
        n_users=30,
        history_days=1,
        train_days=2,
        events_per_day=4_000,
        requests_per_day=150,
        user_zipf=1.1,
        n_buckets=2,
        row_group_rows=512,
        snapshot_hours=6,
        scaling_histories=(1_000, 4_000),
        scaling_users=2,
        scaling_requests_per_user=16,
        scaling_request_counts=(16, 64),
        per_request_sample=8,
        parity_sample=40,
        peer_sample=100,
        reps=1,
    ),
    # The documented default: under 15 minutes on 2 cores.
    "default": Scale(
        "default",
        n_users=300,
        history_days=20,
        train_days=3,
        events_per_day=20_000,
        requests_per_day=4_000,
        user_zipf=1.05,
        n_buckets=8,
        row_group_rows=4096,
    ),
    # Behind --scale large: about 4x the data and requests.
    "large": Scale(
        "large",
        n_users=1_200,
        history_days=30,
        train_days=4,
        events_per_day=80_000,
        requests_per_day=16_000,
        user_zipf=1.05,
        n_buckets=16,
        row_group_rows=8192,
        scaling_histories=(1_000, 10_000, 100_000, 300_000),
        scaling_request_counts=(512, 2048, 8192),
        per_request_sample=100,
        parity_sample=200,
        peer_sample=2000,
    ),
}


@dataclass
class Built:
    """Paths and byte accounting of a built workload."""

    store: str
    thin: str
    fat_files: list[str]
    requests_file: str
    raw_files: list[str]
    events: int
    requests: int
    per_day: list[dict[str, int]] = field(default_factory=list)
    compaction_bytes: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dir_bytes(p: str | Path) -> int:
    """Bytes of every file under ``p`` (0 if it does not exist)."""
    p = Path(p)
    if not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def oldest_pointer(thin: str) -> int:
    """The oldest snapshot a thin table's rows point at (0 when none points at any), from the
    statistics in its Delta log (the snapshot column read where they are missing)."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from lmat_platform.store.core import delta_dataset

    dt = DeltaTable(thin)
    acts = pa.table(dt.get_add_actions(flatten=True))
    col = acts.column("min.snapshot_id") if "min.snapshot_id" in acts.column_names else None
    if col is None or col.null_count:
        col = delta_dataset(dt).to_table(columns=["snapshot_id"]).column("snapshot_id")
    lo = pc.min(col).as_py()
    return max(int(lo), 0) if lo is not None else 0


def build_union_workload(work: Path, scale: Scale) -> Built:
    """Generate, ingest and log ``scale``'s workload under ``work``; see the module docstring."""
    from deltalake import DeltaTable

    from lmat_platform import synth
    from lmat_platform.fatrows import write_fat_rows
    from lmat_platform.protocol.thin import compact_thin, write_thin
    from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot
    from lmat_platform.store.core import delta_dataset

    work.mkdir(parents=True, exist_ok=True)
    cfg = synth.WorkloadConfig(
        seed=0,
        n_users=scale.n_users,
        days=scale.history_days + scale.train_days,
        events_per_day=scale.events_per_day,
        requests_per_day=scale.requests_per_day,
        user_zipf=scale.user_zipf,
    )
    t0 = time.perf_counter()
    wl = synth.write_workload(cfg, work / "wl")
    t_gen = time.perf_counter() - t0
    store_dir = work / "store"
    st = init_store(str(store_dir), n_buckets=scale.n_buckets, row_group_rows=scale.row_group_rows)
    thin = str(work / "thin")
    thin_batch = str(work / "thin-batch")
    fat_files: list[str] = []
    train_files: list[str] = []
    per_day: list[dict[str, int]] = []

    def sizes() -> dict[str, int]:
        return {
            "uih": dir_bytes(store_dir / "uih"),
            "heads": dir_bytes(store_dir / "heads"),
            "thin": dir_bytes(thin),
            "thin_batch": dir_bytes(thin_batch),
            "raw": dir_bytes(store_dir / "raw"),
            "fat": sum(dir_bytes(f) for f in fat_files),
        }

    t_hist = t_lmat = t_fat = t_batch = 0.0
    prev = sizes()
    for d, (ef, rf) in enumerate(zip(wl.event_files, wl.request_files, strict=True)):
        train = d >= scale.history_days
        t1 = time.perf_counter()
        ingest_files(st, [str(ef)])
        start, end = synth.day_bounds(cfg, d)
        step = (scale.snapshot_hours if train else 24) * HOUR_US
        for w in range(start + step, end + 1, step):
            publish_snapshot(st, w, published_at=w + 600 * 10**6)
        if not train:
            if d == scale.history_days - 1:
                compact_buckets(st)  # the backlog, compacted before training days begin
            t_hist += time.perf_counter() - t1
            prev = sizes()
            continue
        # Streaming path: serving logs thin rows (pointer + tail) as the day's requests happen.
        write_thin(st, str(rf), thin, path="log")
        t2 = time.perf_counter()
        # Batch path, for the bytes only: pointer-only thin rows of the same requests.
        write_thin(st, str(rf), thin_batch, path="examples")
        t3 = time.perf_counter()
        fat_path = str(work / f"fat-union-day{d}.parquet")
        write_fat_rows(st, pq.read_table(str(rf)), list(TENANTS), fat_path)
        t4 = time.perf_counter()
        t_lmat += t2 - t1
        t_batch += t3 - t2
        t_fat += t4 - t3
        fat_files.append(fat_path)
        train_files.append(str(rf))
        now = sizes()
        row = {f"{k}_bytes": now[k] - prev[k] for k in now}
        row["day"] = d
        row["events"] = pq.read_metadata(str(ef)).num_rows
        row["requests"] = pq.read_metadata(str(rf)).num_rows
        per_day.append(row)
        prev = now
        log.info("day %d: %s", d, row)
    t5 = time.perf_counter()
    before = dir_bytes(store_dir / "uih")
    # The training days' compaction, as a store compacts while their examples are still being
    # read: stripes ranked as of the oldest snapshot the logged requests point at (events of
    # later snapshots in the first stripe), so a short tenant reads each user's last events
    # only (uih.stripe_skippable); ranked as of the newest snapshot, no request could skip.
    compact_buckets(st, stripes_as_of=oldest_pointer(thin))
    # And the streaming thin table merged to one file per bucket (one per bucket and training
    # day before), its merged-away files vacuumed so that its bytes on disk are the table's.
    compact_thin(st, thin)
    DeltaTable(thin).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    compaction = dir_bytes(store_dir / "uih") - before
    t_compact = time.perf_counter() - t5
    requests = pa.concat_tables([pq.read_table(f) for f in train_files])
    req_path = str(work / "requests-train.parquet")
    pq.write_table(requests, req_path)
    raw_dt = st.open_table("raw")
    assert raw_dt is not None
    raw_files = [f.removeprefix("file://") for f in raw_dt.file_uris()]
    n_events = delta_dataset(raw_dt).count_rows()
    return Built(
        store=str(store_dir),
        thin=thin,
        fat_files=fat_files,
        requests_file=req_path,
        raw_files=raw_files,
        events=int(n_events),
        requests=requests.num_rows,
        per_day=per_day,
        compaction_bytes=int(compaction),
        timings_s={
            "generate": round(t_gen, 2),
            "history_days": round(t_hist, 2),
            "lmat_ingest_snapshot_log": round(t_lmat, 2),
            "batch_thin_write": round(t_batch, 2),
            "fat_union_write": round(t_fat, 2),
            "final_compact": round(t_compact, 2),
        },
        config={
            "n_users": cfg.n_users,
            "history_days": scale.history_days,
            "train_days": scale.train_days,
            "events_per_day": cfg.events_per_day,
            "requests_per_day": cfg.requests_per_day,
            "user_zipf": cfg.user_zipf,
            "n_buckets": scale.n_buckets,
            "row_group_rows": scale.row_group_rows,
            "snapshot_hours": scale.snapshot_hours,
            "tenants": [t.as_dict() for t in TENANTS],
        },
    )
