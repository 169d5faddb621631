"""``SequenceLoader``: the late-materializing reader training jobs use (spec section 9).

How a pass is scheduled::

    thin table (pinned version)      work units                 consumers (rank x worker)
    bucket 0: 9,000 rows   ------>   (b0, part 0 of 2) ----+    rank 0 / worker 0: u3 u0 ...
                                     (b0, part 1 of 2)     +--> rank 0 / worker 1: u1 u4 ...
    bucket 1: 2,000 rows   ------>   (b1, part 0 of 1)    ...   rank 1 / worker 0: ...

* A **work unit** is a bucket, or a user-contiguous slice of one when the bucket holds more rows
  than fit the unit's value budget. One unit is one
  :func:`~lmat_platform.reconstruct.prepare_unit` (one pruned read of the bucket's UIH files
  serves every request of the unit: data affinity, no per-example lookups; kept in the decoded
  cache for later passes) and one :func:`~lmat_platform.reconstruct.plan_unit` every pass.
* Units are planned from the Delta log alone (row counts per bucket; no data read) and dealt
  to the ``world_size x max(num_workers, 1)`` consumers by bucket, the same way every epoch
  (:func:`assign_units`), so every rank computes the same plan, every request goes to exactly
  one consumer, and a consumer decodes disjoint buckets; with ``shuffle`` each consumer takes
  its units in an order drawn from ``(seed, epoch)``.
* A consumer reads its units in order, a background thread one or more units ahead
  (:mod:`~lmat_platform.reader.prefetch`). Consecutive units are grouped into **windows** of at
  most ``shuffle_buffer`` rows; with ``shuffle`` the rows of a window are permuted by
  ``(seed, epoch, consumer, window)`` (a bounded shuffle buffer). Batches are cut every
  ``batch_size`` rows of the consumer's stream.
* With ``num_workers > 0`` each consumer of the rank runs in its own process, kept across
  passes, and the main process takes batches from the workers round-robin (each batch one
  shared-memory buffer: :mod:`~lmat_platform.reader.workers`), so the order of batches is a
  pure function of the plan. That makes ``state_dict()`` small (rows consumed per consumer and whose turn it
  is) and resuming exact: a worker restarts at the window holding its next row.

Worker processes start with ``forkserver`` (``spawn`` where unavailable): ``fork`` is unsafe
because the delta-rs runtime the parent has used does not survive a fork.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from deltalake.exceptions import DeltaError

from lmat_platform.exceptions import LmatError, ThinTableError
from lmat_platform.hashing import bucket_of
from lmat_platform.kernels import is_sorted3, warm_up, warm_up_in_background
from lmat_platform.protocol.thin import (
    ROW_ORDER,
    TAIL_PREFIX,
    check_thin_owner,
    read_thin_file,
    thin_store_id,
)
from lmat_platform.reader.batch import Batch
from lmat_platform.reader.buffers import BufferPool, avoid_thp_stalls, shared_pool
from lmat_platform.reader.dedup import dedup_pieces
from lmat_platform.reader.errors import (
    ReaderPassCancelledError,
    ReaderWorkerError,
    StoreUnreachableError,
)
from lmat_platform.reader.prefetch import Prefetcher, close_at_exit
from lmat_platform.reader.workers import WorkerPool, worker_loop
from lmat_platform.reconstruct import (
    THIN_KEYS,
    ReadContext,
    SegmentPlan,
    Sequences,
    ThinRows,
    column_array,
    event_columns,
    is_context_column,
    plan_unit,
    prepare_unit,
    tensor_numpy,
    thin_columns,
)
from lmat_platform.store.cache import bucket_scope, cache
from lmat_platform.store.core import (
    Store,
    as_store,
    delta_dataset,
    derived,
    derived_keyed,
)
from lmat_platform.store.deletion import forgotten_users, pending_users
from lmat_platform.tenants import Tenant

log = logging.getLogger(__name__)

# A process that imports the loader will read: no huge-page stalls on the memory its first
# passes decode into (buffers.avoid_thp_stalls), and numba's start-up and the kernels' cache
# loads begin now, beside whatever it does before its first pass
# (kernels.warm_up_in_background).
avoid_thp_stalls()
warm_up_in_background()

#: Values (events x columns are not multiplied in) a work unit aims at where a unit's sequences
#: are materialized (the Ray backend): bounds one unit to roughly ``UNIT_VALUES * 8 bytes`` per
#: tenant column.
UNIT_VALUES = 1 << 23
#: Rows of a work unit of the loader. Its units are copy plans (head rows, tail events and a
#: few segments per request, whatever max_len), the values being copied per batch, so a unit can
#: be a whole bucket: one pruned read and no split.
UNIT_ROWS = 2048

STATE_VERSION = 1


# ---------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class WorkUnit:
    """A bucket, or slice ``part`` of ``parts`` of it (rows sorted by user, time, id)."""

    bucket: int
    part: int
    parts: int
    #: Rows of the unit.
    rows: int
    #: Rows of the whole bucket (the slice bounds are computed from it).
    bucket_rows: int

    @property
    def bounds(self) -> tuple[int, int]:
        n, k = self.bucket_rows, self.parts
        return self.part * n // k, (self.part + 1) * n // k


def plan_units(
    bucket_rows: dict[int, int],
    *,
    max_unit_rows: int,
    min_units: int = 1,
) -> list[WorkUnit]:
    """Split buckets into units of at most ``max_unit_rows`` rows, and into at least
    ``min_units`` units where rows allow (so that no consumer idles for want of a unit)."""
    parts = {b: max(1, math.ceil(n / max_unit_rows)) for b, n in bucket_rows.items() if n > 0}
    while parts and sum(parts.values()) < min_units:
        # Split the bucket with the largest slices further (ties: lowest bucket id).
        b = max(parts, key=lambda k: (bucket_rows[k] / parts[k], -k))
        if bucket_rows[b] // (parts[b] + 1) < 1:
            break
        parts[b] += 1
    units = []
    for b in sorted(parts):
        n, k = bucket_rows[b], parts[b]
        for i in range(k):
            lo, hi = i * n // k, (i + 1) * n // k
            units.append(WorkUnit(b, i, k, hi - lo, n))
    return units


def assign_units(
    units: list[WorkUnit], n_consumers: int, *, seed: int, epoch: int, shuffle: bool
) -> list[list[WorkUnit]]:
    """Deal units to consumers, then order each consumer's units. Deterministic on every rank.

    Dealing is the same every epoch, so a persistent worker reads the same buckets each pass
    (and finds them in its decoded cache when it has room): whole buckets, largest first, each
    to the least loaded consumer (ties: lowest index), so each bucket's thin rows are decoded
    by one consumer; then, while a consumer has more than the largest unit's rows above
    another, its last unit moves to the least loaded one (so loads differ by at most one
    unit's rows, and only such moves split a bucket between consumers).

    With ``shuffle`` each consumer's units come in an order drawn from ``(seed, epoch)``:
    its buckets in random order, the slices of one bucket together (in random order), so a
    consumer meets a bucket's slices one after another and decodes its thin rows once per
    pass; without, in bucket order."""
    span = max((u.rows for u in units), default=0)
    groups: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u.bucket, []).append(i)
    size = {b: sum(units[i].rows for i in g) for b, g in groups.items()}
    loads = np.zeros(n_consumers, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(n_consumers)]
    for b in sorted(groups, key=lambda b: (-size[b], b)):
        c = int(np.argmin(loads))
        out[c].extend(groups[b])
        loads[c] += size[b]
    while n_consumers > 1:
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        if loads[hi] - loads[lo] <= span or not out[hi]:
            break
        i = out[hi].pop()
        out[lo].append(i)
        loads[hi] -= units[i].rows
        loads[lo] += units[i].rows
    out = [sorted(idx) for idx in out]
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        rank = {b: k for k, b in enumerate(rng.permutation(sorted({u.bucket for u in units})))}
        within = rng.permutation(len(units))
        out = [sorted(idx, key=lambda i: (rank[units[i].bucket], within[i])) for idx in out]
    return [[units[i] for i in idx] for idx in out]


def windows_of(units: list[WorkUnit], shuffle_buffer: int) -> list[list[int]]:
    """Group consecutive units into windows of at most ``shuffle_buffer`` rows (>= 1 unit)."""
    out: list[list[int]] = []
    rows = 0
    for i, u in enumerate(units):
        if out and rows + u.rows <= shuffle_buffer:
            out[-1].append(i)
            rows += u.rows
        else:
            out.append([i])
            rows = u.rows
    return out


# ---------------------------------------------------------------------------------- consumer


@dataclass
class _Window:
    """Reconstructed rows of one window, ready to cut into batches: ids and lengths as numpy,
    the sequences as a copy plan (each batch copies its rows' segments once)."""

    request_id: np.ndarray
    user_id: np.ndarray
    request_ts: np.ndarray
    lengths: np.ndarray
    plan: SegmentPlan
    context: dict[str, np.ndarray]
    bytes_read: int
    thin_bytes_read: int
    perm: np.ndarray | None

    @property
    def n(self) -> int:
        return len(self.request_id)


def tensorable(t: pa.DataType) -> bool:
    """Types a column may have to become a tensor."""
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_duration(t)
    )


def _tensor(a: np.ndarray) -> torch.Tensor:
    # Arrow-backed arrays are read-only; torch wants writable memory it owns.
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, copy=True)
    return torch.from_numpy(a)


