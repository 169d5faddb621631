"""The industry baseline: fat rows, each request with its projected history copied in.

Exists for parity checks and benchmarks. It is computed independently of the late-materializing
kernel (a polars join of requests with the raw event log), so that agreement between the two is
evidence, not tautology. A union dataset for several tenants is written at the widest projection
(:func:`lmat_platform.tenants.union_tenant`): the longest ``max_len`` and every column.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmat_platform.hashing import bucket_of
from lmat_platform.schema import normalize_requests, read_parquet_file
from lmat_platform.store.core import Store, as_store
from lmat_platform.store.deletion import pending_users
from lmat_platform.store.uih import COMPRESSION
from lmat_platform.tenants import Tenant, union_tenant

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)


def fat_rows_for(events: pl.DataFrame, requests: pl.DataFrame, tenant: Tenant) -> pl.DataFrame:
    """Fat rows of ``requests`` from ``events`` (all accepted events of their users)."""
    import polars as pl  # the baseline only: readers and training do not import polars
    ev = events
    if tenant.actions is not None:
        ev = ev.filter(pl.col("action").is_in(list(tenant.actions)))
    req = requests.select(["request_id", "user_id", "request_ts"])
    # Events sorted once by (user, event_ts, event_id); the join keeps that order, so each
    # request's group is already in history order and no sort of the joined rows is needed.
    ev = ev.sort(["user_id", "event_ts", "event_id"])
    j = ev.join(req, on="user_id", how="inner", maintain_order="left")
    j = j.filter(pl.col("arrival_ts") < pl.col("request_ts"))
    if tenant.window_us is not None:
        j = j.filter(pl.col("event_ts") >= pl.col("request_ts") - tenant.window_us)
    agg = j.group_by("request_id", maintain_order=True).agg(
        [pl.col(c).tail(tenant.max_len) for c in tenant.columns]
    )
    out = requests.join(agg, on="request_id", how="left")
    dtypes = dict(zip(events.columns, events.dtypes, strict=True))
    out = out.with_columns(
        [pl.col(c).fill_null(pl.lit([], dtype=pl.List(dtypes[c]))) for c in tenant.columns]
    )
    return out.with_columns(pl.col(tenant.columns[0]).list.len().cast(pl.Int32).alias("length"))


def write_fat_rows(
    store: Store | str,
    requests: str | pa.Table,
    tenants: Tenant | Sequence[Tenant],
    out: str,
    *,
    progress: Callable[[str], None] | None = None,
    row_group_rows: int = 1024,
    join_rows: int = 4_000_000,
    order: Literal["request_ts", "user"] = "request_ts",
) -> dict[str, object]:
    """Write fat rows for one tenant or the union of several to a Parquet file ``out``.

    Works a user bucket at a time so that the join stays bounded. ``order="request_ts"`` (the
    default) writes rows in request time order, as serving logs fat rows; it holds the whole
    output in memory to sort it. ``order="user"`` streams rows out clustered by user, which
    compresses far better (a user's consecutive rows repeat most of their history) but is not
    how a training log is laid out.
    """
    import polars as pl

    if order not in ("request_ts", "user"):
        raise ValueError(f"order must be 'request_ts' or 'user', but got {order!r}")
    store = as_store(store)
    tenant = tenants if isinstance(tenants, Tenant) else union_tenant(tenants)
    if isinstance(requests, str):
        requests = normalize_requests(read_parquet_file(requests, what="request file"), where=requests)
    raw = store.open_table("raw")
    # Users whose forget is pending: their events are being deleted and are not read.
    hidden = pending_users(store)
    buckets = bucket_of(requests.column("user_id").to_numpy(), store.n_buckets)
    tmp = f"{out}.tmp-{os.getpid()}"
    writer: pq.ParquetWriter | None = None
    rows = 0
    events_total = 0
    held: list[pa.Table] = []
    try:
        for i, b in enumerate(np.unique(buckets).tolist()):
            req = requests.filter(pa.array(buckets == b))
            users = np.setdiff1d(req.column("user_id").to_numpy(), hidden)
            if raw is not None:
                from lmat_platform.store.retention import accepted_events

                cols = list(dict.fromkeys(["user_id", "event_id", "event_ts", "arrival_ts",
                                           "action", *tenant.columns]))
                # Every accepted event: the raw log's, and the tier's where the raw log has
                # retired them (spec section 3).
                ev = accepted_events(store, users=users, buckets=np.array([b]), columns=cols)
            else:
                ev = pa.table({c: pa.array([], pa.int64()) for c in ("user_id", "event_id",
                               "event_ts", "arrival_ts", "action", *tenant.columns)})
            ev_pl = pl.from_arrow(ev)
            assert isinstance(ev_pl, pl.DataFrame)
            # The join holds (requests x history) rows: cut the bucket's requests into chunks
            # of bounded joined size so memory stays bounded for heavy users.
            ev_users = ev.column("user_id").to_numpy()
            eu, ec = np.unique(ev_users, return_counts=True)
            req = req.sort_by("user_id")
            ru = req.column("user_id").to_numpy()
            if len(eu):
                pos = np.minimum(np.searchsorted(eu, ru), len(eu) - 1)
                cost = np.where(eu[pos] == ru, ec[pos], 0) + 1
            else:  # none of the bucket's requesting users has history
                cost = np.ones(len(ru), dtype=np.int64)
            bounds = np.searchsorted(np.cumsum(cost), np.arange(1, cost.sum() // join_rows + 2)
                                     * join_rows, side="right")
            start = 0
            for end in [*bounds.tolist(), req.num_rows]:
                end = min(max(end, start + 1), req.num_rows)
                if end <= start:
                    continue
                part = req.slice(start, end - start)
                start = end
                fat = fat_rows_for(ev_pl, pl.from_arrow(part), tenant)  # type: ignore[arg-type]
                t = fat.sort("request_id").to_arrow()
                rows += t.num_rows
                events_total += int(fat["length"].sum())
                if order == "request_ts":
                    held.append(t)
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema, compression=COMPRESSION)
                writer.write_table(t.cast(writer.schema), row_group_size=row_group_rows)
            if progress:
                progress(f"fat rows: bucket {i + 1}, {rows} rows")
        if held:
            t = pa.concat_tables(held, promote_options="permissive").sort_by(
                [("request_ts", "ascending"), ("request_id", "ascending")])
            held.clear()
            writer = pq.ParquetWriter(tmp, t.schema, compression=COMPRESSION)
            writer.write_table(t, row_group_size=row_group_rows)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("no requests to write")
    os.replace(tmp, out)
    return {
        "tenant": tenant.name,
        "max_len": tenant.max_len,
        "requests": rows,
        "events": events_total,
        "bytes": os.path.getsize(out),
        "order": order,
        "out": out,
    }
