"""The summary tier's ``lmat`` subcommands (registered by :mod:`lmat_platform.cli`).

| command | does |
| --- | --- |
| ``lmat train-summarizer STORE THIN --model NAME`` | trains a VISTA summarizer on THIN's histories (through ``SequenceLoader``) and registers it |
| ``lmat summarize STORE --model NAME`` | computes the summaries of every published snapshot not yet summarized, in order, incrementally; ``--check`` recomputes them from scratch and compares |
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _positive(name: str) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, but got {v!r}")
        return n

    return parse


def cmd_train_summarizer(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.models.vista import VistaConfig, train_summarizer
    from lmat_platform.summaries.tier import register_summarizer
    from lmat_platform.tenants import Tenant

    cfg = VistaConfig(k=a.k, d=a.d, layers=a.layers, heads=a.heads, n_items=a.n_items)
    tenant = Tenant("vista_train", ("item_id", "action", "event_ts"), a.max_len)
    model, metrics = train_summarizer(a.store, a.thin, tenant, cfg=cfg, max_len=a.max_len,
                                      max_steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                      seed=a.seed)
    version = register_summarizer(a.store, a.model, model)
    return {"model": a.model, "version": version, **metrics}


def cmd_summarize(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.summaries.tier import (
        compute_pending,
        recompute_check,
        resolve_version,
        storage_report,
        summary_registry,
    )

    version = resolve_version(a.store, a.model, a.version)
    delay = None if a.publish_delay_minutes < 0 else a.publish_delay_minutes * 60_000_000
    done = compute_pending(a.store, version, model_name=a.model, publish_delay_us=delay)
    out: dict[str, Any] = {
        "model": a.model, "version": version,
        "computed": [{"snapshot_id": e.snapshot_id, "users": e.users, "events": e.events,
                      "published_at": e.published_at} for e in done],
        "snapshots": len(summary_registry(a.store, version)),
        "storage": storage_report(a.store, version),
    }
    if a.check:
        reps = [recompute_check(a.store, version, e.snapshot_id) for e in done]
        out["check"] = {"ok": all(r.ok for r in reps),
                        "max_state_rel_err": max((r.max_state_rel_err for r in reps), default=0.0),
                        "max_token_steps": max((r.max_token_steps for r in reps), default=0.0)}
        if not out["check"]["ok"]:
            from lmat_platform.exceptions import O2OConsistencyError

            raise O2OConsistencyError(f"summarize --check: incremental summaries differ from "
                                      f"the full recompute: {out['check']}")
    return out


def add_commands(sub: Any, progress: Callable[[str], None]) -> None:
    del progress
    s = sub.add_parser("train-summarizer", help="train and register a VISTA summarizer")
    s.add_argument("store")
    s.add_argument("thin", help="thin table whose requests' histories train it")
    s.add_argument("--model", required=True, help="name to register it under")
    s.add_argument("--k", type=_positive("--k"), default=8, help="summary tokens")
    s.add_argument("--d", type=_positive("--d"), default=32, help="token width")
    s.add_argument("--layers", type=_positive("--layers"), default=2)
    s.add_argument("--heads", type=_positive("--heads"), default=2)
    s.add_argument("--n-items", type=_positive("--n-items"), default=4096,
                   help="item embedding rows (ids hashed)")
    s.add_argument("--max-len", type=_positive("--max-len"), default=256)
    s.add_argument("--steps", type=_positive("--steps"), default=200)
    s.add_argument("--batch-size", type=_positive("--batch-size"), default=64)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_train_summarizer)

    s = sub.add_parser("summarize", help="compute the summary tier of every new snapshot")
    s.add_argument("store")
    s.add_argument("--model", required=True, help="registered summarizer name")
    s.add_argument("--version", default=None, help="a registered version (default: newest)")
    s.add_argument("--publish-delay-minutes", type=int, default=-1,
                   help="Q = P + this; -1 (default): the wall clock when computed")
    s.add_argument("--check", action="store_true",
                   help="recompute what was computed from scratch and compare")
    s.set_defaults(func=cmd_summarize)
