"""Scale benchmark (issue 15): what ingest, publish, storage and reading cost as the store grows.

A store of ``--users`` users is grown step by step (``--steps``, up to ``--events``) with bulk
event files in arrival order, a snapshot published after each file and the tier compacted after
each step, then vacuumed with the store's retention (``--retention-hours``, 0 by default: the
raw log keeps only the unpublished rest), as a store fed for months would be. The bulk history spans ``--days`` days at the
largest step (so a smaller step is the same store earlier in its life). Event ids are assigned in
arrival order (as snowflake ids or per-producer sequences are). At every step it measures, each
operation in its own process with ``LMAT_DECODE_CACHE_MB=0`` (so peak RSS is the operation's
own, and nothing decoded is kept between operations; the files just written are in the OS page
cache):

- ingest of one 50K-event file (``--batch``): the next hour's events, 1% of them re-sent copies
  of recent events (duplicates); seconds, events/s, peak RSS, what the duplicate check read;
- publish of that hour: seconds, seconds per new event, peak RSS, rows of history read for the
  head summaries;
- bytes on disk per stored event, by table (files on disk, and those the latest versions use);
- bytes of the tier read per example, examples/s and peak RSS of a loader pass (decoded cache
  off) for tenants of ``max_len`` 256, 2048 and 16384, over ``--requests`` batch-path requests
  right after the last snapshot. ``bytes_per_example`` is the loader's count: compressed bytes
  of the tier column chunks in the row groups it reads (from the files' footers; with the cache
  off each is read from the file); ``io_read_bytes_per_example`` is what the process read
  through read calls during the pass (``rchar`` of ``/proc/self/io``: tier and thin files,
  footers, table logs), measured;

and writes ``bench/results/scale.json`` (after every step, so a long run keeps what it measured)
and ``scale.png``. Run::

    .venv/bin/python -m bench.scale --events 20000000 --steps 1000000,5000000,20000000
    .venv/bin/python -m bench.scale --events 100000000 --steps 1000000,5000000,20000000,50000000,100000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
HOUR = 3_600_000_000
DAY = 24 * HOUR
START = 1_700_000_000_000_000
TENANT_LENS = (256, 2048, 16384)


# ----------------------------------------------------------------------------- child operations
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _io_read_bytes() -> int | None:
    """Bytes this process has read through read calls so far (Linux; None elsewhere)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return next(int(v) for k, v in (ln.split(":") for ln in text.splitlines()) if k == "rchar")


