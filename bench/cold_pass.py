"""Passes with the decoded cache off, worker processes, and a training loop's data stall
(issue 16), on the suite's standard 3-tenant workload (:mod:`bench.workload`).

Run on demand::

    python -m bench.cold_pass                    # default scale, about 10 minutes on 2 cores
    python -m bench.cold_pass --scale tiny       # minutes (tests/test_bench_suite_smoke.py, bench marker)
    python -m bench.cold_pass --workdir DIR      # reuse a workload built there earlier

Every figure comes from a fresh subprocess per (reader, tenant), so nothing is shared between
readers, and the readers alternate round by round (``--rounds``), so the machine's noise falls
on all of them alike; each figure is the median over rounds of the median of ``--reps`` passes:

* ``fat_union``: the union fat rows (max_len 16384, every tenant's columns, one file per
  training day), pyarrow to torch, lists cut to the tenant's max_len;
* ``fat_own``: a fat file cut to the tenant's own length and columns (``write_fat_rows``);
* ``lmat_warm``: :class:`SequenceLoader`, a later pass of one process, decoded cache on
  (``LMAT_DECODE_CACHE_MB`` default: the tier's row groups, decoded thin rows and prepared
  units kept from the earlier pass). Labelled warm: a training job's later epochs;
* ``lmat_cold_wN``: the same with ``LMAT_DECODE_CACHE_MB=0`` (every pass decodes, checks and
  looks up its rows again; files in the OS page cache, as for the fat readers), ``num_workers``
  N (0, 1, 2), passes after the process's first (worker processes persist across passes).
  Not a pass that keeps nothing: the loader's table metadata (snapshot, tier and head file
  lists, the thin table's file list), the tier files' Parquet footers and the compiled kernels
  stay from the process's first pass;
* ``first_batch_s``: time from ``SequenceLoader(...)`` to its first batch in a fresh process
  with the cache off (imports done before; with workers, the main process makes it while they
  start, and ``second_batch_s``, to the second batch, includes their start): the figure
  with nothing kept in the process (the OS page cache is warm: earlier children read the files);
  ``import_s`` beside it: ``from lmat_platform.reader import SequenceLoader`` in that process
  (torch, pyarrow, deltalake, numba), which also starts the kernels' warm-up in a background
  thread (:func:`lmat_platform.kernels.warm_up_in_background`); each with the process's CPU
  seconds, which load on the machine inflates far less than wall seconds;
* ``stall``: a training loop whose step keeps the main process busy (a spin, holding the GIL
  as Python training code does) for ``--step-factor`` (2) times the time a single-process
  cache-off reader needs per batch, measured just before in the same process; reported is the
  share of the loop's time spent waiting for the next batch, with 0, 1 and 2 workers, over
  passes that follow an untimed pass with the step (the steady state of a training run);
* ``breakdown``: a cache-off pass's wall seconds by operation (:func:`child_breakdown`), the
  gap to the own-length fat file shown operation by operation; ``breakdown-cpu`` the same in
  CPU seconds;
* ``ratio`` (on demand: ``--child ratio --setup DIR/cold_setup.json --tenant T --reps N``, with
  ``LMAT_DECODE_CACHE_MB=0``): lmat's cache-off pass against the own-length fat file's in one
  process, alternated round by round, wall and CPU (:func:`child_ratio`).

Also the thin bytes of the workload: streaming thin rows (tails stored once per user and
file), batch-path thin rows and the UIH tier, per request. Writes ``--out`` (JSON) and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.cold_pass")

ROOT = Path(__file__).resolve().parent.parent
BATCH = 512
READERS = ("fat_union", "fat_own", "lmat_warm", "lmat_cold_w0", "lmat_cold_w1", "lmat_cold_w2")


# ------------------------------------------------------------------------------ children


def _tenant(name: str) -> Any:
    from bench.workload import TENANTS

    return next(t for t in TENANTS if t.name == name)


def _passes(make: Any, reps: int) -> dict[str, Any]:
    """One untimed pass, then ``reps`` timed ones of ``make()``'s batches."""
    secs: list[float] = []
    n = 0
    first = None
    for i in range(reps + 1):
        t0 = time.perf_counter()
        n = 0
        for b in make():
            if first is None:
                first = time.perf_counter() - t0
            n += len(b)
        if i:
            secs.append(time.perf_counter() - t0)
    med = statistics.median(secs)
    return {"examples": n, "seconds": med, "all_seconds": [round(s, 4) for s in secs],
            "examples_per_s": n / med, "first_pass_first_batch_s": first}


