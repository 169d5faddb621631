"""Peers of the lmat reader, each producing the same per-request sequences (issue 6, item 2).

Every peer yields :class:`lmat_platform.reader.Batch` objects (ids, lengths, one flat tensor per
tenant column), so all are timed doing the same job: from stored data to training tensors.

* :func:`fat_union_batches`: the fat-row reader. Parquet list columns of the **union** fat rows
  (written at the widest projection, ``max_len`` 16384) read with pyarrow; each row's lists are
  cut to the tenant's last ``max_len`` values.
* :func:`duckdb_table`: DuckDB over the raw event log (the Parquet files of the raw Delta table's
  live version) with a window-function "last N before T" query.
* :func:`polars_table`: polars doing the same (lazy scan, join, window filter, group-by).
* :class:`NaiveDeltaLookup`: one filtered scan of the raw Delta table per request (sampled and
  extrapolated by the suite: it is far too slow for a full pass).
* :class:`LancePeer`: Lance ``take`` of each request's rows from a Lance copy of the events,
  sorted by (user, time), with an in-memory (user offsets, arrival_ts) index.

:func:`sequences_of` turns any of these into ``{request_id: {column: ndarray}}`` so outputs can be
compared element for element (:func:`diff_sequences`) before anything is timed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lmat_platform.protocol.pointers import expand_positions
from lmat_platform.reader import Batch
from lmat_platform.tenants import Tenant

#: Numeric ride-along request columns passed through as batch context.
CONTEXT = ("label", "candidate_item_id", "position")

Seqs = dict[int, dict[str, np.ndarray]]


# ------------------------------------------------------------------------------ list -> tensors


def _np(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    if pa.types.is_timestamp(a.type):
        a = a.cast(pa.int64())
    return np.asarray(a.to_numpy(zero_copy_only=False))


def batch_from_lists(
    rb: pa.RecordBatch | pa.Table, columns: Sequence[str], max_len: int, bytes_read: int = 0
) -> Batch:
    """A :class:`Batch` from rows with one list column per tenant column (null = empty list),
    keeping the last ``max_len`` values of each list. The tensors own their memory."""
    first = rb.column(columns[0])
    if isinstance(first, pa.ChunkedArray):
        first = first.combine_chunks()
    off = first.offsets.to_numpy().astype(np.int64)
    full = np.diff(off)
    if first.null_count:
        full = np.where(first.is_valid().to_numpy(zero_copy_only=False), full, 0)
    keep = np.minimum(full, max_len)
    cut = bool((keep < full).any())
    idx = expand_positions(off[1:] - keep, off[1:]) if cut or first.null_count else None
    values: dict[str, torch.Tensor] = {}
    for c in columns:
        a = rb.column(c)
        if isinstance(a, pa.ChunkedArray):
            a = a.combine_chunks()
        flat = _np(a.values)
        # A gather (a new array) where lists are cut, else a copy of the contiguous values.
        v = flat[idx] if idx is not None else np.array(flat[int(off[0]) : int(off[-1])], copy=True)
        values[c] = torch.from_numpy(v)
    names = rb.schema.names
    return Batch(
        request_id=torch.from_numpy(_np(rb.column("request_id")).astype(np.int64, copy=True)),
        lengths=torch.from_numpy(keep.astype(np.int64)),
        values=values,
        context={
            c: torch.from_numpy(np.array(_np(rb.column(c)), copy=True))
            for c in CONTEXT
            if c in names
        },
        user_id=torch.from_numpy(_np(rb.column("user_id")).astype(np.int64, copy=True)),
        request_ts=torch.from_numpy(_np(rb.column("request_ts")).astype(np.int64, copy=True)),
        bytes_read=bytes_read,
    )


def batches_of_table(
    table: pa.Table, columns: Sequence[str], max_len: int, batch_size: int
) -> Iterator[Batch]:
    """Cut a table of list rows into batches of ``batch_size`` rows."""
    for rb in table.to_batches(max_chunksize=batch_size):
        yield batch_from_lists(rb, columns, max_len)


def sequences_of(batches: Iterable[Batch], want: set[int] | None = None) -> Seqs:
    """``{request_id: {column: values}}`` of the requests in ``want`` (all if None)."""
    out: Seqs = {}
    for b in batches:
        off = (
            b.offsets().numpy()
            if hasattr(b, "offsets")
            else np.concatenate([[0], np.cumsum(b.lengths.numpy())])
        )
        for i, r in enumerate(b.request_id.tolist()):
            if want is None or r in want:
                out[r] = {c: v[off[i] : off[i + 1]].numpy() for c, v in b.values.items()}
        if want is not None and len(out) >= len(want):
            break
    return out


def diff_sequences(got: Seqs, want: Seqs) -> str | None:
    """None if ``got`` equals ``want`` on every request of ``want``; else the first difference."""
    for r, cols in want.items():
        if r not in got:
            return f"request {r} missing"
        for c, w in cols.items():
            g = got[r].get(c)
            if g is None:
                return f"request {r}: column {c} missing"
            if len(g) != len(w) or not np.array_equal(
                g.astype(np.float64), w.astype(np.float64), equal_nan=True
            ):
                return (
                    f"request {r} column {c}: got {len(g)} values {g[-3:].tolist()}, "
                    f"want {len(w)} values {w[-3:].tolist()}"
                )
    return None


# ------------------------------------------------------------------------------ fat rows


def fat_bytes(files: Sequence[str], names: Sequence[str]) -> int:
    """Compressed bytes of the column chunks of ``names`` in ``files`` (what a pass reads)."""
    total = 0
    for f in files:
        md = pq.read_metadata(f)
        idx = [i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] in names]
        total += sum(
            md.row_group(g).column(i).total_compressed_size
            for g in range(md.num_row_groups)
            for i in idx
        )
    return total


def fat_union_batches(
    files: Sequence[str], tenant: Tenant, batch_size: int, request_ids: set[int] | None = None
) -> Iterator[Batch]:
    """The fat-row reader over union fat files: the tenant's list columns, last ``max_len``.

    ``bytes_read`` per batch is the compressed size of the column chunks read, spread evenly
    over the rows of each file."""
    cols = list(tenant.columns)
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        want = ["request_id", "user_id", "request_ts", *cols, *[c for c in CONTEXT if c in names]]
        nbytes = fat_bytes([f], want)
        n_rows = pf.metadata.num_rows
        seen = 0
        for rb in pf.iter_batches(batch_size=batch_size, columns=want):
            if request_ids is not None:
                m = np.isin(rb.column("request_id").to_numpy(), np.fromiter(request_ids, np.int64))
                if not m.any():
                    continue
                rb = rb.filter(pa.array(m))
            share = nbytes * (seen + rb.num_rows) // n_rows - nbytes * seen // n_rows
            seen += rb.num_rows
            yield batch_from_lists(rb, cols, tenant.max_len, share)


# ------------------------------------------------------------------------------ SQL engines

_DUCK_TYPES = {
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.int16(): "SMALLINT",
    pa.int8(): "TINYINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
}


def duckdb_table(
    raw_files: Sequence[str],
    requests: pa.Table,
    tenant: Tenant,
    schema: pa.Schema,
    threads: int | None = None,
) -> pa.Table:
    """Every request's last ``max_len`` events with ``arrival_ts < request_ts``, in
    (event_ts, event_id) order, by a DuckDB window query over the raw log's Parquet files."""
    import duckdb

    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    req = requests.select(
        ["request_id", "user_id", "request_ts", *[c for c in CONTEXT if c in requests.column_names]]
    )
    con.register("req", req)
    cols = list(tenant.columns)
    lists = ", ".join(
        f"coalesce(a.{c}, []::{_DUCK_TYPES[schema.field(c).type]}[]) AS {c}" for c in cols
    )
    aggs = ", ".join(f"list({c} ORDER BY event_ts, event_id) AS {c}" for c in cols)
    ecols = ", ".join(dict.fromkeys(["user_id", "event_id", "event_ts", "arrival_ts", *cols]))
    jcols = ", ".join(f"e.{c}" for c in dict.fromkeys(["event_ts", "event_id", *cols]))
    files = "[" + ", ".join(f"'{f}'" for f in raw_files) + "]"
    sql = f"""
        WITH e AS (SELECT {ecols} FROM read_parquet({files})),
        j AS (
            SELECT r.request_id, {jcols},
                   row_number() OVER (PARTITION BY r.request_id
                                      ORDER BY e.event_ts DESC, e.event_id DESC) AS rn
            FROM req r JOIN e ON e.user_id = r.user_id AND e.arrival_ts < r.request_ts
            QUALIFY rn <= {int(tenant.max_len)}
        ),
        a AS (SELECT request_id, {aggs} FROM j GROUP BY request_id)
        SELECT r.*, {lists} FROM req r LEFT JOIN a USING (request_id) ORDER BY r.request_id
    """
    out = con.sql(sql).to_arrow_table()
    con.close()
    return out