@dataclass
class ConsumerSpec:
    """Everything one consumer needs; picklable (sent to worker processes)."""

    ctx: ReadContext
    thin_uri: str
    thin_version: int
    thin_columns: list[str]
    context_columns: list[str]
    units: list[WorkUnit]
    consumer: int
    batch_size: int
    drop_last: bool
    shuffle: bool
    seed: int
    epoch: int
    shuffle_buffer: int
    prefetch: int
    timeout_s: float | None
    #: Rows of this consumer's stream already consumed (a multiple of batch_size, or all).
    start_row: int = 0
    #: Deduplicated batches (:mod:`lmat_platform.reader.dedup`).
    dedup: bool = False

    @property
    def total_rows(self) -> int:
        return sum(u.rows for u in self.units)


class _UnitReader:
    """Reads and reconstructs work units; opens the thin table lazily, once per process."""

    def __init__(self, spec: ConsumerSpec):
        self.spec = spec
        self._files: tuple[pads.Dataset, dict[int | None, list[pads.Fragment]]] | None = None
        # The last bucket's thin rows: the units of a split bucket are dealt out together, so
        # one read of the bucket serves all of this process's slices.
        self._cached: tuple[int, ThinRows] | None = None
        # The same for the last bucket's head summaries and (split buckets) tier row groups,
        # whatever the decoded cache's budget (store.cache.bucket_scope).
        self._memo: tuple[int, dict[Any, Any]] = (-1, {})

    def scope(self, unit: WorkUnit) -> contextlib.AbstractContextManager[None]:
        """The bucket scope to prepare ``unit`` in: shared with the other units of its bucket
        this reader reads in a row, emptied when it moves to another bucket."""
        if self._memo[0] != unit.bucket:
            self._memo = (unit.bucket, {})
        return bucket_scope(self._memo[1], tier=unit.parts > 1)

    def _bucket_frags(self, bucket: int) -> list[pads.Fragment]:
        """The bucket's thin files, sorted by path."""
        return self._thin_files()[1].get(bucket, [])

    def _bucket_rows(self, bucket: int) -> ThinRows:
        """The bucket's thin rows (projected, in (user, request time, request id) order, tails
        flattened)."""
        if self._cached is not None and self._cached[0] == bucket:
            return self._cached[1]
        ds, frags = self._thin_files()
        t = self.spec.ctx.tenant
        rows = _thin_bucket(frags.get(bucket, []), ds.schema, self.spec.thin_columns,
                            event_columns(t), self.spec.ctx.schema, tail_limit(t))
        # Users whose forget is pending are not served (their rows are being deleted).
        rows = rows.without_users(self.spec.ctx.hidden)
        self._cached = (bucket, rows)
        return rows

    def _thin_files(self) -> tuple[pads.Dataset, dict[int | None, list[pads.Fragment]]]:
        if self._files is None:
            self._files = _thin_dataset(self.spec.thin_uri, self.spec.thin_version)
        return self._files

    def _unit_rows(self, unit: WorkUnit) -> ThinRows:
        thin = self._bucket_rows(unit.bucket)
        n = thin.num_rows
        if n != unit.bucket_rows or not n:
            raise ThinTableError(
                f"{self.spec.thin_uri}: bucket {unit.bucket} has {n} rows at "
                f"version {self.spec.thin_version}, but its log says {unit.bucket_rows}"
            )
        # A user-contiguous slice (zero-copy), so slices of a bucket read mostly disjoint
        # row groups of the tier.
        return thin.slice(*unit.bounds) if unit.parts > 1 else thin

    def read(self, unit: WorkUnit, *, plan_only: bool = True) -> Sequences:
        """Reconstruct one unit: as a copy plan (batches copy from it), or as Arrow values.

        A unit's checked planner inputs are kept in the decoded cache, named by its thin
        files, slice and columns (and the store's state): a later pass over them plans and
        copies every sequence again, but does not decode, check or look anything up again."""
        store = self.spec.ctx.store
        try:
            frags = self._bucket_frags(unit.bucket)
            # Under the bucket's thin-file key, so it goes with the bucket's other entries.
            key = (*_thin_key(frags), unit.bounds, unit.bucket_rows,
                   tuple(self.spec.thin_columns))
            with self.scope(unit):
                prep = prepare_unit(self.spec.ctx, unit.bucket, lambda: self._unit_rows(unit),
                                    key=key)
            seqs = plan_unit(prep, plan_only=plan_only)
            thin_bytes = sum(_thin_bytes(f, self.spec.thin_columns) for f in frags)
        except LmatError as e:
            if not _reachable(store):
                raise StoreUnreachableError(
                    f"store {store.root} became unreachable while reading bucket {unit.bucket}: {e}"
                ) from e
            raise
        except (OSError, DeltaError) as e:
            raise StoreUnreachableError(
                f"cannot read bucket {unit.bucket} of store {store.root} "
                f"(thin table {self.spec.thin_uri}): {e}"
            ) from e
        # Each unit counts its rows' share of the bucket's thin bytes (integer shares that sum
        # to the whole), so a pass counts every thin file once however its slices are dealt
        # to consumers, workers or Ray actors, and in whatever order they come.
        lo, hi = unit.bounds
        n = unit.bucket_rows
        share = thin_bytes * hi // n - thin_bytes * lo // n
        seqs.bytes_read += share
        seqs.stats["thin_bytes"] = share
        return seqs


