"""The Ray engine against one process (issue 15, item 5): publish (and compact) a large snapshot.

One store is filled with ``--events`` events of one publish window (bulk files of ``--chunk``
events, ingested by the local engine). Each run publishes a fresh copy of it and compacts it,
either with the local engine (this process) or with the Ray engine on a cluster of ``--nodes``
nodes started on loopback (``ray start``, ``--cpus-per-node`` CPUs each;
:mod:`lmat_platform.engines.cluster`); ``--repeats`` runs of each side, alternated, medians
reported. Before the timed runs, both sides load their compiled kernels (and the Ray side starts
its workers on every node); that start-up is reported apart (``ray_warmup_s``). Every run's tier
and head summaries are compared with the first local run's (row counts, and every user's head
length and checksum), so the figures are of runs that wrote the same thing. Writes
``bench/results/ray_publish.json``. Run::

    .venv/bin/python -m bench.ray_publish --events 4000000 --repeats 3

The machine's cores are shared by the driver, every node and whatever else runs: on a 2-core
machine, 2 nodes of 1 CPU each have no core the single process does not also have, so the ratio
measures the engine's overhead and overlap there, not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
HOUR = 3_600_000_000


def _warm(_: int) -> str:
    """Load the kernels a publish uses (a task on each node, before timing)."""
    import socket

    from lmat_platform.store import heads

    heads.warm_kernels()
    return socket.gethostname()


def _summary(store: Any) -> dict[str, Any]:
    """What the comparison checks: tier rows, and each user's head at the latest snapshot."""
    from lmat_platform.store.core import delta_dataset

    tier = delta_dataset(store.open_table("uih"))
    heads = delta_dataset(store.open_table("heads")).to_table(
        columns=["user_id", "snapshot_id", "head_len", "head_checksum"])
    order = np.lexsort((heads.column("snapshot_id").to_numpy(), heads.column("user_id").to_numpy()))
    cols = {c: heads.column(c).to_numpy()[order] for c in ("user_id", "head_len", "head_checksum")}
    return {"tier_rows": tier.count_rows(), "heads_rows": heads.num_rows, **cols}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k]
               for k in a)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.scale import START, Workload
    from lmat_platform.engines import RayEngine
    from lmat_platform.engines.cluster import loopback_cluster
    from lmat_platform.store import compact_buckets, ingest_files, init_store, open_store
    from lmat_platform.store import heads as heads_mod
    from lmat_platform.store.snapshots import publish_snapshot

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wl = Workload(args.users, args.events / HOUR, seed=args.seed)
    t0 = time.perf_counter()
    files = []
    for i in range(0, args.events, args.chunk):
        n = min(args.chunk, args.events - i)
        f = work / f"events-{i // args.chunk:03d}.parquet"
        pq.write_table(wl.events(n, int(HOUR * n / args.events)), f)
        files.append(str(f))
    pristine = str(work / "pristine")
    init_store(pristine, n_buckets=args.buckets)
    ingest_files(pristine, files)
    prepared_s = time.perf_counter() - t0
    watermark = START + HOUR + 1
    heads_mod.warm_kernels()

    def once(side: str, r: int, engine: Any) -> dict[str, Any]:
        root = str(work / f"{side}-{r}")
        shutil.copytree(pristine, root)
        t = time.perf_counter()
        publish_snapshot(open_store(root), watermark, engine=engine)
        pub = time.perf_counter() - t
        t = time.perf_counter()
        compact_buckets(open_store(root), min_files=1, engine=engine)
        comp = time.perf_counter() - t
        summary = _summary(open_store(root))
        shutil.rmtree(root)
        return {"publish_s": round(pub, 2), "compact_s": round(comp, 2), "summary": summary,
                "load_average": round(os.getloadavg()[0], 1)}

    runs: dict[str, list[dict[str, Any]]] = {"local": [], "ray": []}
    with loopback_cluster(args.nodes, num_cpus=args.cpus_per_node) as cluster:
        engine = RayEngine(cluster.address)
        t = time.perf_counter()
        engine.map(_warm, list(range(2 * args.nodes * args.cpus_per_node)))
        warm = time.perf_counter() - t
        warm_nodes = len(engine.nodes)
        # Alternated (local first, then Ray first, ...) so that a change of the machine's load
        # falls on both sides.
        for r in range(args.repeats):
            for side in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
                runs[side].append(once(side, r, engine if side == "ray" else None))
        publish_nodes = len(engine.all_nodes)
    ref = runs["local"][0]["summary"]
    same = all(_same(ref, x["summary"]) for side in runs.values() for x in side)
    for side_runs in runs.values():
        for x in side_runs:
            del x["summary"]

    def med(side: str, key: str) -> float:
        return float(np.median([x[key] for x in runs[side]]))

    result = {
        "what": "publish (tier files + head summaries) and compaction of one snapshot: local "
                "engine (one process) vs Ray engine on a loopback cluster; warm (kernels "
                "loaded, Ray workers started; ray_warmup_s is that start-up); medians of "
                "alternated repeats, each on a fresh copy of the same store",
        "events": args.events, "users": args.users, "buckets": args.buckets,
        "nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "repeats": args.repeats,
        "machine_cores": os.cpu_count(),
        "prepare_s": round(prepared_s, 2),
        "local_publish_s": med("local", "publish_s"), "ray_publish_s": med("ray", "publish_s"),
        "publish_speedup": round(med("local", "publish_s") / med("ray", "publish_s"), 3),
        "local_compact_s": med("local", "compact_s"), "ray_compact_s": med("ray", "compact_s"),
        "compact_speedup": round(med("local", "compact_s") / med("ray", "compact_s"), 3),
        "runs": runs,
        "ray_warmup_s": round(warm, 2), "warmup_nodes": warm_nodes,
        "publish_nodes": publish_nodes, "same_tables": same,
        "command": f"python -m bench.ray_publish --events {args.events} --users {args.users} "
                   f"--buckets {args.buckets} --nodes {args.nodes} "
                   f"--cpus-per-node {args.cpus_per_node} --repeats {args.repeats}",
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ray_publish",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=4_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=1_000_000, help="events per ingested file")
    ap.add_argument("--buckets", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs of each side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/lmat-ray-publish")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ray_publish.json"))
    args = ap.parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["same_tables"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