def child_fat(setup: dict[str, Any], tenant: str, which: str, reps: int) -> dict[str, Any]:
    from bench.bench_reader import fat_batches
    from bench.peers import fat_union_batches

    t = _tenant(tenant)
    if which == "fat_union":
        return _passes(lambda: fat_union_batches(setup["fat_files"], t, BATCH), reps)
    own = setup["fat_own"][tenant]
    return _passes(lambda: fat_batches(own, list(t.columns), BATCH), reps)


def child_lmat(setup: dict[str, Any], tenant: str, workers: int, reps: int) -> dict[str, Any]:
    i0, c0 = time.perf_counter(), time.process_time()
    from lmat_platform.reader import SequenceLoader

    import_s, import_cpu = time.perf_counter() - i0, time.process_time() - c0
    t = _tenant(tenant)
    t0, c1 = time.perf_counter(), time.process_time()
    loader = SequenceLoader(setup["store"], setup["thin"], tenant=t, batch_size=BATCH,
                            num_workers=workers)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    first_cpu = time.process_time() - c1
    # With workers the main process makes the first batch while they start; the second is
    # the first that a worker makes.
    next(it, None)
    second = time.perf_counter() - t0
    for _ in it:
        pass
    first_pass = time.perf_counter() - t0
    up_s = time.perf_counter()
    untimed = until_workers(loader)
    up_s = time.perf_counter() - up_s
    pool = loader._pool
    pids = [p.pid for p in pool.procs] if pool is not None else []
    w0 = _procs_cpu_s(pids)
    out = _passes(lambda: loader, reps)
    out["workers_cpu_s"] = _procs_cpu_s(pids) - w0  # in the passes _passes ran, its untimed one too
    out["workers_up_s"] = up_s  # after the first pass, until the workers serve the passes
    out["passes_until_workers"] = untimed
    loader.close()
    out["first_batch_s"] = first
    out["first_batch_cpu_s"] = first_cpu
    out["second_batch_s"] = second
    out["import_s"] = import_s
    out["import_cpu_s"] = import_cpu
    out["first_pass_s"] = first_pass
    return out


def until_workers(loader: Any, limit_s: float = 300.0, poll_s: float = 0.05) -> int:
    """Wait (and run untimed passes) until ``loader``'s worker processes serve its passes;
    returns the passes run. A pass that finds the workers still starting makes its batches in
    the main process (505c87a), so passes timed before they are up would measure the main
    process, not the workers. Waits without reading while they start, so that the wait does
    not slow their start down."""
    t0 = time.perf_counter()
    passes = 0
    while loader.num_workers and loader._pool is None:
        if time.perf_counter() - t0 > limit_s:
            raise RuntimeError(f"the loader's {loader.num_workers} workers not up in {limit_s} s")
        starting = loader._starting
        if starting is not None and not starting.done():
            time.sleep(poll_s)
            continue
        for _ in loader:  # takes the started workers as its pool (or starts them)
            pass
        passes += 1
    return passes


def _spin(seconds: float, clock: Any = time.perf_counter) -> None:
    end = clock() + seconds
    while clock() < end:
        pass