def _summary_server(store: Store, tenant: Tenant) -> Any:
    """The point-in-time summary server of a summary tenant (None for others)."""
    if tenant.summary is None:
        return None
    from lmat_platform.summaries.serving import SummaryServer

    return SummaryServer(store, tenant)


def _thin_dataset(
    uri: str, version: int
) -> tuple[pads.Dataset, dict[int | None, list[pads.Fragment]]]:
    """A thin table version as a dataset, and its files per bucket (from their partition
    values, sorted by path): built once per process and version (a version's files never
    change), for every pass and loader that reads it."""
    got, _ = derived_keyed(uri, "reader-dataset", _dataset_by_bucket, version=version)
    if got is None:
        raise ThinTableError(f"{uri}: the thin table is gone")
    return got


def _dataset_by_bucket(dt: Any) -> tuple[pads.Dataset, dict[int | None, list[pads.Fragment]]]:
    ds = delta_dataset(dt)
    frags: dict[int | None, list[pads.Fragment]] = {}
    for f in ds.get_fragments():
        b = pads.get_partition_keys(f.partition_expression).get("bucket")
        frags.setdefault(None if b is None else int(b), []).append(f)
    for fl in frags.values():
        fl.sort(key=lambda f: f.path)
    return ds, frags


#: Per bucket folder of a thin table: the file set whose rows this process keeps cached.
_THIN_KEPT: dict[str, tuple[Any, ...]] = {}
_THIN_LOCK = threading.Lock()


def _thin_key(frags: list[pads.Fragment]) -> tuple[Any, ...]:
    """The key prefix of everything kept for a bucket's thin files (its decoded pieces, the
    units prepared from them)."""
    return ("thin", tuple(f.path for f in frags))


def _thin_bytes(frag: pads.Fragment, columns: list[str]) -> int:
    """Compressed bytes of ``columns`` in one thin file (from its footer; remembered)."""
    dc = cache()
    key = ("thin-bytes", frag.path, tuple(columns))
    nbytes = dc.get(key)
    if nbytes is None:
        md = frag.metadata
        want = set(columns)
        idx = [i for i in range(md.num_columns)
               if md.schema.column(i).path.split(".")[0] in want]
        nbytes = sum(md.row_group(g).column(i).total_compressed_size
                     for g in range(md.num_row_groups) for i in idx)
        dc.put(key, nbytes, 64, evict=False)
    return int(nbytes)


def tail_limit(tenant: Tenant) -> int | None:
    """How many of a request's last tail events (in order) a tenant can use: its ``max_len``,
    or None (all) where an action filter may reach further back or a summary server reads
    the tails itself."""
    return tenant.max_len if tenant.actions is None and tenant.summary is None else None


def _thin_bucket(
    frags: list[pads.Fragment], schema: pa.Schema, columns: list[str], events: list[str],
    store_schema: pa.Schema, limit: int | None = None,
) -> ThinRows:
    """One bucket's thin files as :class:`ThinRows`: ``columns`` read, rows merged in
    (user, request time, request id) order, the tails of ``events`` flattened and typed as in
    ``store_schema``; a request's tail that must be copied to be in order keeps only its last
    ``limit`` events (:meth:`ThinRows.from_table`).

    Decoded once per process: the files are immutable, so the decoded cache
    (:mod:`lmat_platform.store.cache`) keeps each piece, keyed by the bucket's files and the
    column, for later passes and other tenants' loaders, while it has room."""
    dc = cache()
    base = _thin_key(frags)
    scalars = [c for c in columns if not c.startswith(TAIL_PREFIX) or c in THIN_KEYS]
    keys: dict[str, tuple[Any, ...]] = {
        **{c: (*base, "col", c) for c in scalars},
        **{c: (*base, "tail", c, str(store_schema.field(c).type), limit) for c in events},
    }
    got = {c: dc.get(k) for c, k in keys.items()}
    spans = dc.get((*base, "tail_spans", limit))
    ordered = dc.get((*base, "tails_sorted", limit))
    if spans is not None and ordered is not None and all(v is not None for v in got.values()):
        return ThinRows(pa.table({c: got[c] for c in scalars}), spans[0], spans[1],
                        {c: got[c] for c in events}, ordered)
    if frags:
        # Files were added to or replaced in this bucket since it was last kept: what was kept
        # for its older file set goes, so that stale rows do not hold the room new ones need.
        folder = os.path.dirname(frags[0].path)
        with _THIN_LOCK:
            prev = _THIN_KEPT.get(folder)
            _THIN_KEPT[folder] = base
        if prev is not None and prev != base:
            # The old file set's pieces, and the units prepared from its rows.
            dc.discard_where(lambda k: k[:len(prev)] == prev)
    # The files' rows are flattened together (a row may point into tails stored in another
    # row of its user, in any file of the bucket), then merged in (user, request time,
    # request id) order by moving their spans: tail events are never copied to merge.
    parts = [read_thin_file(frag, schema, columns) for frag in frags]
    parts = [t for t in parts if t.num_rows]
    rows = (schema.empty_table().select(columns) if not parts
            else pa.concat_tables(parts) if len(parts) > 1 else parts[0])
    thin = ThinRows.from_table(rows, events, store_schema, limit=limit)
    if parts:
        order = [column_array(thin.table, k).to_numpy() for k in ROW_ORDER]
        if not is_sorted3(*order):
            # lmat writes each file in this order; several files, or a file from elsewhere,
            # are merged here.
            thin = thin.take(np.lexsort(order[::-1]))
    thin = replace(thin, table=thin.table.combine_chunks())
    for c in scalars:
        a = column_array(thin.table, c)
        dc.put(keys[c], a, a.nbytes, evict=False)
    for c in events:
        dc.put(keys[c], thin.tails[c], thin.tails[c].nbytes, evict=False)
    dc.put((*base, "tail_spans", limit), (thin.t_start, thin.t_end),
           thin.t_start.nbytes + thin.t_end.nbytes, evict=False)
    dc.put((*base, "tails_sorted", limit), thin.tails_sorted, 8, evict=False)
    return thin


