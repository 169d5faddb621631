"""Versioned pointers (spec section 5) and the vectorized lookups behind them.

A pointer is ``(snapshot_id, head_len, head_checksum)``: 4 + 4 + 8 = 16 bytes::

    offset  0        4        8                16
            +--------+--------+----------------+
            | snap   | len    | checksum       |   little-endian int32, int32, uint64
            +--------+--------+----------------+

``snapshot_id = -1`` means no snapshot was published by the request time (empty head).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lmat_platform.store.cache import cache, scoped
from lmat_platform.store.core import Store
from lmat_platform.store.heads import MARKER_LENGTHS

_POINTER = struct.Struct("<iiQ")
POINTER_BYTES = _POINTER.size


@dataclass(frozen=True)
class Pointer:
    snapshot_id: int
    head_len: int
    head_checksum: int  # uint64

    def pack(self) -> bytes:
        return _POINTER.pack(self.snapshot_id, self.head_len, self.head_checksum)

    @classmethod
    def unpack(cls, data: bytes) -> Pointer:
        return cls(*_POINTER.unpack(data))


def expand_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [starts[i], ends[i]): (owner i, position) of every element, vectorized."""
    counts = np.maximum(ends - starts, 0)
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(starts)), counts)
    if total == 0:
        return owner, np.zeros(0, dtype=np.int64)
    offs = np.cumsum(counts) - counts
    pos = np.arange(total, dtype=np.int64) - np.repeat(offs, counts) + np.repeat(starts, counts)
    return owner, pos


def searchsorted2(
    keys_u: np.ndarray, keys_t: np.ndarray, qu: np.ndarray, qt: np.ndarray
) -> np.ndarray:
    """Index of the first (u, t) >= (qu, qt) in arrays sorted by (u, t): a two-key
    ``searchsorted(side="left")``, done as one merge of keys and queries (vectorized)."""
    n, m = len(keys_u), len(qu)
    if n == 0:
        return np.zeros(m, dtype=np.int64)
    u = np.concatenate([keys_u, qu])
    t = np.concatenate([keys_t, qt])
    flag = np.concatenate([np.ones(n, np.int8), np.zeros(m, np.int8)])  # queries sort first on ties
    order = np.lexsort((flag, t, u))
    is_q = order >= n
    # Events before each query = position - queries before it.
    pos = np.flatnonzero(is_q)
    before = pos - np.arange(m)
    out = np.empty(m, dtype=np.int64)
    out[order[is_q] - n] = before
    return out


