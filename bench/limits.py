"""Physical limits measured in the same run as the reader (issue 6, item 3).

* :func:`memcpy_bandwidth`: numpy copy of a buffer holding as many bytes as the reader's output
  (capped), warm: the ceiling for any reader that must produce those bytes in memory.
* :func:`parquet_decode_rate`: pyarrow decode of the UIH tier's Parquet files (the columns a tenant
  reads), from the page cache: the ceiling for a reader that decodes every stored value it needs
  once.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq

#: Largest buffer copied (bytes); bigger outputs are copied in pieces of this size.
MAX_COPY = 1 << 30


class MemcpyProbe:
    """``np.copyto`` over ``nbytes`` (at least 1 MiB), timed one copy at a time so that its
    copies can interleave with the passes it is compared with (same minutes, same noise)."""

    def __init__(self, nbytes: int):
        n = int(min(max(nbytes, 1 << 20), MAX_COPY))
        self.src = np.ones(n, dtype=np.uint8)
        self.dst = np.empty_like(self.src)
        np.copyto(self.dst, self.src)  # warm-up: pages touched, caches primed
        self.secs: list[float] = []

    def once(self) -> None:
        t0 = time.perf_counter()
        np.copyto(self.dst, self.src)
        self.secs.append(time.perf_counter() - t0)

    def result(self) -> dict[str, float]:
        med = statistics.median(self.secs)
        n = len(self.src)
        return {"bytes": n, "seconds": med, "gb_per_s": n / med / 1e9, "reps": len(self.secs)}


def memcpy_bandwidth(nbytes: int, reps: int = 5) -> dict[str, float]:
    """Median GB/s of ``np.copyto`` over ``nbytes`` (at least 1 MiB) after a warm-up copy."""
    probe = MemcpyProbe(nbytes)
    for _ in range(reps):
        probe.once()
    return probe.result()


def parquet_decode_rate(
    files: Sequence[str], columns: Sequence[str], reps: int = 3
) -> dict[str, float]:
    """Median decode rate of ``columns`` of ``files`` (pyarrow, default threads), warm cache.

    Returns decoded (Arrow) bytes per second and values per second."""

    def once() -> tuple[float, int, int]:
        t0 = time.perf_counter()
        nb = nv = 0
        for f in files:
            pf = pq.ParquetFile(f)
            have = [c for c in columns if c in pf.schema_arrow.names]
            t = pf.read(columns=have)
            nb += t.nbytes
            nv += t.num_rows * len(have)
        return time.perf_counter() - t0, nb, nv

    once()  # warm-up: page cache
    runs = [once() for _ in range(reps)]
    secs = statistics.median(r[0] for r in runs)
    nb, nv = runs[0][1], runs[0][2]
    return {
        "files": len(files),
        "decoded_bytes": nb,
        "values": nv,
        "seconds": secs,
        "gb_per_s": nb / secs / 1e9,
        "m_values_per_s": nv / secs / 1e6,
    }