def _reachable(store: Store) -> bool:
    try:
        fs, root = store.filesystem()
        return all(
            fs.get_file_info(f"{root}/{p}").type.name != "NotFound" for p in ("_lmat.json", "uih")
        )
    except OSError:
        return False


def _window(parts: list[Sequences], spec: ConsumerSpec, index: int) -> _Window:
    rid = np.concatenate([p.request_id for p in parts])
    lengths = np.concatenate([p.lengths for p in parts]).astype(np.int64)
    plans = [p.plan for p in parts]
    assert all(pl is not None for pl in plans), "units are reconstructed with plan_only"
    context = {
        c: np.concatenate([tensor_numpy(p.context.column(c)) for p in parts])
        for c in spec.context_columns
    }
    perm = None
    if spec.shuffle:
        perm = np.random.default_rng([spec.seed, spec.epoch, spec.consumer, index]).permutation(
            len(rid)
        )
    return _Window(
        rid,
        np.concatenate([p.user_id for p in parts]),
        np.concatenate([p.request_ts for p in parts]),
        lengths,
        SegmentPlan.concat([pl for pl in plans if pl is not None]),
        context,
        sum(p.bytes_read for p in parts),
        sum(p.stats.get("thin_bytes", 0) for p in parts),
        perm,
    )


def _piece(w: _Window, a: int, b: int) -> dict[str, Any]:
    """Rows a..b (in the window's stream order): ids as numpy, sequences as plan segments."""
    # Each row carries an equal share of its window's bytes; integer shares that sum exactly.
    n = max(w.n, 1)
    share = w.bytes_read * b // n - w.bytes_read * a // n
    thin_share = w.thin_bytes_read * b // n - w.thin_bytes_read * a // n
    rows: slice | np.ndarray = slice(a, b) if w.perm is None else w.perm[a:b]
    lens = w.lengths[rows]
    s0, s1 = w.plan.segments(rows)
    return {
        "request_id": w.request_id[rows], "user_id": w.user_id[rows],
        "request_ts": w.request_ts[rows], "lengths": lens,
        "plan": w.plan, "s0": s0, "s1": s1, "n": int(lens.sum()),
        "context": {c: v[rows] for c, v in w.context.items()},
        "bytes_read": share, "thin_bytes_read": thin_share, "rows": rows,
    }


#: Arrays for one batch's columns: (values, dtype) each -> writable arrays.
Alloc = Callable[[list[tuple[int, np.dtype]]], list[np.ndarray]]


def _pool_alloc(pool: BufferPool) -> Alloc:
    return lambda sizes: [pool.empty(n, dt) for n, dt in sizes]


def _batch(pieces: list[dict[str, Any]], columns: tuple[str, ...], alloc: Alloc,
           dedup: bool = False) -> Batch:
    """One batch from pieces of one or more windows: every column's values are copied from
    the plans' sources straight into the batch's own buffer (one write per value), taken from
    ``pool`` (memory already touched, once the consumer has dropped an earlier batch); with
    ``dedup``, each distinct sequence once (:func:`~lmat_platform.reader.dedup.dedup_pieces`)."""
    inverse = None
    if dedup:
        pieces, inverse = dedup_pieces(pieces)
    total = sum(q["n"] for q in pieces)
    # Every plan's sources of a column have the store schema's type, so one dtype.
    outs = alloc([(total, pieces[0]["plan"].head[c].dtype) for c in columns])
    o = 0
    for q in pieces:
        # All columns of a piece in one compiled call (segments checked once).
        q["plan"].copy_all(columns, q["s0"], q["s1"], outs, o)
        o += q["n"]
    values = {c: torch.from_numpy(out) for c, out in zip(columns, outs, strict=True)}
    if len(pieces) == 1:
        p = pieces[0]
    else:
        p = {
            k: np.concatenate([q[k] for q in pieces])
            for k in ("request_id", "user_id", "request_ts", "lengths")
        }
        p["context"] = {c: np.concatenate([q["context"][c] for q in pieces])
                        for c in pieces[0]["context"]}
        p["bytes_read"] = sum(q["bytes_read"] for q in pieces)
        p["thin_bytes_read"] = sum(q["thin_bytes_read"] for q in pieces)
    return Batch(
        request_id=_tensor(p["request_id"].astype(np.int64, copy=False)),
        lengths=_tensor(p["lengths"].astype(np.int64, copy=False)),
        values=values,
        context={c: _tensor(v) for c, v in p["context"].items()},
        user_id=_tensor(p["user_id"].astype(np.int64, copy=False)),
        request_ts=_tensor(p["request_ts"].astype(np.int64, copy=False)),
        bytes_read=int(p["bytes_read"]),
        thin_bytes_read=int(p["thin_bytes_read"]),
        inverse_indices=None if inverse is None else torch.from_numpy(inverse),
    )


def iter_consumer(
    spec: ConsumerSpec, alloc: Alloc | None = None, *, read_ahead: bool = True,
) -> Generator[tuple[int, Batch], None, None]:
    """The batches of one consumer from row ``spec.start_row`` on, as (stream end row, batch).
    ``alloc`` gives each batch's value arrays (default: this process's buffer pool).
    ``read_ahead``: a thread reads ``spec.prefetch`` units ahead; False: each unit is read
    when its batches are wanted, in this thread (nothing is read that is not used)."""
    B = spec.batch_size
    total = spec.total_rows
    wins = windows_of(spec.units, spec.shuffle_buffer)
    starts = np.cumsum([0] + [sum(spec.units[i].rows for i in w) for w in wins])
    # Resume at the window holding the next row; windows before it are never read.
    first = int(np.searchsorted(starts, spec.start_row, side="right")) - 1
    if spec.start_row >= total or first >= len(wins):
        return
    reader = _UnitReader(spec)
    alloc = alloc or _pool_alloc(shared_pool())
    todo = [i for w in wins[first:] for i in w]

    def produce() -> Generator[Sequences, None, None]:
        for i in todo:
            yield reader.read(spec.units[i])

    units: Prefetcher[Sequences] | Generator[Sequences, None, None] = (
        Prefetcher(produce, depth=spec.prefetch, timeout_s=spec.timeout_s,
                   name=f"lmat-prefetch-{spec.consumer}") if read_ahead else produce())
    pos = spec.start_row
    pending: list[dict[str, Any]] = []
    pending_rows = 0
    try:
        for wi in range(first, len(wins)):
            parts = [next(units) for _ in wins[wi]]
            n_expected = int(starts[wi + 1] - starts[wi])
            if sum(len(p) for p in parts) != n_expected:
                raise ThinTableError(
                    f"{spec.thin_uri}: read {sum(len(p) for p in parts)} rows for window {wi}, "
                    f"expected {n_expected}"
                )
            w = _window(parts, spec, wi)
            del parts
            a = pos - int(starts[wi])
            while a < w.n:
                b = min(w.n, a + B - pending_rows)
                pending.append(_piece(w, a, b))
                pending_rows += b - a
                pos += b - a
                a = b
                if pending_rows == B:
                    yield pos, _batch(pending, spec.ctx.tenant.columns, alloc, spec.dedup)
                    pending, pending_rows = [], 0
        if pending_rows and not spec.drop_last:
            yield pos, _batch(pending, spec.ctx.tenant.columns, alloc, spec.dedup)
    finally:
        units.close()


