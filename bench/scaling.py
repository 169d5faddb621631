"""Scaling stores: cost per example as histories grow, and as requests grow (issue 6, item 4).

Each store holds ``users`` users with exactly ``history`` events each (one event a minute,
arriving a second later), published in one snapshot; every user then gets the same number of
requests, all after the snapshot, so every request sees the user's whole history and the tenant's
``max_len`` (fixed, e.g. 256) binds: the work per example is constant by construction, and any
growth of cost per example with ``history`` is overhead of the read path (decoding or scanning
more of a history than the tenant needs).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.tenants import Tenant

START_US = 1_700_006_400_000_000
MINUTE_US = 60 * 1_000_000


def build_history_store(
    work: Path,
    *,
    history: int,
    users: int,
    requests_per_user: int,
    row_group_rows: int,
    n_buckets: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """A store whose ``users`` users have ``history`` events each, and a thin table (streaming
    path) with ``requests_per_user`` requests per user after the snapshot."""
    from lmat_platform.protocol.thin import write_thin
    from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, history])
    n = history * users
    uid = np.repeat(np.arange(1, users + 1, dtype=np.int64), history)
    k = np.tile(np.arange(history, dtype=np.int64), users)
    ets = START_US + k * MINUTE_US
    events = pa.table(
        {
            "user_id": uid,
            "event_id": np.arange(n, dtype=np.int64) + 1,
            "event_ts": ets,
            "arrival_ts": ets + 1_000_000,
            "item_id": rng.integers(1, 50_000, n, dtype=np.int64),
            "action": rng.integers(1, 6, n).astype(np.int16),
            "dwell_ms": rng.random(n, dtype=np.float32) * 1e4,
            "surface": rng.integers(0, 4, n).astype(np.int16),
        }
    )
    ev_path = work / "events.parquet"
    pq.write_table(events, ev_path)
    t0 = time.perf_counter()
    st = init_store(str(work / "store"), n_buckets=n_buckets, row_group_rows=row_group_rows)
    ingest_files(st, [str(ev_path)])
    wm = int(ets.max()) + 2 * MINUTE_US
    publish_snapshot(st, wm, published_at=wm)
    compact_buckets(st)
    thin = str(work / "thin")
    req = requests_table(users, requests_per_user, after=wm + 1)
    rq_path = work / "requests.parquet"
    pq.write_table(req, rq_path)
    write_thin(st, str(rq_path), thin, path="log")
    return {
        "store": str(work / "store"),
        "thin": thin,
        "history": history,
        "users": users,
        "requests": req.num_rows,
        "events": n,
        "requests_file": str(rq_path),
        "build_s": round(time.perf_counter() - t0, 2),
    }


def requests_table(users: int, per_user: int, *, after: int, first_id: int = 1) -> pa.Table:
    """``per_user`` requests for each of users ``1..users``, interleaved, one a second."""
    n = users * per_user
    uid = np.tile(np.arange(1, users + 1, dtype=np.int64), per_user)
    return pa.table(
        {
            "request_id": np.arange(n, dtype=np.int64) + first_id,
            "user_id": uid,
            "request_ts": after + np.arange(n, dtype=np.int64) * 1_000_000,
            "label": (np.arange(n) % 2).astype(np.int8),
            "candidate_item_id": np.arange(n, dtype=np.int64) % 1000 + 1,
            "position": (np.arange(n) % 10).astype(np.int16),
        }
    )


def thin_with_requests(store: str, work: Path, n: int, users: int, after: int) -> str:
    """A fresh thin table with ``n`` requests over ``users`` users (streaming path)."""
    from lmat_platform.protocol.thin import write_thin

    per = max(1, n // users)
    req = requests_table(users, per, after=after)
    path = work / f"requests-{n}.parquet"
    pq.write_table(req, path)
    thin = str(work / f"thin-{n}")
    write_thin(store, str(path), thin, path="log")
    return thin


def _pass(store: str, thin: str, tenant: Tenant, batch_size: int) -> tuple[float, int, int, int]:
    """One full loader pass (loader built outside the timing, so a constant per-pass open cost
    does not blur the per-example cost): (seconds, examples, events, UIH bytes)."""
    from lmat_platform.reader import SequenceLoader

    loader = SequenceLoader(store, thin, tenant=tenant, batch_size=batch_size)
    t0 = time.perf_counter()
    n = nbytes = events = 0
    for b in loader:
        n += len(b)
        events += int(b.lengths.sum())
        nbytes += b.bytes_read - b.thin_bytes_read
    return time.perf_counter() - t0, n, events, nbytes


def costs_per_example(
    cases: dict[Any, tuple[str, str]], tenant: Tenant, *, batch_size: int, reps: int,
    warmup: int = 1,
) -> dict[Any, dict[str, Any]]:
    """Median seconds per example of full loader passes over each case's (store, thin table),
    plus bytes per example. The cases' passes are interleaved, one pass of each per round, so
    that a noisy minute on a shared machine hits every case alike."""
    secs: dict[Any, list[float]] = {k: [] for k in cases}
    last: dict[Any, tuple[float, int, int, int]] = {}
    for i in range(warmup + reps):
        for k, (store, thin) in cases.items():
            last[k] = _pass(store, thin, tenant, batch_size)
            if i >= warmup:
                secs[k].append(last[k][0])
    out = {}
    for k in cases:
        _, n, events, nbytes = last[k]
        med = statistics.median(secs[k])
        out[k] = {
            "examples": n,
            "events": events,
            "seconds": med,
            "all_seconds": secs[k],
            "us_per_example": med / max(n, 1) * 1e6,
            "examples_per_s": n / med,
            "uih_bytes_per_example": nbytes / max(n, 1),
        }
    return out