def polars_table(raw_files: Sequence[str], requests: pa.Table, tenant: Tenant) -> pa.Table:
    """The same as :func:`duckdb_table`, with polars: lazy scan, join, sort, then a group-by
    keeping each request's last ``max_len`` rows. (A window-expression filter after the sort,
    ``int_range(len()).over(request_id) >= len().over(request_id) - N``, failed the parity check
    here with polars 2.1's lazy engine, so the group-by form is used.)"""
    import polars as pl

    cols = list(tenant.columns)
    ev = pl.scan_parquet(list(raw_files)).select(
        list(dict.fromkeys(["user_id", "event_id", "event_ts", "arrival_ts", *cols]))
    )
    req = pl.from_arrow(
        requests.select(
            [
                "request_id",
                "user_id",
                "request_ts",
                *[c for c in CONTEXT if c in requests.column_names],
            ]
        )
    )
    assert isinstance(req, pl.DataFrame)
    j = (
        req.lazy()
        .select(["request_id", "user_id", "request_ts"])
        .join(ev, on="user_id", how="inner")
        .filter(pl.col("arrival_ts") < pl.col("request_ts"))
        .sort(["request_id", "event_ts", "event_id"])
        .group_by("request_id", maintain_order=True)
        .agg([pl.col(c).tail(tenant.max_len) for c in cols])
    )
    out = req.lazy().join(j, on="request_id", how="left").sort("request_id").collect()
    return out.to_arrow()