# ---------------------------------------------------------------------------------- workers


def _worker_main(w: int, tasks: Any, out: Any, stop: Any, current: Any,
                 flags: torch.Tensor) -> None:
    """Body of a persistent worker process (see :mod:`lmat_platform.reader.workers`)."""
    worker_loop(w, tasks, out, stop, current, flags, iter_consumer)


def _mp_context() -> Any:
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    method = "forkserver" if "forkserver" in methods else "spawn"
    ctx = torch.multiprocessing.get_context(method)
    if method == "forkserver":
        # Import the heavy modules once in the server; each worker then forks from it cheaply.
        ctx.set_forkserver_preload(["lmat_platform.reader.loader",
                                    "lmat_platform.reader.workers"])
    return ctx


_GUARD_FIX = (
    'put the code that builds and iterates the loader under `if __name__ == "__main__":` in a '
    "script file (or use num_workers=0)"
)


def _check_workers_can_start(ctx: Any) -> None:
    """Fail before starting workers that could not start, with the cause and the fix.

    Under ``forkserver`` and ``spawn`` each worker imports the main module again from its file.
    Code piped to ``python -`` has no file (``<stdin>``), so every worker would die at start-up
    with a FileNotFoundError; a worker that is itself importing the main module (an unguarded
    script re-run in the worker) must not start workers of its own.
    """
    import multiprocessing as mp
    import sys

    method = ctx.get_start_method()
    if getattr(mp.current_process(), "_inheriting", False):
        raise ReaderWorkerError(
            f"SequenceLoader started worker processes while this process was itself starting "
            f"as a worker ({method}): the main script is not import-guarded, so each worker runs "
            f"it again; {_GUARD_FIX}"
        )
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    line = _unguarded_main_line()
    if line is not None:
        raise ReaderWorkerError(
            f"SequenceLoader(num_workers>0) is iterated by the main script {path!r} at line "
            f"{line}, outside `if __name__ == \"__main__\":`; each worker ({method}) would import "
            f"that script again and run this line itself; {_GUARD_FIX}"
        )
    if getattr(main, "__spec__", None) is None and path and not os.path.exists(path):
        raise ReaderWorkerError(
            f"SequenceLoader(num_workers>0) starts workers with {method}, which import the main "
            f"module again from its file, but it has none ({path!r}: code piped to `python -`?); "
            f"save it to a file and run that, with the loader's code under "
            '`if __name__ == "__main__":` (or use num_workers=0)'
        )


def _is_main_guard(test: Any) -> bool:
    """Whether an ``if`` test is ``__name__ == "__main__"`` (either way round)."""
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = (test.left, test.comparators[0])
    return (any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
            and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides))


def _unguarded_main_line() -> int | None:
    """The line of the main script's top-level code that led to this call, when it is not
    inside an ``if __name__ == "__main__":`` block (a worker importing the script would run it
    again); None when it is guarded, when the caller is not the script's top level, or when
    the script cannot be read (no file: ``python -c``, a notebook)."""
    import ast
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or not os.path.exists(path):
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main)
                                     and frame.f_code.co_name == "<module>"):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or os.path.abspath(frame.f_code.co_filename) != os.path.abspath(path):
        return None
    line = frame.f_lineno
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and _is_main_guard(node.test)
                and node.body[0].lineno <= line <= (node.body[-1].end_lineno or line)):
            return None
    return line


def _startup_failure_hint(ctx: Any) -> str:
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    script = f"the main script {path!r}" if path else "the main module"
    return (
        f"It died before sending anything, so it failed while starting: with {ctx.get_start_method()} "
        f"each worker imports {script} again, and the usual cause is a script that builds and "
        f"iterates the loader at import time. Fix: {_GUARD_FIX}. The worker's own traceback is "
        "on stderr above"
    )


# ---------------------------------------------------------------------------------- loader


@dataclass
class _Progress:
    epoch: int
    rows_done: list[int]
    next_consumer: int = 0
    batches: int = 0
    complete: bool = False


@dataclass
class _ThinInfo:
    version: int
    bucket_rows: dict[int, int]
    schema: pa.Schema
    snap_min: int | None
    snap_max: int | None
    files: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _thin_info(store: Store, uri: str) -> _ThinInfo:
    """Rows per bucket, schema and snapshot range of a thin table's latest version, from its
    log (once per version and process)."""
    got = derived(uri, "reader-info", lambda dt: (thin_store_id(dt), _thin_info_of(dt)))
    if got is None:
        raise ThinTableError(f"{uri}: no thin table here")
    check_thin_owner(got[0], store, uri)
    info: _ThinInfo = got[1]
    return info


def _thin_info_of(dt: Any) -> _ThinInfo:
    t = pa.table(dt.get_add_actions(flatten=True))
    rows: dict[int, int] = {}
    for b, n in zip(t.column("partition.bucket").to_pylist(), t.column("num_records").to_pylist(),
                    strict=True):
        rows[int(b)] = rows.get(int(b), 0) + int(n or 0)
    lo = hi = None
    if t.num_rows and "min.snapshot_id" in t.column_names:
        mins = t.column("min.snapshot_id")
        maxs = t.column("max.snapshot_id")
        if mins.null_count == 0 and maxs.null_count == 0:
            lo, hi = pc.min(mins).as_py(), pc.max(maxs).as_py()
    if t.num_rows and (lo is None or hi is None):
        # No statistics in the log: read the one narrow column.
        s = delta_dataset(dt).to_table(columns=["snapshot_id"]).column("snapshot_id")
        mm = pc.min_max(s)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
    schema = pa.schema(dt.schema().to_arrow())
    return _ThinInfo(dt.version(), rows, schema, lo, hi, t.num_rows)


def _without_hidden(info: _ThinInfo, uri: str, hidden: np.ndarray, n_buckets: int) -> _ThinInfo:
    """``info`` with the rows of users whose forget is pending taken out of the row counts (a
    pass does not serve them); counted from the user column of their buckets only."""
    if not len(hidden):
        return info
    _, frags = _thin_dataset(uri, info.version)
    rows = dict(info.bucket_rows)
    for b in np.unique(bucket_of(hidden, n_buckets)).tolist():
        if not rows.get(b):
            continue
        u = pa.concat_arrays([column_array(f.to_table(columns=["user_id"]), "user_id")
                              for f in frags.get(b, [])])
        rows[b] -= int(np.isin(u.to_numpy(), hidden).sum())
    return replace(info, bucket_rows=rows)