def _op(args: argparse.Namespace) -> dict[str, Any]:
    """One measured operation, run in this (fresh) process."""
    import logging

    from lmat_platform.store import compact_buckets, ingest_files, open_store, publish_snapshot
    from lmat_platform.store.heads import warm_kernels

    store = open_store(args.store)
    out: dict[str, Any] = {}
    warm_kernels()  # numba's cache load is a per-process constant, not a cost of the store
    t0 = time.perf_counter()
    if args.op == "ingest":
        from lmat_platform.store import idindex

        seen: list[dict[str, int]] = []
        orig = idindex.accepted_mask

        def spy(st: Any, ids: np.ndarray, stats: Any = None) -> np.ndarray:
            stats = stats if stats is not None else idindex.LookupStats()
            m = orig(st, ids, stats)
            seen.append(stats.as_dict())
            return m

        idindex.accepted_mask = spy  # type: ignore[assignment]
        res = ingest_files(store, [args.file])
        out.update(res.as_dict())
        out["dedup_read"] = seen[-1] if seen else None
    elif args.op == "publish":
        logging.basicConfig(level=logging.WARNING)
        info = publish_snapshot(store, args.watermark)
        out["snapshot_id"] = info.snapshot_id
        out["events"] = info.events
        h = store.open_table("heads").history(1)[0]  # type: ignore[union-attr]
        out["head_rows_read"] = int(h.get("lmat.rows_read", 0))
        # Previous summaries read from heads_latest (the touched users' row groups only).
        out["latest_rows_read"] = int(h.get("lmat.latest_rows_read", -1))
        out["touched_users"] = int(h.get("lmat.users", -1))
        out["head_refreshed_users"] = int(h.get("lmat.refreshed_users", 0))
    elif args.op == "compact":
        out.update(compact_buckets(store))
        # Periodic maintenance: snapshots older than the store's retention leave the raw log
        # (one stored copy), then unreferenced files are removed.
        from lmat_platform.store import vacuum
        from lmat_platform.store.retention import retired_through

        t1 = time.perf_counter()
        out["vacuumed_files"] = sum(vacuum(store).values())
        out["vacuum_s"] = round(time.perf_counter() - t1, 3)
        out["raw_retired_through"] = retired_through(store)
    elif args.op == "thin":
        from lmat_platform.protocol.thin import write_thin

        out.update({k: v for k, v in write_thin(store, args.file, args.thin, path="examples").items()
                    if isinstance(v, (int, float, str))})
    elif args.op == "read":
        from lmat_platform.reader import SequenceLoader
        from lmat_platform.tenants import Tenant

        tenant = Tenant(name=f"L{args.max_len}", columns=("item_id", "action"),
                        max_len=args.max_len)
        loader = SequenceLoader(store.root, args.thin, tenant=tenant, batch_size=512)
        io0 = _io_read_bytes()
        t0 = time.perf_counter()
        n = events = uih_bytes = 0
        for b in loader:
            n += len(b)
            events += int(b.lengths.sum())
            uih_bytes += b.bytes_read - b.thin_bytes_read
        io1 = _io_read_bytes()
        out.update({"examples": n, "events": events, "uih_bytes": uih_bytes,
                    "bytes_per_example": uih_bytes / max(n, 1),
                    "io_read_bytes_per_example": None if io0 is None or io1 is None
                    else (io1 - io0) / max(n, 1)})
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    return out