def _procs_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def child_stall(setup: dict[str, Any], tenant: str, factor: float, passes: int,
                step_clock: str = "cpu") -> dict[str, Any]:
    """The training loop: a step of ``factor`` x the single-process reader's time per batch.

    ``step_clock`` "cpu": the reader's CPU seconds per batch (all its threads) and a step
    that spins until this thread has used ``factor`` times that much CPU, so the step and
    the reader it is set against are both measured in CPU, whatever other load the machine
    carries; "wall": wall seconds for both (the reader's wall time, measured once, swings
    several-fold with the machine's load, and the step with it).

    Per loader (0, 1, 2 workers) and timed pass: the share of the loop's wall time spent in
    ``next()``, the first batch's wait, and the main process's CPU outside the step (all its
    threads, ``time.process_time``, less the spin's own CPU) per batch: what taking batches
    costs the trainer's process; and the worker processes' CPU per batch, to set against
    the step: workers that need less CPU than the step takes are waited for only when the
    machine's other load keeps them off the cores."""
    from lmat_platform.reader import SequenceLoader

    t = _tenant(tenant)
    single = SequenceLoader(setup["store"], setup["thin"], tenant=t, batch_size=BATCH)
    for _ in single:  # start-up
        pass
    secs, csecs, nb = [], [], 0
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        nb = sum(1 for _ in single)
        secs.append(time.perf_counter() - t0)
        csecs.append(time.process_time() - c0)
    per_batch = statistics.median(secs) / nb
    clock = time.thread_time if step_clock == "cpu" else time.perf_counter
    step = factor * (statistics.median(csecs) / nb if step_clock == "cpu" else per_batch)
    out: dict[str, Any] = {"reader_s_per_batch": per_batch, "step_s": step, "batches": nb,
                           "reader_cpu_s_per_batch": statistics.median(csecs) / nb,
                           "step_clock": step_clock,
                           "load_average": os.getloadavg()}
    for workers in (0, 1, 2):
        loader = SequenceLoader(setup["store"], setup["thin"], tenant=t, batch_size=BATCH,
                                num_workers=workers)
        for _ in loader:  # untimed: start-up
            pass
        until_workers(loader)
        # Untimed: one pass of the training loop, so the first timed pass follows a pass with
        # steps, as every pass of a training run but its first does (after passes without a
        # step, the workers have read nothing of the next pass ahead: its first batch waited
        # 28-42 ms, ~10 points of the short tenant's loop, a start-up cost, not a stall).
        for b in loader:
            _spin(step, clock)
            del b
        shares, totals, firsts, cpus, wcpus = [], [], [], [], []
        pool = loader._pool
        pids = [p.pid for p in pool.procs] if pool is not None else []
        for _ in range(passes):
            wait = spin_cpu = 0.0
            first = None
            n = 0
            t0, c0 = time.perf_counter(), time.process_time()
            w0 = _procs_cpu_s(pids)
            it = iter(loader)
            while True:
                a = time.perf_counter()
                try:
                    b = next(it)
                except StopIteration:
                    break
                waited = time.perf_counter() - a
                wait += waited
                first = waited if first is None else first
                n += 1
                s0 = time.process_time()
                _spin(step, clock)
                spin_cpu += time.process_time() - s0
                del b
            total = time.perf_counter() - t0
            cpu = time.process_time() - c0 - spin_cpu
            shares.append(wait / total)
            totals.append(total)
            firsts.append(first or 0.0)
            cpus.append(cpu / max(n, 1) * 1e6)
            wcpus.append((_procs_cpu_s(pids) - w0) / max(n, 1) * 1e3)
        loader.close()
        out[f"w{workers}"] = {
            "wait_share": statistics.median(shares),
            "all_wait_shares": [round(x, 4) for x in shares],
            "first_batch_waits_s": [round(x, 4) for x in firsts],
            "main_cpu_us_per_batch": statistics.median(cpus),
            "all_main_cpu_us_per_batch": [round(x, 1) for x in cpus],
            "workers_cpu_ms_per_batch": [round(x, 2) for x in wcpus],
            "loop_s": statistics.median(totals),
        }
    out["load_average_after"] = os.getloadavg()
    return out