class _Starting:
    """A :class:`WorkerPool` being started in a thread: ``make`` (the kernels' warm-up and the
    pool's objects, C++ code of numba and torch, milliseconds once the kernels are warm), then
    the pool's processes (seconds: each imports the reader). :meth:`close` waits for the first
    part only: an interpreter must not stop a thread inside C++ code, but one waiting for a new
    process to start is safe to leave, and a closed loader or an exiting process does not wait
    seconds for workers it will not use (the thread stops them itself once they are up)."""

    def __init__(self, make: Callable[[], WorkerPool]):
        self._pool: WorkerPool | None = None
        self._error: BaseException | None = None
        self._made = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, args=(make,),
                                        name="lmat-start-workers", daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], WorkerPool]) -> None:
        try:
            try:
                pool = make()
            finally:
                self._made.set()
            if not self._abandoned:
                pool.start()
        except BaseException as e:  # raised by result() in the loader's thread
            self._error = e
            return
        with self._lock:
            abandoned = self._abandoned
            if not abandoned:
                self._pool = pool
        if abandoned:
            pool.close()

    def result(self, *, quiet: bool = False) -> WorkerPool | None:
        """The started pool (waits for it); raises what starting it raised (``quiet``: logs
        it and returns None)."""
        self._thread.join()
        if self._error is not None:
            if not quiet:
                raise self._error
            log.warning("starting reader workers failed: %s", self._error)
        return self._pool

    def done(self) -> bool:
        """Whether the start has ended (the pool is there, or starting it failed)."""
        return not self._thread.is_alive()

    def close(self) -> None:
        """Stop the pool: now if it is up, else as soon as its start is done (by the starting
        thread; only the C++ part of the start is waited for)."""
        self._made.wait()
        with self._lock:
            self._abandoned = True
            pool = self._pool
        if pool is not None:
            pool.close()