def expand_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The positions of ranges [starts[i], ends[i]) concatenated: one fill and one running sum
    (cheaper than :func:`expand_ranges` when the owners are not needed). int32 when every
    position fits, which halves the memory traffic of the output-sized arrays."""
    counts = ends - starts
    nz = counts > 0
    s, c = starts[nz], counts[nz]
    total = int(c.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    dtype = np.int32 if int(ends.max()) < np.iinfo(np.int32).max else np.int64
    delta = np.ones(total, dtype=dtype)
    offs = np.cumsum(c) - c
    delta[0] = s[0]
    delta[offs[1:]] = s[1:] - (s[:-1] + c[:-1] - 1)
    return np.cumsum(delta, dtype=dtype)


#: Parquet footers of head summary files by (store id, path): the files are immutable.
_FOOTERS: dict[tuple[str, str], pq.FileMetaData] = {}
_MAX_FOOTERS = 4096


def _footer(store: Store, fs: Any, path: str) -> pq.FileMetaData:
    key = (store.store_id, path)
    md = _FOOTERS.get(key)
    if md is None:
        with fs.open_input_file(path) as fh:
            md = pq.ParquetFile(fh).metadata
        if len(_FOOTERS) >= _MAX_FOOTERS:
            _FOOTERS.clear()
        _FOOTERS[key] = md
    return md


@dataclass
class HeadIndex:
    """Head summaries of a set of users: the entry of (user, snapshot S) is the newest <= S."""

    user_id: np.ndarray
    snapshot_id: np.ndarray
    head_len: np.ndarray
    head_checksum: np.ndarray
    markers: np.ndarray  # [n, len(MARKER_LENGTHS)]
    _first: np.ndarray | None = field(default=None, repr=False, compare=False)
    _marks: dict[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, store: Store, users: np.ndarray, buckets: np.ndarray | None = None) -> HeadIndex:
        users = np.unique(users)
        f = pads.field("user_id").isin(pa.array(users))
        if buckets is not None:
            f = pads.field("bucket").isin(pa.array(np.unique(buckets))) & f
        t = store.read_table(
            "heads",
            columns=["user_id", "snapshot_id", "head_len", "head_checksum", "markers"],
            filters=f,
        )
        return cls._from_table(t)

    @classmethod
    def of_files(cls, store: Store, paths: list[str]) -> HeadIndex:
        """Every head summary in the given ``heads/`` data files (a bucket's), decoded once per
        process: the files are immutable, so the index is kept in the decoded cache."""
        if not paths:
            return cls.empty()
        dc = cache()
        key = ("heads", store.store_id, tuple(sorted(paths)))
        hit = dc.get(key)
        if hit is not None:
            return hit
        # With the cache off, a reader's units of one bucket still load its heads once a pass.
        memo = scoped()
        if memo is not None and (hit := memo.get(key)) is not None:
            return hit
        fs = store.filesystem()[0]
        want = ("user_id", "snapshot_id", "head_len", "head_checksum", "markers")
        if len(paths) == 1:
            # One file (a bucket's after compaction): read directly, with its footer parsed
            # once per process and in this thread, without a dataset's discovery and scan
            # set-up (a pass with the decoded cache off reads it once per bucket).
            with fs.open_input_file(paths[0]) as fh:
                pf = pq.ParquetFile(fh, metadata=_footer(store, fs, paths[0]))
                names = pf.schema_arrow.names
                t = pf.read(columns=[c for c in want if c in names], use_threads=False)
        else:
            ds = pads.dataset(paths, format="parquet", filesystem=fs)
            t = ds.to_table(columns=[c for c in want if c in ds.schema.names])
        idx = cls._from_table(t)
        dc.put(key, idx, idx.nbytes)
        if memo is not None:
            memo[key] = idx
        return idx

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.user_id, self.snapshot_id, self.head_len,
                                       self.head_checksum, self.markers))

    @classmethod
    def _from_table(cls, t: pa.Table | None) -> HeadIndex:
        if t is None or t.num_rows == 0:
            return cls.empty()
        u = t.column("user_id").to_numpy()
        sn = t.column("snapshot_id").to_numpy()
        # Compared, not subtracted: np.diff of user ids far apart wraps around int64.
        up, same = u[1:] > u[:-1], u[1:] == u[:-1]
        if not (up | (same & (sn[1:] >= sn[:-1]))).all():  # written sorted, usually
            t = t.sort_by([("user_id", "ascending"), ("snapshot_id", "ascending")])
        mk = t.column("markers").combine_chunks().flatten().to_numpy()
        return cls(
            t.column("user_id").to_numpy(),
            t.column("snapshot_id").to_numpy().astype(np.int32),
            t.column("head_len").to_numpy(),
            t.column("head_checksum").to_numpy(),
            mk.reshape(t.num_rows, len(MARKER_LENGTHS)),
        )

    @classmethod
    def empty(cls) -> HeadIndex:
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros((0, len(MARKER_LENGTHS)), np.int64),
        )

    def lookup(self, users: np.ndarray, snaps: np.ndarray) -> np.ndarray:
        """Row index of the newest entry with the same user and ``snapshot_id <= snap`` (-1: none)."""
        if len(self.user_id) == 0:
            return np.full(len(users), -1, dtype=np.int64)
        # Entries are sorted by (user, snapshot): search users first, then snapshots in the slice.
        lo = np.searchsorted(self.user_id, users, side="left")
        hi = np.searchsorted(self.user_id, users, side="right")
        # Snapshot ids are small: combine (rank of user slice start, snapshot) into one key.
        span = int(max(self.snapshot_id.max(initial=0), snaps.max(initial=0))) + 2
        if self._first is None:  # each entry's user slice start, once per (cached) index
            self._first = np.searchsorted(self.user_id, self.user_id, side="left")
        key_entries = self._first * span + (self.snapshot_id.astype(np.int64) + 1)
        key_q = lo * span + (snaps.astype(np.int64) + 1)
        idx = np.searchsorted(key_entries, key_q, side="right") - 1
        ok = (hi > lo) & (idx >= lo) & (idx < hi)
        return np.where(ok, idx, -1)

    def pointers(
        self, users: np.ndarray, snaps: np.ndarray, idx: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(head_len, head_checksum) at (user, snapshot) for each query; (0, 0) for no head.
        ``idx``: the queries' :meth:`lookup`, where the caller has it already."""
        idx = self.lookup(users, snaps) if idx is None else idx
        has = idx >= 0
        hl = np.zeros(len(users), dtype=np.int64)
        cs = np.zeros(len(users), dtype=np.int64)
        hl[has] = self.head_len[idx[has]]
        cs[has] = self.head_checksum[idx[has]]
        return hl, cs

    def marker_column(self, max_len: int) -> np.ndarray | None:
        """Each entry's length marker for ``max_len`` (the earliest event time the last
        ``max_len`` head events can have), contiguous; None where no marker covers it."""
        j = int(np.searchsorted(np.array(MARKER_LENGTHS), max_len, side="left"))
        if j >= len(MARKER_LENGTHS):
            return None
        if self._marks is None:
            self._marks = {}
        col = self._marks.get(j)
        if col is None:  # once per (cached) index and marker
            col = self._marks[j] = np.ascontiguousarray(self.markers[:, j], dtype=np.int64)
        return col