def child_ratio(setup: dict[str, Any], tenant: str, rounds: int) -> dict[str, Any]:
    """lmat's cache-off pass (``num_workers=0``) against the own-length fat file's, side by
    side in one process: after one untimed pass of each (the process's start-up: imports,
    compiled kernels, table metadata, footers), ``rounds`` rounds that each time one pass of
    both, in alternating order. Per reader the median wall and CPU seconds of a pass; the
    ratio is of the medians (and the median of the per-round ratios). Needs
    ``LMAT_DECODE_CACHE_MB=0``: a pass keeps nothing from the one before."""
    from bench.bench_reader import fat_batches
    from lmat_platform.reader import SequenceLoader
    from lmat_platform.store.cache import cache

    if cache().max_bytes:
        raise SystemExit("--child ratio: set LMAT_DECODE_CACHE_MB=0 (the decoded cache is on)")
    t = _tenant(tenant)
    loader = SequenceLoader(setup["store"], setup["thin"], tenant=t, batch_size=BATCH)
    own = setup["fat_own"][tenant]
    readers = {"lmat": lambda: loader, "fat_own": lambda: fat_batches(own, list(t.columns), BATCH)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in readers}
    n: dict[str, int] = {}
    for rnd in range(rounds + 1):
        for k in (readers if rnd % 2 else reversed(list(readers))):
            w0, c0 = time.perf_counter(), time.process_time()
            n[k] = sum(len(b) for b in readers[k]())
            if rnd:  # round 0: start-up
                times[k].append((time.perf_counter() - w0, time.process_time() - c0))
    if n["lmat"] != n["fat_own"]:
        raise RuntimeError(f"lmat read {n['lmat']} examples, the fat file {n['fat_own']}")
    med = {k: {"wall_s": statistics.median(w for w, _ in v),
               "cpu_s": statistics.median(c for _, c in v)} for k, v in times.items()}
    return {
        "examples": n["lmat"], "rounds": rounds, "passes": med,
        "examples_per_s": {k: n[k] / m["wall_s"] for k, m in med.items()},
        "ratio_wall": med["fat_own"]["wall_s"] / med["lmat"]["wall_s"],
        "ratio_cpu": med["fat_own"]["cpu_s"] / med["lmat"]["cpu_s"],
        "ratio_wall_per_round": statistics.median(
            f[0] / m[0] for f, m in zip(times["fat_own"], times["lmat"], strict=True)),
        "load_average": os.getloadavg(),
    }


#: The operations of a cache-off pass, in the order they run for each unit.
STAGES = ("thin_read", "thin_tails", "heads", "tier_read", "checks_tails", "plan", "batches")
#: The operations that decode Parquet (their ``decode_s`` in :func:`child_breakdown`).
DECODED = ("thin_read", "heads", "tier_read")


