"""VISTA cost: downstream time per example as histories grow, and summary refresh time.

Run: ``.venv/bin/python -m bench.vista_cost [--max-len 1000000] [--k 32 --d 64]``

One real store, one user per history length (1K, 10K, 100K, 1M events by default), all in
snapshot 0, then snapshots with new events. It measures, with ``torch`` on one thread:

1. **Downstream time per example** for each history length: VISTA (serve the request's summary
   and tail from the store point in time, then target attention from C candidates to the K
   summary tokens + N tail events), against full target attention (the same candidates
   attending, softmax, to the whole history's item embeddings, i.e. what a model without
   summaries reads and computes; the history's read is not counted, only its compute).
   VISTA times are per example: a batch of ``--batch`` requests of the user served and scored,
   divided by the batch. Every length is timed in the same ``--repeat`` rounds, in alternating
   order, after one warm-up call each, and the medians are reported, as the process's CPU time
   (every thread) and as wall time: on a machine shared with other jobs the wall clock of a
   sub-millisecond call mostly measures when the scheduler ran it, the CPU time what it cost.
   The process's caches (table listings, Parquet footers, OS page cache) are warm: a
   steady-state cost within a pass. The user's first serve (cold for its row groups; the server built and
   earlier users served before it) is reported apart as ``vista_first_serve_ms``.
2. **Summary refresh time per snapshot** for snapshots adding 1K, 10K and 100K new events to
   the longest history (incremental: previous state + new events), against a full recompute
   of the same users' summaries from scratch (once, after the 100K one); then ``--contrast``
   (10K) new events to a separate user with a history as short as the shortest (not served
   in 1.): the same new events as the second snapshot, extending a history 1,000x shorter.

Before serving, ``vacuum(retention_hours=0)`` retires the published events from the raw log
(one stored copy, spec section 3), as a store past its retention holds them.

Results go to ``bench/results/vista_cost.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import lmat_platform as lmat
from lmat_platform.hashing import bucket_of
from lmat_platform.models.vista import (
    RankerConfig,
    Summarizer,
    TargetAttentionRanker,
    VistaConfig,
)
from lmat_platform.summaries import (
    SummaryServer,
    compute_summaries,
    recompute_check,
    register_summarizer,
    storage_report,
)
from lmat_platform.summaries.serving import ServedSummaries
from lmat_platform.summaries.tier import _tier_rows
from lmat_platform.tenants import SummarySpec, Tenant

log = logging.getLogger(__name__)

T0 = 1_700_000_000_000_000
US = 1_000_000


def _events(user: int, n: int, start_id: int, t_lo: int, t_hi: int, rng: np.random.Generator
            ) -> pa.Table:
    ts = np.sort(rng.integers(t_lo, t_hi, n))
    return pa.table({
        "user_id": pa.array(np.full(n, user, np.int64)),
        "event_id": pa.array(np.arange(start_id, start_id + n, dtype=np.int64)),
        "event_ts": pa.array(ts),
        "arrival_ts": pa.array(ts + 1),
        "item_id": pa.array(rng.integers(1, 50_000, n)),
        "action": pa.array(rng.integers(0, 4, n).astype(np.int16)),
    })


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeat`` calls after a warm-up call."""
    return _alternated([fn], repeat)[0]


