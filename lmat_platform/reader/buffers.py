"""Reusable batch buffers: the reader writes each batch's values into memory it already touched.

A long tenant's batch holds tens of MB per column. Fresh allocations that size come straight
from the kernel (``mmap``), and the first write to every page faults: writing into new memory
runs at a fraction of the copy kernel's speed. The pool hands out buffers again once the
consumer has dropped every tensor made from them, which CPython's reference count tells
exactly: a tensor made by ``torch.from_numpy`` holds a reference to its array, and that array
(a view) to the pool's buffer. A buffer some tensor still uses is never handed out.

::

    get(n) -> view of a free buffer   --torch.from_numpy-->  batch tensor (holds the view)
    batch dropped  ->  view freed  ->  buffer's refcount back to the pool's own  ->  free again
"""

from __future__ import annotations

import sys

import numpy as np

#: Free buffers kept at most; more are released to the allocator.
MAX_BUFFERS = 16
#: Buffers smaller than this are allocated normally (small allocations are cheap and reused).
MIN_BYTES = 1 << 20


class BufferPool:
    """Buffers for batch values, reused once no tensor refers to them (one consumer thread)."""

    def __init__(self, max_buffers: int = MAX_BUFFERS):
        self._bufs: list[np.ndarray] = []
        self.max_buffers = max_buffers
        self.reused = 0
        self.allocated = 0

    def _free(self, i: int) -> bool:
        # The only references: the pool's list and getrefcount's own argument.
        return sys.getrefcount(self._bufs[i]) <= 2

    def empty(self, n: int, dtype: np.dtype) -> np.ndarray:
        """An uninitialized, writable array of ``n`` values of ``dtype``."""
        dtype = np.dtype(dtype)
        nbytes = n * dtype.itemsize
        if nbytes < MIN_BYTES:
            return np.empty(n, dtype=dtype)
        best = -1
        for i in range(len(self._bufs)):
            size = self._bufs[i].nbytes
            if size >= nbytes and (best < 0 or size < self._bufs[best].nbytes) and self._free(i):
                best = i
        if best >= 0:
            self.reused += 1
            return self._bufs[best][:nbytes].view(dtype)
        # Room to grow: later batches of a pass vary in size around the same mean.
        buf = np.empty(nbytes + nbytes // 4, dtype=np.uint8)
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