# ------------------------------------------------------------------------------ per-request


class NaiveDeltaLookup:
    """One filtered scan of the raw Delta table per request (partition and row-group pruning by
    pyarrow, dataset opened once), then sort and keep the last ``max_len``."""

    def __init__(self, store: str, n_buckets: int):
        from lmat_platform.store import open_store
        from lmat_platform.store.core import delta_dataset

        st = open_store(store)
        raw = st.open_table("raw")
        assert raw is not None
        self.ds = delta_dataset(raw)
        self.n_buckets = n_buckets

    def batch(self, requests: pa.Table, tenant: Tenant) -> Batch:
        """Look up each request of ``requests`` on its own; one :class:`Batch` of all of them."""
        import pyarrow.dataset as pads

        from lmat_platform.hashing import bucket_of

        cols = list(tenant.columns)
        users = requests.column("user_id").to_numpy()
        ts = requests.column("request_ts").to_numpy()
        buckets = bucket_of(users, self.n_buckets)
        parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
        lengths = []
        for u, t, b in zip(users.tolist(), ts.tolist(), buckets.tolist(), strict=True):
            f = (
                (pads.field("bucket") == b)
                & (pads.field("user_id") == u)
                & (pads.field("arrival_ts") < t)
            )
            tab = self.ds.to_table(
                filter=f, columns=list(dict.fromkeys(["event_ts", "event_id", *cols]))
            )
            tab = tab.sort_by([("event_ts", "ascending"), ("event_id", "ascending")])
            tab = tab.slice(max(0, tab.num_rows - tenant.max_len))
            lengths.append(tab.num_rows)
            for c in cols:
                parts[c].append(_np(tab.column(c)))
        return Batch(
            request_id=torch.from_numpy(requests.column("request_id").to_numpy().copy()),
            lengths=torch.tensor(lengths, dtype=torch.int64),
            values={c: torch.from_numpy(np.concatenate(v)) for c, v in parts.items()},
            user_id=torch.from_numpy(users.copy()),
            request_ts=torch.from_numpy(ts.copy()),
        )


class LancePeer:
    """Lance ``take`` on a Lance copy of the events sorted by (user, event_ts, event_id).

    The index kept in memory is what a take-based reader needs: each user's row range and every
    row's ``arrival_ts`` (to apply the no-future-leakage rule); values come from ``take``."""

    def __init__(self, raw_files: Sequence[str], uri: str | Path, columns: Sequence[str]):
        import lance

        t0 = time.perf_counter()
        keep = list(dict.fromkeys(["user_id", "event_id", "event_ts", "arrival_ts", *columns]))
        ev = pa.concat_tables([pq.read_table(f, columns=keep) for f in raw_files])
        ev = ev.sort_by(
            [("user_id", "ascending"), ("event_ts", "ascending"), ("event_id", "ascending")]
        )
        self.ds = lance.write_dataset(ev, str(uri), mode="overwrite")
        self.write_s = time.perf_counter() - t0
        self.users = ev.column("user_id").to_numpy()
        self.arrival = ev.column("arrival_ts").to_numpy()
        self.nbytes = sum(f.stat().st_size for f in Path(uri).rglob("*") if f.is_file())

    def batch(self, requests: pa.Table | pa.RecordBatch, tenant: Tenant) -> Batch:
        """One ``take`` for all rows the requests of ``requests`` need."""
        users = _np(requests.column("user_id"))
        ts = _np(requests.column("request_ts"))
        s = np.searchsorted(self.users, users, side="left")
        e = np.searchsorted(self.users, users, side="right")
        idx: list[np.ndarray] = []
        lengths = np.zeros(len(users), dtype=np.int64)
        for i in range(len(users)):
            vis = np.flatnonzero(self.arrival[s[i] : e[i]] < ts[i])[-tenant.max_len :] + s[i]
            idx.append(vis)
            lengths[i] = len(vis)
        flat = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        tab = self.ds.take(pa.array(flat, pa.int64()), columns=list(tenant.columns))
        names = requests.schema.names
        return Batch(
            request_id=torch.from_numpy(_np(requests.column("request_id")).copy()),
            lengths=torch.from_numpy(lengths),
            values={
                c: torch.from_numpy(np.array(_np(tab.column(c)), copy=True)) for c in tenant.columns
            },
            context={
                c: torch.from_numpy(np.array(_np(requests.column(c)), copy=True))
                for c in CONTEXT
                if c in names
            },
            user_id=torch.from_numpy(users.astype(np.int64, copy=True)),
            request_ts=torch.from_numpy(ts.astype(np.int64, copy=True)),
        )


def take_rows(table: pa.Table, request_ids: Iterable[int]) -> pa.Table:
    """Rows of ``table`` whose ``request_id`` is in ``request_ids``."""
    ids = pa.array(np.fromiter(request_ids, np.int64))
    return table.filter(pc.is_in(table.column("request_id"), value_set=ids))
