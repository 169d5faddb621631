"""A process-wide cache of decoded, immutable tier data (LRU, bounded in bytes).

Every file of the UIH tier and of the head summaries is immutable: a file's path (which holds a
random id), together with its store and size, names its content for good. So a reader can keep
what it decoded and serve the next pass, or the next tenant, from memory instead of decoding the
same pages again. Entries are Arrow arrays (one row group's column) or whole head indexes.
Thin-table files are immutable too (Delta never rewrites a data file in place; a new version
names new files), so a training job's later passes over the same thin table read a bucket's
decoded rows from memory; they are admitted only while they fit without evicting anything (a
pass is a scan: see :meth:`DecodedCache.put`), and a bucket whose files changed replaces its
older entries (:meth:`DecodedCache.discard_where`).

::

    key (store_id, path, size, row group, column)  ->  decoded pa.Array
    key ("heads", store_id, paths)                  ->  HeadIndex of a bucket
    key ("thin", file paths, ...)                   ->  a piece of a bucket's ThinRows

The budget is ``LMAT_DECODE_CACHE_MB`` (default 512; 0 turns the cache off), or
:func:`configure`. Bytes read are still counted as read from the tier (they are what the pass
needs); ``stats()`` says how much was served from memory. A cached entry is never written to;
``forget`` clears the cache of its process, and files it replaced are no longer listed, so no
reader is served a forgotten user's events.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_MB = 512


def env_megabytes(var: str, default_mb: float) -> int:
    """A memory budget in bytes from environment variable ``var`` (in MB; >= 0)."""
    raw = os.environ.get(var, str(default_mb))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{var} must be a number of MB, but got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"{var} must be >= 0, but got {raw!r}")
    return int(mb * (1 << 20))


class DecodedCache:
    """Thread-safe LRU of decoded values, bounded by the sum of their sizes in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._d: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.hit_bytes = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._d.get(key)
            if item is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            self.hit_bytes += item[1]
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int, *, evict: bool = True) -> None:
        """Keep ``value``; with ``evict=False`` only if it fits without evicting anything
        (scan data: a pass over more than the budget keeps what came first instead of
        flushing everything, itself included, before it is read again)."""
        if nbytes > self.max_bytes or not self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if not evict and self._bytes + nbytes > self.max_bytes:
                return
            self._d[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and self._d:
                _, (_, n) = self._d.popitem(last=False)
                self._bytes -= n

    def discard_where(self, pred: Any) -> int:
        """Drop every entry whose key satisfies ``pred``; returns how many."""
        with self._lock:
            gone = [k for k in self._d if pred(k)]
            for k in gone:
                self._bytes -= self._d.pop(k)[1]
            return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._d), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "hit_bytes": self.hit_bytes}


_CACHE: DecodedCache | None = None
_INIT = threading.Lock()


def cache() -> DecodedCache:
    """This process's cache (built on first use from ``LMAT_DECODE_CACHE_MB``)."""
    global _CACHE
    if _CACHE is None:
        with _INIT:
            if _CACHE is None:
                _CACHE = DecodedCache(env_megabytes("LMAT_DECODE_CACHE_MB", DEFAULT_MB))
    return _CACHE


def configure(max_mb: float) -> DecodedCache:
    """Set this process's budget in MB (0: off); drops what is cached."""
    global _CACHE
    if max_mb < 0:
        raise ValueError(f"cache budget must be >= 0 MB, but got {max_mb}")
    with _INIT:
        _CACHE = DecodedCache(int(max_mb * (1 << 20)))
    return _CACHE


# ------------------------------------------------------------------------------ bucket scope

#: What the calling thread's reader keeps for the bucket it is reading (:func:`bucket_scope`).
_SCOPE: contextvars.ContextVar[tuple[dict[Hashable, Any], bool] | None] = \
    contextvars.ContextVar("lmat_bucket_scope", default=None)


@contextmanager
def bucket_scope(memo: dict[Hashable, Any], *, tier: bool) -> Iterator[None]:
    """Within the block, reads of one bucket keep what they decode in ``memo`` and serve it
    from there, whatever the decoded cache's budget: the bucket's head summaries, and with
    ``tier`` the tier's row groups (:func:`scoped`). A reader passes the same ``memo`` to the
    units of one bucket and empties it when it moves to another bucket, so the units of a
    split bucket decode its heads and row groups once a pass, and nothing is held beyond the
    bucket being read (the decoded cache, when on, keeps across passes)."""
    token = _SCOPE.set((memo, tier))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def scoped(*, tier: bool = False) -> dict[Hashable, Any] | None:
    """The memo of the calling thread's :func:`bucket_scope` (None: none, or ``tier`` asked
    and the scope does not keep the tier's row groups)."""
    got = _SCOPE.get()
    if got is None or (tier and not got[1]):
        return None
    return got[0]