def child_breakdown(setup: dict[str, Any], tenant: str, reps: int,
                    clock: Any = time.perf_counter) -> dict[str, Any]:
    """Where a cache-off pass of ``num_workers=0`` spends its time, operation by operation:
    the loader's own units, read one after another in this thread (no prefetch thread, so the
    seconds add up), after one pass of start-up. ``thin_read``: the bucket's thin files
    (Parquet) merged in order; ``thin_tails``: stored tails flattened and requests' spans
    resolved (late events sorted); ``heads``: the bucket's head summaries; ``tier_read``: the
    pruned read of the tier's row groups; ``checks_tails``: pointer checks, lookups and tails
    in ``prepare_unit`` besides those two reads; ``plan``: the planner; ``batches``: batches
    cut and every value copied. Seconds of ``clock`` per pass (wall; ``time.process_time``:
    CPU, which load on the machine inflates far less), median over ``reps`` passes.
    ``decode_s``: of ``thin_read``, ``heads`` and ``tier_read``, the seconds inside Arrow's
    Parquet decode (``ParquetFile.read`` / ``read_row_groups``), the rest being the Python
    and numpy work around it."""
    import functools

    import pyarrow.parquet as pq

    import lmat_platform.reader.loader as ld
    from lmat_platform.protocol.pointers import HeadIndex
    from lmat_platform.reader.buffers import shared_pool
    from lmat_platform.reconstruct import ThinRows, plan_unit, prepare_unit
    from lmat_platform.store import uih

    t = _tenant(tenant)
    loader = ld.SequenceLoader(setup["store"], setup["thin"], tenant=t, batch_size=BATCH)
    for _ in loader:  # start-up: kernels, footers, table metadata
        pass
    spec = loader._specs(1, 0, [0])[0]
    acc: dict[str, float] = {}
    inside: list[str] = []  # the timed operations a call runs in, innermost last

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*a: Any, **k: Any) -> Any:
            t0 = clock()
            inside.append(name)
            try:
                return fn(*a, **k)
            finally:
                inside.pop()
                acc[name] = acc.get(name, 0.0) + clock() - t0
        return inner

    def decode(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                # Thin files are read outside the timed calls, in ``_unit_rows``.
                where = "decode:" + (inside[-1] if inside else "thin_read")
                acc[where] = acc.get(where, 0.0) + clock() - t0
        return inner

    orig = (uih.read_bucket, HeadIndex.of_files, ThinRows.from_table)
    pq_orig = (pq.ParquetFile.read, pq.ParquetFile.read_row_groups)
    pq.ParquetFile.read = decode(pq_orig[0])
    pq.ParquetFile.read_row_groups = decode(pq_orig[1])
    uih.read_bucket = timed("tier_read", orig[0])
    HeadIndex.of_files = classmethod(  # type: ignore[assignment,method-assign]
        lambda cls, *a, **k: timed("heads", orig[1])(*a, **k))
    ThinRows.from_table = classmethod(  # type: ignore[assignment,method-assign]
        lambda cls, *a, **k: timed("thin_tails", orig[2])(*a, **k))
    alloc = ld._pool_alloc(shared_pool())
    passes = []
    decoded: list[dict[str, float]] = []
    try:
        for _ in range(reps):
            acc.clear()
            stage = dict.fromkeys(STAGES, 0.0)
            reader = ld._UnitReader(spec)
            n = 0
            for i, unit in enumerate(spec.units):
                t0 = clock()
                rows = reader._unit_rows(unit)
                t1 = clock()
                with reader.scope(unit):  # a bucket's heads and row groups once a pass
                    prep = prepare_unit(spec.ctx, unit.bucket, rows)
                t2 = clock()
                seqs = plan_unit(prep, plan_only=True)
                t3 = clock()
                w = ld._window([seqs], spec, i)
                for a in range(0, w.n, BATCH):
                    b = ld._batch([ld._piece(w, a, min(w.n, a + BATCH))], t.columns, alloc)
                    n += len(b)
                    del b
                t4 = clock()
                stage["thin_read"] += t1 - t0
                stage["checks_tails"] += t2 - t1
                stage["plan"] += t3 - t2
                stage["batches"] += t4 - t3
            # The timed reads ran inside the stages above: move them to their own rows.
            stage["thin_read"] -= acc.get("thin_tails", 0.0)
            stage["checks_tails"] -= acc.get("heads", 0.0) + acc.get("tier_read", 0.0)
            for k in ("thin_tails", "heads", "tier_read"):
                stage[k] = acc.get(k, 0.0)
            passes.append(stage)
            decoded.append({k: acc.get("decode:" + k, 0.0) for k in DECODED})
    finally:
        pq.ParquetFile.read, pq.ParquetFile.read_row_groups = pq_orig
        uih.read_bucket = orig[0]
        HeadIndex.of_files = classmethod(  # type: ignore[assignment,method-assign]
            lambda cls, *a, **k: orig[1](*a, **k))
        ThinRows.from_table = classmethod(  # type: ignore[assignment,method-assign]
            lambda cls, *a, **k: orig[2](*a, **k))
    med = {k: statistics.median(p[k] for p in passes) for k in STAGES}
    return {"examples": n, "stages_s": med, "pass_s": sum(med.values()),
            "decode_s": {k: statistics.median(d[k] for d in decoded) for k in DECODED},
            "all": [{k: round(v, 5) for k, v in p.items()} for p in passes]}


# ------------------------------------------------------------------------------ driver


def build(work: Path, scale_name: str) -> dict[str, Any]:
    """The suite's workload plus one fat file per tenant cut to its own length (reused when
    ``work`` holds one already)."""
    import pyarrow.parquet as pq

    from bench.workload import SCALES, TENANTS, build_union_workload, dir_bytes

    done = work / "cold_setup.json"
    if done.exists():
        setup: dict[str, Any] = json.loads(done.read_text())
        return setup
    from lmat_platform.fatrows import write_fat_rows
    from lmat_platform.store import open_store

    b = build_union_workload(work, SCALES[scale_name])
    st = open_store(b.store)
    req = pq.read_table(b.requests_file)
    own = {}
    for t in TENANTS:
        own[t.name] = str(work / f"fat-own-{t.name}.parquet")
        write_fat_rows(st, req, t, own[t.name])
    setup = {
        "store": b.store, "thin": b.thin, "fat_files": b.fat_files, "fat_own": own,
        "requests": b.requests, "events": b.events, "config": b.config,
        "bytes": {
            "thin_streaming": dir_bytes(b.thin), "thin_batch": dir_bytes(work / "thin-batch"),
            "uih": dir_bytes(Path(b.store) / "uih"),
            "fat_union": sum(dir_bytes(f) for f in b.fat_files),
            **{f"fat_own_{k}": dir_bytes(v) for k, v in own.items()},
        },
    }
    done.write_text(json.dumps(setup))
    return setup


def _child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.cold_pass", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(work: Path, scale_name: str, rounds: int, reps: int, factor: float,
        stall_passes: int) -> dict[str, Any]:
    from bench.workload import TENANTS

    setup = build(work, scale_name)
    sf = work / "cold_setup.json"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        t.name: {r: [] for r in READERS} for t in TENANTS}
    for rnd in range(rounds):
        for t in TENANTS:
            for r in READERS:
                log.info("round %d: %s %s", rnd, t.name, r)
                base = ["--child", r, "--setup", str(sf), "--tenant", t.name, "--reps", str(reps)]
                env = {"LMAT_DECODE_CACHE_MB": "0"} if r.startswith("lmat_cold") else {}
                runs[t.name][r].append(_child(base, env))
                # What is measured so far, in case the run is cut short.
                (work / "cold_partial.json").write_text(json.dumps(runs))
    stall = {}
    breakdown = {}
    breakdown_cpu: dict[str, Any] = {}
    for t in TENANTS:
        log.info("stall: %s", t.name)
        stall[t.name] = _child(["--child", "stall", "--setup", str(sf), "--tenant", t.name,
                                "--factor", str(factor), "--reps", str(stall_passes)],
                               {"LMAT_DECODE_CACHE_MB": "0"})
        log.info("breakdown: %s", t.name)
        breakdown[t.name] = _child(["--child", "breakdown", "--setup", str(sf), "--tenant",
                                    t.name, "--reps", str(2 * reps + 1)],
                                   {"LMAT_DECODE_CACHE_MB": "0"})
        breakdown_cpu[t.name] = _child(["--child", "breakdown-cpu", "--setup", str(sf),
                                        "--tenant", t.name, "--reps", str(2 * reps + 1)],
                                       {"LMAT_DECODE_CACHE_MB": "0"})
    table: dict[str, dict[str, Any]] = {}
    for t in TENANTS:
        row: dict[str, Any] = {}
        for r in READERS:
            got = runs[t.name][r]
            row[r] = statistics.median(g["examples_per_s"] for g in got)
            if r.startswith("lmat_cold"):
                for k in ("first_batch_s", "first_batch_cpu_s", "import_s", "import_cpu_s"):
                    row[f"{r}_{k}"] = statistics.median(g[k] for g in got)
        row["cold_over_fat_union"] = row["lmat_cold_w0"] / row["fat_union"]
        row["cold_over_fat_own"] = row["lmat_cold_w0"] / row["fat_own"]
        row["w2_over_w0"] = row["lmat_cold_w2"] / row["lmat_cold_w0"]
        table[t.name] = row
    n = setup["requests"]
    by = setup["bytes"]
    thin = {
        "requests": n,
        "streaming_thin_bytes_per_request": by["thin_streaming"] / n,
        "batch_thin_bytes_per_request": by["thin_batch"] / n,
        "uih_bytes_per_request": by["uih"] / n,
        "streaming_over_batch": by["thin_streaming"] / max(by["thin_batch"], 1),
        "streaming_over_uih": by["thin_streaming"] / max(by["uih"], 1),
    }
    return {"setup": setup, "rounds": rounds, "reps": reps, "table": table, "runs": runs,
            "stall": stall, "breakdown": breakdown, "breakdown_cpu": breakdown_cpu,
            "thin_bytes": thin,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _stage_table(bd: dict[str, Any], names: list[str], title: str) -> list[str]:
    """A breakdown child's result per tenant as Markdown lines: its title, then a row per
    operation and the whole pass, in milliseconds."""
    out = ["", title, "", "| operation | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]
    for k in STAGES:
        out.append(f"| {k} | " + " | ".join(
            f"{1e3 * bd[n]['stages_s'][k]:.1f}" for n in names) + " |")
    out.append("| whole pass | " + " | ".join(f"{1e3 * bd[n]['pass_s']:.1f}" for n in names)
               + " |")
    if all("decode_s" in bd[n] for n in names):
        out.append("| of the pass, Parquet decode (thin files + heads + tier) | " + " | ".join(
            f"{1e3 * sum(bd[n]['decode_s'].values()):.1f} ("
            + " + ".join(f"{1e3 * bd[n]['decode_s'][k]:.1f}" for k in DECODED) + ")"
            for n in names) + " |")
    return out


def markdown(res: dict[str, Any]) -> str:
    from bench.workload import TENANTS

    names = [t.name for t in TENANTS]
    lens = {t.name: t.max_len for t in TENANTS}
    head = "| reader | " + " | ".join(f"{n} ({lens[n]})" for n in names) + " |"
    out = [head, "|---|" + "---:|" * len(names)]
    label = {
        "fat_union": "union fat rows, pyarrow to torch (examples/s)",
        "fat_own": "fat file cut to the tenant's length",
        "lmat_cold_w0": "lmat, decoded cache off, later pass (`num_workers=0`)",
        "lmat_cold_w1": "lmat, decoded cache off, later pass (`num_workers=1`)",
        "lmat_cold_w2": "lmat, decoded cache off, later pass (`num_workers=2`)",
        "lmat_warm": "lmat, **warm**: later pass, decoded cache on",
    }
    tab = res["table"]
    for r in ("fat_union", "fat_own", "lmat_cold_w0", "lmat_cold_w1", "lmat_cold_w2",
              "lmat_warm"):
        out.append(f"| {label[r]} | " + " | ".join(f"{tab[n][r] / 1e3:,.1f}K" for n in names)
                   + " |")
    out.append("| lmat, fresh process: `import lmat_platform.reader` (CPU seconds) | "
               + " | ".join(f"{tab[n]['lmat_cold_w0_import_s']:.2f} s "
                            f"({tab[n]['lmat_cold_w0_import_cpu_s']:.2f} s)" for n in names)
               + " |")
    for w in (0, 2):
        out.append(f"| lmat, fresh process: loader built to first batch, cache off "
                   f"(`num_workers={w}`; CPU seconds of this process) | "
                   + " | ".join(f"{tab[n][f'lmat_cold_w{w}_first_batch_s']:.2f} s "
                                f"({tab[n][f'lmat_cold_w{w}_first_batch_cpu_s']:.2f} s)"
                                for n in names) + " |")
    out.append("| cache off / union fat | " + " | ".join(
        f"{tab[n]['cold_over_fat_union']:.1f}x" for n in names) + " |")
    out.append("| cache off / own-length fat | " + " | ".join(
        f"{tab[n]['cold_over_fat_own']:.2f}x" for n in names) + " |")
    out.append("| 2 workers / 0 workers (cache off) | " + " | ".join(
        f"{tab[n]['w2_over_w0']:.2f}x" for n in names) + " |")
    st = res["stall"]
    out.append("| training loop, step = 2x reader time: data-wait share, 0 workers | " + " | ".join(
        f"{100 * st[n]['w0']['wait_share']:.1f}%" for n in names) + " |")
    for w in (1, 2):
        out.append(f"| the same, {w} worker{'s' if w > 1 else ''} | " + " | ".join(
            f"{100 * st[n][f'w{w}']['wait_share']:.1f}%" for n in names) + " |")
    bd = res.get("breakdown")
    if bd:
        out += _stage_table(bd, names, "A cache-off pass (`num_workers=0`) by operation, units "
                            "read one after another in one thread (`--child breakdown`), "
                            "milliseconds per pass:")
        out.append("| own-length fat file pass, for comparison | " + " | ".join(
            f"{1e3 * bd[n]['examples'] / tab[n]['fat_own']:.1f}" for n in names) + " |")
    bc = res.get("breakdown_cpu")
    if bc:
        out += _stage_table(bc, names, "The same in CPU milliseconds of the process "
                            "(`--child breakdown-cpu`):")
    tb = res["thin_bytes"]
    out.append("")
    out.append(f"Thin bytes per request ({tb['requests']:,} requests): streaming "
               f"{tb['streaming_thin_bytes_per_request']:.0f} B, batch "
               f"{tb['batch_thin_bytes_per_request']:.0f} B "
               f"(streaming / batch {tb['streaming_over_batch']:.2f}x); UIH tier "
               f"{tb['uih_bytes_per_request']:.0f} B (streaming / tier "
               f"{tb['streaming_over_uih']:.2f}x).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="default", help="bench.workload scale (tiny|default|large)")
    p.add_argument("--workdir", default=None, help="where the workload is (or is built)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cold_pass.json"))
    p.add_argument("--rounds", type=int, default=2, help="rounds of every reader (alternated)")
    p.add_argument("--reps", type=int, default=3, help="timed passes per child (median)")
    p.add_argument("--factor", type=float, default=2.0,
                   help="training step / single-process reader time per batch")
    p.add_argument("--step-clock", choices=("cpu", "wall"), default="cpu",
                   help="stall child: the step and the reader time it is set against, in CPU "
                        "or wall seconds")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    p.add_argument("--tenant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        setup = json.loads(Path(args.setup).read_text())
        if args.child.startswith("fat"):
            res = child_fat(setup, args.tenant, args.child, args.reps)
        elif args.child == "lmat_warm":
            res = child_lmat(setup, args.tenant, 0, args.reps)
        elif args.child.startswith("lmat_cold_w"):
            res = child_lmat(setup, args.tenant, int(args.child[-1]), args.reps)
        elif args.child == "stall":
            res = child_stall(setup, args.tenant, args.factor, args.reps, args.step_clock)
        elif args.child == "breakdown":
            res = child_breakdown(setup, args.tenant, args.reps)
        elif args.child == "breakdown-cpu":
            res = child_breakdown(setup, args.tenant, args.reps, time.process_time)
        elif args.child == "ratio":
            res = child_ratio(setup, args.tenant, args.reps)
        else:
            raise SystemExit(f"--child: unknown reader {args.child!r}")
        print(json.dumps(res))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lmat-cold-"))
    res = run(work, args.scale, args.rounds, args.reps, args.factor, stall_passes=2)
    Path(args.out).write_text(json.dumps(res, indent=2))
    md = markdown(res)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