class SequenceLoader(torch.utils.data.IterableDataset):
    """Batches of a tenant's reconstructed sequences for every request of a thin table.

    One pass yields every request exactly once across all workers and ranks, each sequence
    equal to what ``lmat materialize`` writes for it. Iterate it directly (it runs its own
    worker processes when ``num_workers > 0``), or hand it to a ``torch.utils.data.DataLoader``
    with ``batch_size=None`` and ``multiprocessing_context="forkserver"`` (or ``"spawn"``), in
    which case it shards by the DataLoader's worker info and ``num_workers`` here must be 0.

    The thin table's version and the store's state are pinned when the loader is built, so every
    worker and rank reads the same rows.

    Args:
        store: the store (root path or URI, or an opened :class:`Store`).
        thin: the thin table (a Delta table path or URI).
        tenant: the projection to reconstruct.
        batch_size: requests per batch.
        num_workers: worker processes of this rank (0: read in this process).
        shuffle: shuffle unit order and rows within a window, by ``(seed, epoch)``.
        seed: the shuffle seed; every rank must use the same.
        rank, world_size: this trainer's rank among ``world_size``.
        shuffle_buffer: rows per shuffle window (consecutive units mixed together); defaults to
            one unit per window. Memory holds about one window plus ``prefetch`` units.
        prefetch: units read ahead per consumer (bounded queue); also batches queued per worker.
        drop_last: drop each consumer's last, partial batch (breaks exactly-once by design).
        verify: check each pointer against the stored head (O2O consistency).
        max_unit_rows: rows per work unit (default :data:`UNIT_ROWS`).
        timeout_s: longest wait for one batch or unit before :class:`ReaderTimeoutError`.
        pin_memory: return batches in page-locked memory (when an accelerator is present).
        persistent_workers: keep the worker processes (and what each has decoded and
            compiled) from one pass to the next; :meth:`close` stops them. False: workers
            start and stop with every pass.
        dedup: deduplicated batches (RecD): each distinct sequence of a batch once, with
            ``Batch.inverse_indices`` naming each request's (:mod:`lmat_platform.reader.dedup`);
            ``Batch.expand()`` gives the plain batch.
    """

    def __init__(
        self,
        store: Store | str,
        thin: str,
        *,
        tenant: Tenant,
        batch_size: int = 512,
        num_workers: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int | None = None,
        prefetch: int = 2,
        drop_last: bool = False,
        verify: bool = True,
        max_unit_rows: int | None = None,
        timeout_s: float | None = 600.0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        dedup: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, but got {num_workers}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), but got {rank} and {world_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, but got {prefetch}")
        if dedup and tenant.summary is not None:
            raise ValueError(f"dedup: tenant '{tenant.name}' is served summaries and tails; "
                             "deduplicated batches hold plain sequences only")
        self.store = as_store(store)
        self.thin_uri = thin if "://" in thin else os.path.abspath(thin)
        self.tenant = tenant
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.drop_last = drop_last
        self.timeout_s = timeout_s
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.dedup = dedup
        self._pool: WorkerPool | None = None
        #: Workers being started (_iter_starting), until a pass or close() takes them.
        self._starting: _Starting | None = None
        #: Passes begun (iterators started); an iterator whose pass is not the newest is
        #: cancelled (ReaderPassCancelledError on its next use).
        self._passes = 0
        #: This loader's iterators not yet ended (closed by :meth:`close`, and at exit).
        self._open: weakref.WeakSet[Generator[Batch, None, None]] = weakref.WeakSet()
        self._closing = False
        close_at_exit(self, first=True)
        # Raises TenantError for a column the store does not have.
        self.ctx = ReadContext.build(self.store, tenant, verify=verify)
        #: Summary tenants (spec section 10): batches get summaries and tails from the server.
        self._summary = _summary_server(self.store, tenant)
        # numba's start-up and the kernels' cache loads overlap the rest of the set-up and the
        # first unit's file reads; workers are started only once it is done (_iter_workers).
        warm_up_in_background()
        for c in tenant.columns:
            typ = self.ctx.schema.field(c).type
            if not tensorable(typ):
                raise LmatError(
                    f"tenant '{tenant.name}': column '{c}' has type {typ}, which has no tensor "
                    "form (SequenceLoader reads numeric, boolean and timestamp columns)"
                )
        #: Users tombstoned since the loader was built whose rows it was found not to hold.
        self._tombs_checked = np.zeros(0, dtype=np.int64)
        self.info = _without_hidden(_thin_info(self.store, self.thin_uri), self.thin_uri,
                                    self.ctx.hidden, self.store.n_buckets)
        n_snap = len(self.ctx.watermarks)
        if self.info.snap_max is not None and (
            self.info.snap_max >= n_snap or (self.info.snap_min or 0) < -1
        ):
            bad = self.info.snap_max if self.info.snap_max >= n_snap else self.info.snap_min
            raise ThinTableError(
                f"{thin}: pointers name snapshot {bad}, which does not exist in "
                f"{self.store.root} ({n_snap} snapshots)"
            )
        self.thin_columns = thin_columns(tenant, self.info.schema.names)
        self.context_columns = [
            f.name for f in self.info.schema
            if is_context_column(f.name) and tensorable(f.type)
        ]
        self.thin_columns += self.context_columns
        self.max_unit_rows = max_unit_rows or UNIT_ROWS
        self.shuffle_buffer = shuffle_buffer or 0
        self.epoch = 0
        self._resume: _Progress | None = None
        self._progress: _Progress | None = None
        #: The epoch of the last pass (to guess the next one's, see :meth:`_ahead`).
        self._last_epoch: int | None = None
        #: Compressed bytes read by this loader over its lifetime (all passes).
        self.bytes_read = 0
        #: Of ``bytes_read``: bytes of thin rows (the rest is the UIH tier).
        self.thin_bytes_read = 0

    # ------------------------------------------------------------------ plan
    def _consumers(self) -> tuple[int, int]:
        """(consumers per rank, first consumer offset within the rank) for this process."""
        info = torch.utils.data.get_worker_info()
        if info is not None:
            if self.num_workers:
                raise ValueError(
                    "SequenceLoader(num_workers>0) inside a DataLoader worker: use one or the other"
                )
            return info.num_workers, info.id
        return max(self.num_workers, 1), 0

    def plan(self, epoch: int | None = None, per_rank: int | None = None) -> list[list[WorkUnit]]:
        """Units of every consumer of the world for ``epoch``, rank-major."""
        per_rank = per_rank or self._consumers()[0]
        n = self.world_size * per_rank
        units = plan_units(self.info.bucket_rows,
                           max_unit_rows=self.max_unit_rows, min_units=n)
        return assign_units(units, n, seed=self.seed,
                            epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle)

    def _specs(self, per_rank: int, epoch: int, rows_done: list[int]) -> list[ConsumerSpec]:
        plan = self.plan(epoch, per_rank)
        mine = plan[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [
            ConsumerSpec(
                ctx=self.ctx, thin_uri=self.thin_uri, thin_version=self.info.version,
                thin_columns=self.thin_columns, context_columns=self.context_columns,
                units=units, consumer=self.rank * per_rank + w, batch_size=self.batch_size,
                drop_last=self.drop_last, shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                shuffle_buffer=self.shuffle_buffer, prefetch=self.prefetch,
                timeout_s=self.timeout_s, start_row=rows_done[w], dedup=self.dedup,
            )
            for w, units in enumerate(mine)
        ]

    @property
    def num_requests(self) -> int:
        """Requests this rank yields per pass (all consumers of the rank)."""
        per_rank = max(self.num_workers, 1)
        plan = self.plan(self.epoch, per_rank)
        return sum(u.rows for us in plan[self.rank * per_rank:(self.rank + 1) * per_rank]
                   for u in us)

    def __len__(self) -> int:
        per_rank = max(self.num_workers, 1)
        plan = self.plan(self.epoch, per_rank)
        rnd = math.floor if self.drop_last else math.ceil
        return sum(rnd(sum(u.rows for u in us) / self.batch_size)
                   for us in plan[self.rank * per_rank:(self.rank + 1) * per_rank])

    # ------------------------------------------------------------------ epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of pass ``epoch`` (call before each pass, like DistributedSampler)."""
        self.epoch = int(epoch)

    def _config(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "shuffle": self.shuffle, "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.num_workers,
            "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
            "max_unit_rows": self.max_unit_rows, "thin_version": self.info.version,
            "tenant": self.tenant.name, "drop_last": self.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands in the current pass; resuming from it yields the identical
        rest of the pass. Every rank saves and loads its own."""
        p = self._progress or _Progress(self.epoch, [0] * max(self.num_workers, 1))
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "epoch": p.epoch,
            "rows_done": list(p.rows_done),
            "next_consumer": p.next_consumer,
            "batches": p.batches,
            "complete": p.complete,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` on the next iteration (same configuration only)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')} is not {STATE_VERSION}")
        have = self._config()
        diff = {k: (v, have.get(k)) for k, v in state["config"].items() if have.get(k) != v}
        if diff:
            raise ValueError(
                "cannot resume: the loader's configuration differs from the saved state's "
                + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            )
        self.epoch = int(state["epoch"])
        self._resume = _Progress(int(state["epoch"]), list(state["rows_done"]),
                                 int(state["next_consumer"]), int(state["batches"]),
                                 bool(state["complete"]))
        self._progress = replace(self._resume, rows_done=list(self._resume.rows_done))

    # ------------------------------------------------------------------ iteration
    def _check_tombstones(self) -> None:
        """Refuse a pass while the loader's pinned rows hold requests of a user forgotten since
        it was built (spec 7: no reader serves them from the forget on); a new loader, pinned
        after the tombstone, does not serve them."""
        new = np.union1d(np.setdiff1d(forgotten_users(self.store), self.ctx.forgotten),
                         np.setdiff1d(pending_users(self.store), self.ctx.hidden))
        new = np.setdiff1d(new, self._tombs_checked)
        if not len(new):
            return
        left = _without_hidden(self.info, self.thin_uri, new, self.store.n_buckets)
        if left.bucket_rows != self.info.bucket_rows:
            raise ThinTableError(
                f"{self.thin_uri}: user(s) {new[:5].tolist()} were forgotten after this loader "
                f"was built, and its pinned version {self.info.version} holds their requests: "
                "build a new SequenceLoader"
            )
        self._tombs_checked = np.union1d(self._tombs_checked, new)

    def __iter__(self) -> Iterator[Batch]:
        g = self._iter_pass()
        self._open.add(g)
        return g

    def _iter_pass(self) -> Generator[Batch, None, None]:
        self._check_tombstones()
        per_rank, offset = self._consumers()
        if torch.utils.data.get_worker_info() is not None:
            # Inside a user's DataLoader worker: this process is one consumer; no resume.
            spec = self._specs(per_rank, self.epoch, [0] * per_rank)[offset]
            for _, b in iter_consumer(spec):
                yield b if self._summary is None else self._summary.attach(b)
            return
        resume, self._resume = self._resume, None
        if resume is not None and resume.complete:
            return
        prog = resume or _Progress(self.epoch, [0] * per_rank)
        self._progress = prog
        self._passes += 1
        mine = self._passes
        specs = self._specs(per_rank, prog.epoch, prog.rows_done)
        source = (self._iter_local(specs[0]) if self.num_workers == 0
                  else self._iter_workers(specs, prog.next_consumer,
                                          self._pass_key(prog.epoch, prog.rows_done),
                                          self._ahead(per_rank, prog.epoch)))
        for w, end, batch in source:
            prog.rows_done[w] = end
            prog.next_consumer = (w + 1) % per_rank
            prog.batches += 1
            self.bytes_read += batch.bytes_read
            self.thin_bytes_read += batch.thin_bytes_read
            if self._summary is not None:
                batch = self._summary.attach(batch)
            yield batch.pin_memory() if self.pin_memory else batch
            if self._passes != mine and self.num_workers:
                raise ReaderPassCancelledError()
        prog.complete = True

    def _iter_local(self, spec: ConsumerSpec) -> Iterator[tuple[int, int, Batch]]:
        for end, b in iter_consumer(spec):
            yield 0, end, b

    def _pass_key(self, epoch: int, rows_done: list[int]) -> tuple[int, tuple[int, ...]]:
        """What a pass's plans depend on besides the loader's fixed settings (without
        ``shuffle`` the epoch changes nothing)."""
        return (epoch if self.shuffle else 0, tuple(rows_done))

    def _ahead(self, per_rank: int, epoch: int) -> tuple[Any, list[ConsumerSpec]] | None:
        """The pass expected after this one, for the workers to start as soon as they are
        done with this one (:meth:`WorkerPool.run`): the same plans without ``shuffle``; with
        it, the next epoch's where the epoch changed since the last pass (``set_epoch`` each
        pass), else the same. None when workers do not persist."""
        if not self.persistent_workers:
            return None
        nxt = epoch
        if self.shuffle and self._last_epoch != epoch:
            nxt = epoch + 1
        self._last_epoch = epoch
        start = [0] * per_rank
        return self._pass_key(nxt, start), self._specs(per_rank, nxt, start)

    def _iter_workers(
        self, specs: list[ConsumerSpec], first: int, key: Any = None,
        ahead: tuple[Any, list[ConsumerSpec]] | None = None,
    ) -> Iterator[tuple[int, int, Batch]]:
        if self._starting is not None and not self._starting.done():
            # Workers that an earlier pass started are not there yet: this pass, too, makes
            # its batches here until they are (rather than wait seconds for them).
            yield from self._iter_starting(specs, first, key, ahead)
            return
        self._started()
        pool = self._pool
        if pool is None or pool.n != len(specs) or not pool.alive():
            if pool is not None:
                self._pool = None
                pool.close()
            yield from self._iter_starting(specs, first, key, ahead)
            return
        yield from self._run_pool(pool, specs, first, key, ahead)

    def _iter_starting(
        self, specs: list[ConsumerSpec], first: int, key: Any,
        ahead: tuple[Any, list[ConsumerSpec]] | None,
    ) -> Iterator[tuple[int, int, Batch]]:
        """A pass whose workers start now, or are still starting. They take seconds to start
        (each imports torch, pyarrow and the kernels, in a process started from nothing):
        meanwhile this process makes the pass's batches itself, the consumers' in turn as the
        workers would (each consumer's units read when its batches are wanted), at least the
        first batch and until the workers are there; each worker then starts where its
        consumer's batches stopped, as a resumed pass does, so the batches and their order are
        the same. The workers start once the first batch is made; a pass that finds them
        still starting (an earlier pass made all its batches here) does the same, without
        waiting for them."""
        ctx = _mp_context()
        _check_workers_can_start(ctx)

        def start() -> WorkerPool:
            warm_up()  # compiled kernels on disk before any worker starts (no compile races)
            return WorkerPool(len(specs), prefetch=self.prefetch, timeout_s=self.timeout_s,
                              ctx=ctx, target=_worker_main, start=False)

        # Workers an earlier pass left starting, or None (they start at the first batch).
        starting: _Starting | None = self._starting
        n = len(specs)
        rows = [s.start_row for s in specs]
        here: dict[int, Generator[tuple[int, Batch], None, None]] = {}
        ended = [False] * n
        w = first % n
        try:
            # A pass closed at one of these batches (given up, or cancelled by a newer one)
            # does not wait for the workers: they go on starting, and the next pass (or
            # close()) takes them.
            while not all(ended) and not (starting is not None and starting.done()):
                if not ended[w]:
                    if w not in here:
                        here[w] = iter_consumer(specs[w], read_ahead=False)
                    got = next(here[w], None)
                    if got is None:
                        ended[w] = True
                    else:
                        rows[w] = got[0]
                        if starting is None:
                            # Once the first batch is made: the workers' start (a process
                            # importing the reader) does not compete with it for the cores.
                            starting = self._starting = _Starting(start)
                        yield w, got[0], got[1]
                w = (w + 1) % n
        except BaseException as e:
            if (starting is not None and not isinstance(e, GeneratorExit)
                    and self._starting is starting):
                self._starting = None
                starting.close()
            raise
        finally:
            for g in here.values():
                g.close()
        if all(ended):
            # The whole pass was made here; the workers, still starting, serve the next.
            if not self.persistent_workers:
                self._close_workers()
            return
        specs = [replace(s, start_row=r) for s, r in zip(specs, rows, strict=True)]
        if starting is not None and self._starting is starting:
            self._starting = None
            self._pool = starting.result()  # raises what starting them raised
        pool = self._pool
        if pool is None:
            raise ReaderWorkerError("the reader's worker processes did not start")
        yield from self._run_pool(pool, specs, w, key, ahead)

    def _run_pool(
        self, pool: WorkerPool, specs: list[ConsumerSpec], first: int, key: Any,
        ahead: tuple[Any, list[ConsumerSpec]] | None,
    ) -> Iterator[tuple[int, int, Batch]]:
        def on_error(w: int, e: ReaderWorkerError) -> BaseException:
            if pool.heard[w] or pool.procs[w].exitcode != 1:
                return e
            return ReaderWorkerError(f"{e}. {_startup_failure_hint(pool.ctx)}")

        ok = False
        try:
            yield from pool.run(specs, first, on_error, key, ahead)
            ok = True
        finally:
            if not ok and not pool.alive():
                pool.close()
            if not self.persistent_workers and pool.open_pass is None:
                self._close_workers()  # unless a newer iterator's pass (which cancelled
                # this one) runs

    def _started(self) -> None:
        """Workers whose start a pass left under way (it ended at its first batch, or is
        still there) are the pool from now on (waits for their start)."""
        starting, self._starting = self._starting, None
        if starting is not None:
            pool = starting.result(quiet=True)
            if self._pool is not None and pool is not None:
                pool.close()  # a newer pass started a pool of its own meanwhile
            else:
                self._pool = pool

    def close(self) -> None:
        """End this loader's open iterators (each one's next use raises StopIteration; its
        read-ahead thread is stopped and joined) and stop its worker processes (they are kept
        between passes otherwise, and stop with the loader or the process). A process that
        exits with an iterator still open closes its loaders this way first (an ``atexit``
        hook, :func:`~lmat_platform.reader.prefetch.close_at_exit`). A later ``iter()`` starts
        a new pass as usual."""
        if self._closing:  # an iterator's clean-up calls back in
            return
        self._closing = True
        try:
            for g in list(self._open):
                with contextlib.suppress(ValueError):  # being run by another thread: not here
                    g.close()
            self._close_workers()
        finally:
            self._closing = False

    def _close_workers(self) -> None:
        """Stop the worker processes, and a start of them under way (without waiting for the
        processes to start: :meth:`_Starting.close`)."""
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes belong to the process that started them.
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_starting"] = None
        del state["_open"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open = weakref.WeakSet()
        close_at_exit(self, first=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
