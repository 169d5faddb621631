"""Reusable batch buffers: the reader writes each batch's values into memory it already touched.

A long tenant's batch holds tens of MB per column. Fresh allocations that size come straight
from the kernel (``mmap``), and the first write to every page faults: writing into new memory
runs at a fraction of the copy kernel's speed. The pool hands out buffers again once the
consumer has dropped every tensor made from them, which CPython's reference count tells
exactly: a tensor made by ``torch.from_numpy`` holds a reference to its array, and that array
(a view) to the pool's buffer. A buffer some tensor still uses is never handed out.

One pool serves the whole process (every loader and epoch; thread-safe). It keeps at most
``LMAT_BATCH_POOL_MB`` (default 1024) of buffers; past that, batches get ordinary allocations
that are freed with them. 0 turns pooling off.

**Small pages for new buffers.** A fresh process's first batch writes all of its buffer's
memory for the first time (a long tenant's first batch: 70 MB). numpy advises arrays of 4 MB
and more to transparent huge pages (``madvise(MADV_HUGEPAGE)``), and where the kernel's THP
``defrag`` setting is ``madvise`` (a common default, and this project's machine's) a fault on
such memory may first compact memory to find a free 2 MB page. Filling 70 MB of new
``np.empty`` memory in a fresh process took 10 ms when free huge pages were at hand and up to
1.57 s when not (median about 0.6 s over 14 fresh processes at load 1-9), against 40-67 ms of
CPU, every time, in 4 KB pages. So a new buffer of at least ``MIN_BYTES`` is a private
anonymous mapping advised to small pages (``MADV_NOHUGEPAGE``, for kernels whose THP is
``always``); ``LMAT_BATCH_HUGE_PAGES=1`` takes ``np.empty`` (numpy's advice) instead. Buffers
are written in full once and then reused, so this is a cost of a process's first batches only.

**No huge-page stalls in the reader's process** (:func:`avoid_thp_stalls`). The same holds for
every allocator that asks for huge pages, and the reader's process has two: numpy (arrays of
4 MB and more) and pyarrow's mimalloc (its 1 GB arena). A fresh process's first batch decodes
and plans into new memory; on this project's machine its CPU (the loader built, the first
unit read and planned, the first batch copied, kernels warm) was 0.41-0.58 s with huge pages
and 0.17-0.18 s without (4 fresh processes each, alternated, long tenant), nearly all of the
difference system time in page faults; later passes were no slower without (their memory is
reused). Where the kernel gives huge pages only to memory that asks for them (``enabled`` is
``madvise``) and compacts memory for them at fault time (``defrag`` is ``always``, ``madvise``
or ``defer+madvise``), the reader's process therefore turns them off for itself
(``prctl(PR_SET_THP_DISABLE)``, which the processes it starts inherit, its reader workers
among them): only those two
allocators lose them, not a trainer's own tensors (torch does not ask for huge pages unless
``THP_MEM_ALLOC_ENABLE`` is set). ``LMAT_THP=keep`` leaves the process as it is; ``LMAT_THP=off``
turns them off whatever the kernel's settings.

::

    get(n) -> view of a free buffer   --torch.from_numpy-->  batch tensor (holds the view)
    batch dropped  ->  view freed  ->  buffer's refcount back to the pool's own  ->  free again
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sys
import threading

import numpy as np

from lmat_platform.store.cache import env_megabytes

log = logging.getLogger(__name__)

_THP = "/sys/kernel/mm/transparent_hugepage"
#: prctl option that turns transparent huge pages off for the calling process (Linux >= 3.15).
_PR_SET_THP_DISABLE = 41


def _thp_setting(name: str) -> str | None:
    """The selected value of a THP setting (``enabled``, ``defrag``), or None."""
    try:
        with open(f"{_THP}/{name}") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def thp_stalls() -> bool:
    """Whether, by the kernel's settings, only memory that asks for transparent huge pages
    gets them and a fault on it may compact memory first."""
    return _thp_setting("enabled") == "madvise" and _thp_setting("defrag") in (
        "always", "madvise", "defer+madvise")


def avoid_thp_stalls() -> bool:
    """Turn transparent huge pages off for this process where the kernel's settings make
    faults on them stall (:func:`thp_stalls`; ``LMAT_THP``: ``off`` always, ``keep`` never;
    see the module docstring). Returns whether they are off now because of this call."""
    mode = os.environ.get("LMAT_THP", "auto")
    if mode not in ("auto", "off", "keep"):
        raise ValueError(f"LMAT_THP must be auto, off or keep, but got {mode!r}")
    if mode == "keep" or not sys.platform.startswith("linux") or (
            mode == "auto" and not thp_stalls()):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.debug("could not turn transparent huge pages off for this process")
    return ok


#: Free buffers kept at most; more are released to the allocator.
MAX_BUFFERS = 16
#: Buffers smaller than this are allocated normally (small allocations are cheap and reused).
MIN_BYTES = 1 << 20
#: Default of ``LMAT_BATCH_POOL_MB``.
DEFAULT_MB = 1024


def fresh_bytes(n: int) -> np.ndarray:
    """``n`` bytes of new, writable memory (uint8), in small pages unless
    ``LMAT_BATCH_HUGE_PAGES=1`` or the platform has no ``MADV_NOHUGEPAGE`` (then
    ``np.empty``). The memory is returned to the system when the array and every view of it
    are gone."""
    if n < MIN_BYTES or not hasattr(mmap, "MADV_NOHUGEPAGE") \
            or os.environ.get("LMAT_BATCH_HUGE_PAGES") == "1":
        return np.empty(n, dtype=np.uint8)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype=np.uint8)


class BufferPool:
    """Buffers for batch values, reused once no tensor refers to them."""

    def __init__(self, max_buffers: int = MAX_BUFFERS, max_bytes: int = 1 << 62):
        self._bufs: list[np.ndarray] = []
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self.reused = 0
        self.allocated = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs)

    def _free(self, i: int) -> bool:
        # The only references: the pool's list and getrefcount's own argument.
        return sys.getrefcount(self._bufs[i]) <= 2

    def empty(self, n: int, dtype: np.dtype) -> np.ndarray:
        """An uninitialized, writable array of ``n`` values of ``dtype``."""
        dtype = np.dtype(dtype)
        nbytes = n * dtype.itemsize
        if nbytes < MIN_BYTES or self.max_buffers == 0:
            return np.empty(n, dtype=dtype)
        with self._lock:
            return self._empty(n, dtype, nbytes)

    def _empty(self, n: int, dtype: np.dtype, nbytes: int) -> np.ndarray:
        best = -1
        for i in range(len(self._bufs)):
            size = self._bufs[i].nbytes
            if size >= nbytes and (best < 0 or size < self._bufs[best].nbytes) and self._free(i):
                best = i
        if best >= 0:
            self.reused += 1
            return self._bufs[best][:nbytes].view(dtype)
        # Room to grow: later batches of a pass vary in size around the same mean.
        size = nbytes + nbytes // 4
        total = self.nbytes
        while total + size > self.max_bytes:
            free = [i for i in range(len(self._bufs)) if self._free(i)]
            if not free:
                break
            total -= self._bufs.pop(min(free, key=lambda i: self._bufs[i].nbytes)).nbytes
        if total + size > self.max_bytes:
            # Over budget: not pooled, freed with its batch.
            return fresh_bytes(nbytes).view(dtype)
        buf = fresh_bytes(size)
        self.allocated += 1
        self._bufs.append(buf)
        if len(self._bufs) > self.max_buffers:
            # Forget the smallest free buffer (a buffer in use stays with its tensor).
            free = [i for i in range(len(self._bufs) - 1) if self._free(i)]
            if free:
                del self._bufs[min(free, key=lambda i: self._bufs[i].nbytes)]
            else:
                del self._bufs[0]
        return buf[:nbytes].view(dtype)


_SHARED: BufferPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> BufferPool:
    """The process's pool, sized by ``LMAT_BATCH_POOL_MB`` (read once)."""
    global _SHARED
    if _SHARED is None:
        with _SHARED_LOCK:
            if _SHARED is None:
                budget = env_megabytes("LMAT_BATCH_POOL_MB", DEFAULT_MB)
                _SHARED = BufferPool(MAX_BUFFERS if budget else 0, budget)
    return _SHARED
