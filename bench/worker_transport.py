"""The main process's cost per batch taken from reader worker processes (issue 16).

A :class:`~lmat_platform.reader.workers.WorkerPool` of ``--workers`` processes runs a stand-in
for a consumer's pass: each batch's arrays come from the worker's slot allocator and are
filled with one copy of prepared values (the reader's own work is not measured here), and the
per-request arrays are made as :func:`~lmat_platform.reader.loader.iter_consumer` makes them.
The main process takes every batch, as the loader does, and drops it. Reported: the main
process's CPU microseconds per batch (``time.process_time``: all its threads), next to wall
microseconds per batch, median over ``--reps`` passes of ``--batches`` batches per worker::

    python -m bench.worker_transport                       # this tree's transport
    PYTHONPATH=/path/to/other/tree python -m bench.worker_transport   # another tree's

The workers make batches faster than the main process takes them, so the main process rarely
waits, and waiting costs no CPU: CPU per batch is what the transport costs the trainer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

#: Columns of a batch (the long tenant's), values per batch, requests per batch.
COLUMNS = (("item_id", np.int64), ("action", np.int8), ("dwell_ms", np.int32))


def fake_pass(spec: dict[str, Any],
              alloc: Callable[[list[tuple[int, np.dtype]]], list[np.ndarray]],
              ) -> Iterator[tuple[int, Any]]:
    """A consumer's pass of ``spec['batches']`` batches of ``spec['rows']`` requests."""
    from lmat_platform.reader.batch import Batch

    rows, n = spec["rows"], spec["values"]
    src = {c: np.arange(n, dtype=dt) for c, dt in COLUMNS}
    for i in range(spec["batches"]):
        outs = alloc([(n, np.dtype(dt)) for _, dt in COLUMNS])
        for (c, _), o in zip(COLUMNS, outs, strict=True):
            o[:] = src[c]
        rid = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
        lens = np.full(rows, n // rows, dtype=np.int64)
        lens[-1] += n - int(lens.sum())
        yield (i + 1) * rows, Batch(
            request_id=torch.from_numpy(rid), lengths=torch.from_numpy(lens),
            values={c: torch.from_numpy(o) for (c, _), o in zip(COLUMNS, outs, strict=True)},
            context={"label": torch.from_numpy(np.ones(rows, dtype=np.float32))},
            user_id=torch.from_numpy(rid % 300), request_ts=torch.from_numpy(rid * 1000),
            bytes_read=1000, thin_bytes_read=100,
        )


def _worker(w: int, tasks: Any, out: Any, stop: Any, current: Any, flags: torch.Tensor) -> None:
    from lmat_platform.reader.workers import worker_loop

    worker_loop(w, tasks, out, stop, current, flags, fake_pass)


def measure(workers: int, batches: int, rows: int, values: int, reps: int,
            prefetch: int) -> dict[str, Any]:
    import torch.multiprocessing as tmp

    from lmat_platform.reader.workers import WorkerPool

    ctx = tmp.get_context("forkserver")
    pool = WorkerPool(workers, prefetch=prefetch, timeout_s=120, ctx=ctx, target=_worker)

    def on_error(w: int, e: Exception) -> BaseException:
        return e

    spec = {"batches": batches, "rows": rows, "values": values}
    cpu, wall = [], []
    try:
        for rep in range(reps + 1):
            got = 0
            t0, c0 = time.perf_counter(), time.process_time()
            for _, _, b in pool.run([spec] * workers, 0, on_error, key=rep):
                got += len(b)
                del b
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert got == workers * batches * rows, got
            if rep:  # the first pass starts the workers
                cpu.append(dc / (workers * batches) * 1e6)
                wall.append(dt / (workers * batches) * 1e6)
    finally:
        pool.close()
    return {"workers": workers, "batches_per_pass": workers * batches, "rows": rows,
            "values": values, "cpu_us_per_batch": statistics.median(cpu),
            "wall_us_per_batch": statistics.median(wall),
            "all_cpu_us": [round(c, 1) for c in cpu], "all_wall_us": [round(w, 1) for w in wall]}


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=400, help="batches per worker and pass")
    p.add_argument("--rows", type=int, default=512, help="requests per batch")
    p.add_argument("--values", type=int, default=100_000, help="values per column and batch")
    p.add_argument("--reps", type=int, default=5, help="timed passes (median)")
    p.add_argument("--prefetch", type=int, default=2)
    a = p.parse_args(argv)
    res = measure(a.workers, a.batches, a.rows, a.values, a.reps, a.prefetch)
    res["load_average"] = os.getloadavg()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