def _child(op: str, store: str, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.scale", "--op", op, "--store", store]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "LMAT_DECODE_CACHE_MB": "0"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the workload
class Workload:
    """Events in arrival order over ``users`` users with lognormal activity; ids in arrival
    order; event_ts shortly before arrival, 2% of events up to 6 hours late."""

    def __init__(self, users: int, rate_per_us: float, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        w = self.rng.lognormal(0.0, 1.2, users)
        self.p = w / w.sum()
        self.users = np.arange(1, users + 1, dtype=np.int64)
        self.rate = rate_per_us
        self.clock = START
        self.next_id = 1
        self.last: pa.Table | None = None

    def events(self, n: int, span_us: int, *, dup_share: float = 0.0) -> pa.Table:
        rng = self.rng
        ats = self.clock + np.sort(rng.integers(0, span_us, n))
        delay = rng.exponential(30e6, n).astype(np.int64)
        late = rng.random(n) < 0.02
        delay[late] = rng.integers(0, 6 * HOUR, late.sum())
        ets = ats - delay
        t = pa.table({
            "user_id": rng.choice(self.users, size=n, p=self.p),
            "event_id": np.arange(self.next_id, self.next_id + n, dtype=np.int64),
            "event_ts": ets,
            "arrival_ts": ats,
            "item_id": rng.zipf(1.3, n).astype(np.int64) % 1_000_000,
            "action": rng.integers(1, 6, n).astype(np.int16),
            "dwell_ms": (rng.random(n) * 1e4).astype(np.float32),
        })
        self.next_id += n
        self.clock += span_us
        if dup_share and self.last is not None:
            k = int(n * dup_share)
            src = self.last.take(pa.array(rng.choice(self.last.num_rows, k, replace=False)))
            # Re-sent: same event, arriving again now.
            src = src.set_column(3, "arrival_ts", pa.array(
                np.maximum(t.column("arrival_ts").to_numpy()[:k], src.column("event_ts").to_numpy())))
            t = pa.concat_tables([t.slice(k), src])
        self.last = t
        return t


def _disk(store_root: str) -> dict[str, dict[str, int]]:
    from lmat_platform.store import open_store
    from lmat_platform.store.core import disk_bytes, live_bytes

    st = open_store(store_root)
    return {"disk": disk_bytes(st), "live": live_bytes(st)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.store import init_store

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    root = str(work / "store")
    init_store(root, n_buckets=args.buckets, retention_hours=args.retention_hours)
    steps = sorted(int(s) for s in args.steps.split(","))
    steps = [s for s in steps if s <= args.events]
    wl = Workload(args.users, args.events / (args.days * DAY), seed=args.seed)
    result: dict[str, Any] = {"config": vars(args), "steps": [], "growth": []}
    stored = 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    for target in steps:
        while stored < target:
            n = min(args.chunk, target - stored)
            ev = wl.events(n, int(n / wl.rate))
            f = work / "chunk.parquet"
            pq.write_table(ev, f)
            g_in = _child("ingest", root, file=f)
            g_pub = _child("publish", root, watermark=wl.clock)
            stored += g_in["accepted"]
            result["growth"].append({"stored": stored, "ingest_s": g_in["wall_s"],
                                     "ingest_rss_mb": g_in["peak_rss_mb"],
                                     "publish_s": g_pub["wall_s"],
                                     "publish_rss_mb": g_pub["peak_rss_mb"],
                                     "elapsed_s": round(time.perf_counter() - t_run, 1)})
            print(f"  grown to {stored:,} events (ingest {g_in['wall_s']} s, publish "
                  f"{g_pub['wall_s']} s)", flush=True)
        comp = _child("compact", root)
        # The measured hours: 50K events each, 1% of them re-sent recent events; the step
        # reports the median hour (a shared machine's noise hits single runs).
        ings, pubs = [], []
        for h in range(args.hours):
            ev = wl.events(args.batch, HOUR, dup_share=0.01)
            f = work / f"hour-{target}-{h}.parquet"
            pq.write_table(ev, f)
            ings.append(_child("ingest", root, file=f))
            pubs.append(_child("publish", root, watermark=wl.clock))
            stored += ings[-1]["accepted"]
        ing = sorted(ings, key=lambda r: r["wall_s"])[len(ings) // 2]
        pub = sorted(pubs, key=lambda r: r["wall_s"])[len(pubs) // 2]
        disk = _disk(root)
        # Requests right after the snapshot, users by activity (batch path: pointers only).
        rng = np.random.default_rng(target)
        req = pa.table({
            "request_id": np.arange(1, args.requests + 1, dtype=np.int64),
            "user_id": rng.choice(wl.users, size=args.requests, p=wl.p),
            "request_ts": wl.clock + 1 + np.arange(args.requests, dtype=np.int64),
        })
        rf = work / f"requests-{target}.parquet"
        pq.write_table(req, rf)
        thin = work / f"thin-{target}"
        _child("thin", root, file=rf, thin=thin)
        reads = {L: _child("read", root, thin=thin, max_len=L) for L in TENANT_LENS}
        step = {
            "events": stored,
            "elapsed_s": round(time.perf_counter() - t_run, 1),
            "compact": comp,
            "ingest": ing,
            "ingest_s_all": [r["wall_s"] for r in ings],
            "publish_s_all": [r["wall_s"] for r in pubs],
            "ingest_events_per_s": args.batch / max(ing["wall_s"], 1e-9),
            "publish": pub,
            "publish_us_per_event": pub["wall_s"] / max(pub["events"], 1) * 1e6,
            "bytes_per_event": {k: {t: v / stored for t, v in d.items()} for k, d in disk.items()},
            "bytes": disk,
            "read": {str(L): r for L, r in reads.items()},
            "peak_rss_mb": max([ing["peak_rss_mb"], pub["peak_rss_mb"], comp["peak_rss_mb"]]
                               + [r["peak_rss_mb"] for r in reads.values()]),
        }
        if args.keep_stores:
            # The store as it is at this step, for --compare (hard links: Delta files are never
            # modified in place, so the growing store's later commits do not change it).
            kept = work / f"store-{target}"
            shutil.copytree(root, kept, copy_function=os.link)
            step["kept_store"] = str(kept)
        result["steps"].append(step)
        print(json.dumps({"events": stored, "ingest_s": [r["wall_s"] for r in ings],
                          "publish_s": [r["wall_s"] for r in pubs],
                          "dedup_read": ing.get("dedup_read"),
                          "head_rows_read": pub["head_rows_read"],
                          "latest_rows_read": pub["latest_rows_read"],
                          "touched_users": pub["touched_users"],
                          "bytes_per_example": {L: round(r["bytes_per_example"])
                                                for L, r in reads.items()},
                          "peak_rss_mb": step["peak_rss_mb"]}), flush=True)
        out.write_text(json.dumps(result, indent=1, default=str))
    plot(result, out.with_suffix(".png"))
    return result


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Ingest and publish timings of stores of different sizes, measured interleaved.

    A long growth run meets a shared machine's load at different times for different sizes; here
    each store ``--compare`` names (e.g. the run's store kept at each step) is copied to
    ``--work``, and round r ingests the *same* 50K-event hour file into every store in turn, then
    publishes it in every store, so every size meets the same load. The hour's ids are new to
    every store and its times after every store's last snapshot; from round 1 on, 1% of its
    events are re-sent events of the previous round (duplicates in every store). Round 0 is a
    warm-up, not counted. Adds ``compare`` (per store: events at start and after, medians, every round, peak RSS;
    ratios to the smallest store) to the ``--out`` JSON."""
    from lmat_platform.store import latest_snapshot, open_store
    from lmat_platform.store.core import delta_dataset

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    stores: list[dict[str, Any]] = []
    for i, src in enumerate(args.compare.split(",")):
        dst = work / f"store-{i}"
        shutil.copytree(src, dst, symlinks=True)
        info = latest_snapshot(open_store(str(dst)))
        if info is None:
            raise SystemExit(f"--compare: {src} has no published snapshot")
        tier = open_store(str(dst)).open_table("uih")
        stores.append({"source": src, "root": str(dst), "watermark": info.watermark,
                       "events_at_start": delta_dataset(tier).count_rows() if tier else 0,
                       "ingest": [], "publish": []})
    wl = Workload(args.users, 1.0, seed=args.seed + 1)
    wl.clock = max(s["watermark"] for s in stores) + HOUR
    wl.next_id = 10**12
    for r in range(args.hours + 1):
        ev = wl.events(args.batch, HOUR, dup_share=0.01 if r else 0.0)
        f = work / f"hour-{r}.parquet"
        pq.write_table(ev, f)
        for st in stores:
            ing = _child("ingest", st["root"], file=f)
            pub = _child("publish", st["root"], watermark=wl.clock)
            if r:
                st["ingest"].append(ing)
                st["publish"].append(pub)
        print(f"  round {r}: ingest " + " ".join(f"{st['ingest'][-1]['wall_s'] if r else '-'}"
                                               for st in stores), flush=True)

    def med(rows: list[dict[str, Any]]) -> float:
        return float(np.median([x["wall_s"] for x in rows]))

    out_stores = []
    for st in stores:
        tier = open_store(st["root"]).open_table("uih")
        n = delta_dataset(tier).count_rows() if tier is not None else 0
        out_stores.append({
            "source": st["source"], "events": n, "events_at_start": st["events_at_start"],
            "ingest_s": med(st["ingest"]), "publish_s": med(st["publish"]),
            "ingest_s_all": [x["wall_s"] for x in st["ingest"]],
            "publish_s_all": [x["wall_s"] for x in st["publish"]],
            "ingest_peak_rss_mb": max(x["peak_rss_mb"] for x in st["ingest"]),
            "publish_peak_rss_mb": max(x["peak_rss_mb"] for x in st["publish"]),
            "dedup_read": st["ingest"][-1].get("dedup_read"),
            "latest_rows_read": [x.get("latest_rows_read") for x in st["publish"]],
            "touched_users": [x.get("touched_users") for x in st["publish"]],
        })
    base = min(out_stores, key=lambda x: x["events"])
    for x in out_stores:
        x["ingest_ratio"] = x["ingest_s"] / base["ingest_s"]
        x["publish_ratio"] = x["publish_s"] / base["publish_s"]
    res = {"config": {k: v for k, v in vars(args).items() if v is not None}, "stores": out_stores}
    out = Path(args.out)
    full = json.loads(out.read_text()) if out.exists() else {}
    full["compare"] = res
    out.write_text(json.dumps(full, indent=1, default=str))
    for x in out_stores:
        print(json.dumps({k: x[k] for k in ("events", "ingest_s", "publish_s", "ingest_ratio",
                                            "publish_ratio")}), flush=True)
    return res


def table(result: dict[str, Any]) -> str:
    """The README table: one row per store size, one column per target of issue 15."""
    steps = result["steps"]
    # Each compared store is a step's store plus the compared hours: matched to the nearest.
    cmp: dict[int, dict[str, Any]] = {}
    for c in result.get("compare", {}).get("stores", []):
        near = min(steps, key=lambda st: abs(st["events"] - c["events"]))
        cmp[near["events"]] = c
    base = steps[0]
    lines = [
        "| store holds | ingest 50K (run; interleaved) | publish 1 h (run; interleaved) "
        "| peak RSS, any step | live bytes/event: all / tier | tier bytes/example L=256 / 2048 "
        "/ 16384 (256:2048) | read bytes/example (io) L=256 / 2048 | examples/s L=256 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for st in steps:
        live = st["bytes_per_event"]["live"]
        tot, tier = sum(live.values()), live["uih"]
        rd = st["read"]
        c = cmp.get(st["events"])
        ing = f"{st['ingest']['wall_s']:.2f} s ({st['ingest']['wall_s'] / base['ingest']['wall_s']:.2f}x)"
        pub = f"{st['publish']['wall_s']:.2f} s ({st['publish']['wall_s'] / base['publish']['wall_s']:.2f}x)"
        if c is not None:
            ing += f"; {c['ingest_s']:.2f} s ({c['ingest_ratio']:.2f}x)"
            pub += f"; {c['publish_s']:.2f} s ({c['publish_ratio']:.2f}x)"
        rss = max([st["peak_rss_mb"]] + ([c["ingest_peak_rss_mb"], c["publish_peak_rss_mb"]]
                                         if c is not None else []))
        grow = [g for g in result.get("growth", []) if g["stored"] <= st["events"]]
        rss = max([rss] + [max(g["ingest_rss_mb"], g["publish_rss_mb"]) for g in grow])
        b = {L: rd[str(L)]["bytes_per_example"] for L in TENANT_LENS}
        io = {L: rd[str(L)].get("io_read_bytes_per_example") or 0 for L in TENANT_LENS}
        eps = rd["256"]["examples"] / max(rd["256"]["wall_s"], 1e-9)
        lines.append(
            f"| {st['events'] / 1e6:.1f}M | {ing} | {pub} | {rss / 1024:.2f} GiB "
            f"| {tot:.1f} / {tier:.1f} ({tot / tier:.2f}x) "
            f"| {b[256] / 1e3:.1f} / {b[2048] / 1e3:.1f} / {b[16384] / 1e3:.1f} KB "
            f"({b[256] / b[2048]:.2f}) | {io[256] / 1e3:.1f} / {io[2048] / 1e3:.1f} KB "
            f"| {eps:.0f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    if not steps:
        return
    x = [s["events"] / 1e6 for s in steps]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    ax[0].plot(x, [s["ingest"]["wall_s"] for s in steps], "o-", label="ingest 50K events (growth run)")
    ax[0].plot(x, [s["publish"]["wall_s"] for s in steps], "s-", label="publish one hour (growth run)")
    cmp = sorted(result.get("compare", {}).get("stores", []), key=lambda c: c["events"])
    if cmp:
        xc = [c["events"] / 1e6 for c in cmp]
        ax[0].plot(xc, [c["ingest_s"] for c in cmp], "o--", label="ingest, interleaved")
        ax[0].plot(xc, [c["publish_s"] for c in cmp], "s--", label="publish, interleaved")
    ax[0].set_ylabel("seconds")
    ax[0].legend(fontsize=7)
    ax[0].set_ylim(bottom=0)
    ax[1].plot(x, [s["peak_rss_mb"] for s in steps], "o-")
    ax[1].set_ylabel("peak RSS of any step (MiB)")
    ax[1].set_ylim(bottom=0)
    tables = sorted({t for s in steps for t, v in s["bytes_per_event"]["live"].items() if v > 0.5})
    for t in tables:
        ax[2].plot(x, [s["bytes_per_event"]["live"].get(t, 0) for s in steps], "o-", label=t)
    ax[2].set_ylabel("live bytes per stored event")
    ax[2].legend(fontsize=7)
    for L in TENANT_LENS:
        ax[3].plot(x, [s["read"][str(L)]["bytes_per_example"] for s in steps], "o-",
                   label=f"max_len {L}")
    ax[3].set_ylabel("tier bytes read per example")
    ax[3].set_yscale("log")
    ax[3].legend(fontsize=7)
    for a in ax:
        a.set_xlabel("events in the store (M)")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000_000,
                    help="largest store size (events); the bulk history spans --days at it")
    ap.add_argument("--steps", default="1000000,5000000,20000000,50000000,100000000",
                    help="store sizes to measure at (those above --events are skipped)")
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--days", type=float, default=180)
    ap.add_argument("--batch", type=int, default=50_000, help="events of the measured hour")
    ap.add_argument("--hours", type=int, default=3, help="measured hours per step (median)")
    ap.add_argument("--chunk", type=int, default=2_000_000, help="events per bulk file")
    ap.add_argument("--requests", type=int, default=2_000)
    ap.add_argument("--buckets", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retention-hours", type=int, default=0,
                    help="the store's retention: published events leave the raw log after it")
    ap.add_argument("--work", default="/tmp/lmat-scale")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    # Internal: one measured operation in a child process.
    ap.add_argument("--report", action="store_true",
                    help="print the README table of --out and redraw its plot")
    ap.add_argument("--keep-stores", action="store_true",
                    help="keep the store of every step (hard links) under --work for --compare")
    ap.add_argument("--compare", help="comma-separated store roots: measure their ingest and "
                    "publish interleaved (see compare()); adds 'compare' to --out")
    ap.add_argument("--op", choices=["ingest", "publish", "compact", "thin", "read"])
    ap.add_argument("--store")
    ap.add_argument("--file")
    ap.add_argument("--thin")
    ap.add_argument("--watermark", type=int)
    ap.add_argument("--max-len", type=int)
    args = ap.parse_args(argv)
    if args.op:
        print(json.dumps(_op(args), default=str))
        return 0
    if args.compare:
        compare(args)
        return 0
    if args.report:
        result = json.loads(Path(args.out).read_text())
        plot(result, Path(args.out).with_suffix(".png"))
        print(table(result))
        return 0
    if args.events < 1 or args.events > 200_000_000:
        ap.error(f"--events must be in 1..200000000, but got {args.events}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