def _alternated(fns: list[Callable[[], object]], rounds: int) -> list[tuple[float, float]]:
    """Median (wall, CPU) seconds of each of ``fns``, measured in ``rounds`` rounds that call
    every one once, in alternating order (forwards, then backwards), after a warm-up call of
    each. CPU is the process's CPU time (every thread: torch's and Arrow's I/O pool), which a
    machine shared with other jobs does not inflate the way it inflates the wall clock (a call
    descheduled midway waits for the other jobs); the alternation puts a burst of load on every
    one alike, and the median drops the rounds it hit."""
    for f in fns:
        f()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t, c = time.perf_counter(), time.process_time()
            fns[i]()
            cpu[i].append(time.process_time() - c)
            wall[i].append(time.perf_counter() - t)
    return [(float(np.median(w)), float(np.median(c))) for w, c in zip(wall, cpu, strict=True)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1000,10000,100000,1000000")
    ap.add_argument("--k", type=int, default=16, help="summary tokens")
    ap.add_argument("--d", type=int, default=32, help="token width")
    ap.add_argument("--tail", type=int, default=32, help="tail events served")
    ap.add_argument("--candidates", type=int, default=64, help="candidates scored per example")
    ap.add_argument("--new", default="1000,10000,100000", help="new events per refresh "
                    "(each to the longest history)")
    ap.add_argument("--contrast", type=int, default=10_000, help="then this many new events "
                    "to the shortest history (0: none): same new events, a 1000x shorter history")
    ap.add_argument("--repeat", type=int, default=31,
                    help="alternated rounds of the downstream timings (medians)")
    ap.add_argument("--batch", type=int, default=32,
                    help="requests per timed VISTA batch (time per example = batch time / batch)")
    ap.add_argument("--full-repeat", type=int, default=3,
                    help="timings of full attention per length (medians; 1 at 1M events)")
    ap.add_argument("--out", default="bench/results/vista_cost.json")
    ap.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    lengths = [int(x) for x in a.lengths.split(",")]
    news = [int(x) for x in a.new.split(",") if x]
    root = Path(a.root or tempfile.mkdtemp(prefix="vista-cost-"))
    rng = np.random.default_rng(0)
    store = lmat.init_store(str(root / "store"), n_buckets=4)
    day = 86_400 * US
    parts, eid = [], 0
    for i, n in enumerate(lengths):
        parts.append(_events(i + 1, n, eid, T0, T0 + 300 * day, rng))
        eid += n
    # The contrast refresh's user: a history as short as the shortest, not served below.
    contrast_user = len(lengths) + 1
    if a.contrast:
        parts.append(_events(contrast_user, lengths[0], eid, T0, T0 + 300 * day, rng))
        eid += lengths[0]
    pq.write_table(pa.concat_tables(parts), str(root / "e0.parquet"))
    t = time.perf_counter()
    lmat.ingest_files(store, [str(root / "e0.parquet")])
    lmat.publish_snapshot(store, T0 + 301 * day)
    log.info("ingested and published %d events in %.1fs", eid, time.perf_counter() - t)
    torch.manual_seed(0)
    cfg = VistaConfig(n_items=50_000, d=a.d, k=a.k, heads=2, layers=2)
    model = Summarizer(cfg).eval()
    version = register_summarizer(store, "vista", model)
    t = time.perf_counter()
    compute_summaries(store, version, 0, published_at=T0 + 301 * day, summarizer=model)
    first_s = time.perf_counter() - t
    out: dict = {"config": {"k": a.k, "d": a.d, "tail": a.tail, "candidates": a.candidates,
                            "lengths": lengths, "threads": 1, "rounds": a.repeat,
                            "batch": a.batch, "full_repeat": a.full_repeat},
                 "first_summaries_s": first_s, "events": eid}
    # ---- refresh: snapshots adding new events to every user
    refresh = []
    tw = T0 + 301 * day
    plan = [(len(lengths), n) for n in news]
    if a.contrast and news:
        plan.append((contrast_user, a.contrast))
    for k, (user, n) in enumerate(plan, start=1):
        # New events go to the longest history, then (contrast) to the shortest: the refresh
        # must cost the new events, not the history they extend.
        start_len = lengths[user - 1] if user <= len(lengths) else lengths[0]
        hist_before = start_len + sum(m for uu, m in plan[:k - 1] if uu == user)
        parts = [_events(user, n, eid, tw, tw + day, rng)]
        eid += n
        tw += day
        f = root / f"e{k}.parquet"
        pq.write_table(pa.concat_tables(parts), str(f))
        lmat.ingest_files(store, [str(f)])
        lmat.publish_snapshot(store, tw + 1)
        t, c = time.perf_counter(), time.process_time()
        compute_summaries(store, version, k, published_at=tw + 1, summarizer=model)
        inc, inc_cpu = time.perf_counter() - t, time.process_time() - c
        row = {"snapshot": k, "user": user, "new_events": n, "incremental_s": inc,
               "incremental_cpu_s": inc_cpu, "user_history_before": hist_before,
               "history_events": eid}
        if k == len(news):  # one full recompute: its cost is the whole history's
            t, c = time.perf_counter(), time.process_time()
            rep = recompute_check(store, version, k)
            row.update({"recompute_from_scratch_s": time.perf_counter() - t,
                        "recompute_from_scratch_cpu_s": time.process_time() - c,
                        "recompute_ok": rep.ok, "max_state_rel_err": rep.max_state_rel_err,
                        "max_token_steps": rep.max_token_steps})
        refresh.append(row)
        log.info("refresh %s", refresh[-1])
    out["refresh"] = refresh
    log.info("first summaries (whole histories) %.1fs", first_s)
    # ---- one stored copy (spec section 3): the raw log keeps only what no snapshot holds, as a
    # store past its retention does; otherwise the raw log would hold every history whole.
    lmat.vacuum(store, retention_hours=0)
    # ---- tails not yet in a snapshot, then requests after every summary
    parts = [_events(i + 1, a.tail // 2, eid + i * a.tail, tw, tw + 3600 * US, rng)
             for i in range(len(lengths))]
    eid += a.tail * len(lengths)
    pq.write_table(pa.concat_tables(parts), str(root / "tail.parquet"))
    lmat.ingest_files(store, [str(root / "tail.parquet")])
    req_ts = tw + 2 * 3600 * US
    tenant = Tenant("vista", ("item_id",), a.tail, summary=SummarySpec("vista", a.tail))
    server = SummaryServer(store, tenant)
    ranker = TargetAttentionRanker(RankerConfig(n_items=50_000, d=a.d, summary_d=a.d,
                                                tail_len=a.tail)).eval()
    items = torch.nn.Embedding(50_000, a.d)
    cand = torch.randint(1, 50_000, (1, a.candidates))
    B = a.batch
    down = []
    model_fns: list[Callable[[], object]] = []
    serve_fns: list[Callable[[], object]] = []
    full_fns: list[Callable[[], object]] = []
    for i in range(len(lengths)):
        u = np.full(B, i + 1)
        ts = np.full(B, req_ts)
        t = time.perf_counter()
        got = server.serve(u[:1], ts[:1])
        # The user's first serve (its row groups not read yet in this process); the timings
        # below are medians after a warm-up, with the process's caches warm.
        first_serve = time.perf_counter() - t
        assert got.mask[0], "every user has a summary"
        got = server.serve(u, ts)

        def vista_step(got: ServedSummaries = got) -> torch.Tensor:
            lens = torch.from_numpy(got.tail_lengths)
            tail = torch.zeros(len(lens), a.tail, dtype=torch.int64)
            tm = torch.arange(a.tail)[None] >= a.tail - lens[:, None]
            tail[tm] = torch.from_numpy(got.tail_values["item_id"].astype(np.int64))
            with torch.no_grad():
                return ranker(torch.from_numpy(got.summary), torch.from_numpy(got.mask), tail,
                              tm, cand.expand(len(lens), -1))

        def serve_and_step(u: np.ndarray = u, ts: np.ndarray = ts) -> torch.Tensor:
            return vista_step(server.serve(u, ts))

        # Full target attention over the whole history (its item ids read once, outside).
        hist = _tier_rows(store, int(bucket_of(u[:1], store.n_buckets)[0]), u[:1], lo=0,
                          hi=2**31 - 1, columns=["item_id"]).column("item_id").to_numpy()
        hist_t = torch.from_numpy(np.ascontiguousarray(hist % 50_000))

        def full_step(hist_t: torch.Tensor = hist_t) -> torch.Tensor:
            with torch.no_grad():
                q = items(cand[0])  # [C, d]
                out = torch.zeros(a.candidates, a.d)
                # Chunked softmax over L keys (memory bounded, same arithmetic).
                m = torch.full((a.candidates, 1), float("-inf"))
                den = torch.zeros(a.candidates, 1)
                for s in range(0, len(hist_t), 65_536):
                    kv = items(hist_t[s:s + 65_536])
                    lg = q @ kv.T / a.d ** 0.5
                    mn = torch.maximum(m, lg.max(dim=1, keepdim=True).values)
                    w = torch.exp(lg - mn)
                    scale = torch.exp(m - mn)
                    out = out * scale + w @ kv
                    den = den * scale + w.sum(dim=1, keepdim=True)
                    m = mn
                return (out / den * q).sum(-1)

        model_fns.append(vista_step)
        serve_fns.append(serve_and_step)
        full_fns.append(full_step)
        down.append({"history_events": int(len(hist)), "vista_first_serve_ms": 1e3 * first_serve,
                     "tail_served": int(got.tail_lengths[0])})
    # Every length's VISTA timings in the same rounds, alternated (medians, per example).
    model_s = _alternated(model_fns, a.repeat)
    serve_s = _alternated(serve_fns, a.repeat)
    for i, n in enumerate(lengths):
        rep = max(1, a.full_repeat if n < 1_000_000 else 1)
        full_wall, full_cpu = _time(full_fns[i], rep)
        down[i].update({
            "vista_model_cpu_ms": 1e3 * model_s[i][1] / B,
            "vista_serve_and_model_cpu_ms": 1e3 * serve_s[i][1] / B,
            "full_attention_cpu_ms": 1e3 * full_cpu,
            "vista_model_ms": 1e3 * model_s[i][0] / B,
            "vista_serve_and_model_ms": 1e3 * serve_s[i][0] / B,
            "full_attention_model_ms": 1e3 * full_wall,
        })
        log.info("downstream %s", down[i])
    out["downstream"] = down
    base = down[0]
    keys = ("vista_model_cpu_ms", "vista_serve_and_model_cpu_ms", "full_attention_cpu_ms",
            "vista_model_ms", "vista_serve_and_model_ms", "full_attention_model_ms")
    out["downstream_ratio_max_over_1k"] = {k: max(d[k] for d in down) / base[k] for k in keys}
    out["downstream_ratio_max_over_min"] = {
        k: max(d[k] for d in down) / min(d[k] for d in down) for k in keys if "full" not in k}
    out["storage"] = storage_report(store, version)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(_table(out))
    return out


def _table(out: dict[str, Any]) -> str:
    lines = ["| history events | VISTA model CPU ms | VISTA serve+model CPU ms | full attention "
             "CPU ms | VISTA model wall ms | VISTA serve+model wall ms | full attention wall ms "
             "| first serve wall ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in out["downstream"]:
        lines.append(f"| {d['history_events']:,} | {d['vista_model_cpu_ms']:.3f} | "
                     f"{d['vista_serve_and_model_cpu_ms']:.3f} | {d['full_attention_cpu_ms']:.1f} | "
                     f"{d['vista_model_ms']:.3f} | {d['vista_serve_and_model_ms']:.3f} | "
                     f"{d['full_attention_model_ms']:.1f} | {d['vista_first_serve_ms']:.1f} |")
    lines += ["", "| snapshot | new events | user's history before | incremental s (CPU s) "
              "| from scratch s (CPU s) |", "|---:|---:|---:|---:|---:|"]
    for r in out["refresh"]:
        full = r.get("recompute_from_scratch_s")
        fc = r.get("recompute_from_scratch_cpu_s")
        lines.append(f"| {r['snapshot']} | {r['new_events']:,} | "
                     f"{r.get('user_history_before', 0):,} | "
                     f"{r['incremental_s']:.2f} ({r['incremental_cpu_s']:.2f}) | "
                     f"{'' if full is None else f'{full:.2f} ({fc:.2f})'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
