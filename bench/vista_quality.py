"""VISTA on MovieLens-100K: K summary tokens + a short tail, against SASRec on the whole
history, SASRec on the last K + tail events (the same downstream cost), and the same ranker
without summaries (the tail alone: the ablation).

Run: ``.venv/bin/python -m bench.vista_quality [--snapshots 64 --k 8 --tail 8 ...]``

Everything goes through the platform. The data set is prepared by
:func:`lmat_platform.datasets.prepare_dataset` (ratings as events, leave-one-out next-item
requests, ``--snapshots`` snapshots published as their watermarks pass, batch-path thin rows);
then:

1. the summarizer is trained with the reconstruction loss on the histories ``SequenceLoader``
   rebuilds for (strided) training requests only (H(u, T) of a training request holds no
   validation or test rating), until its epoch loss stops falling (``--summarizer-patience``)
   or ``--summarizer-epochs``; its weights can be saved and loaded
   (``--summarizer-weights``), so runs with other snapshot counts share one summarizer. It is
   registered and the summary tier computed snapshot by snapshot (``Q_k = P_k``: a summary is
   published the moment its snapshot is), so a request's summary covers only events that
   arrived before its snapshot's watermark, before the request (point in time);
2. the downstream ranker (:class:`~lmat_platform.models.vista.TargetAttentionRanker`) reads, for
   every request, what a summary tenant's ``SequenceLoader`` batches carry: the point-in-time
   summary (``Q_S <= T``) and the last ``--tail`` events after ``W_S``; it is trained with full
   softmax over the catalogue, early-stopped on validation NDCG@10, and scored on the test
   requests (full ranking, HR@10 / NDCG@10, unfiltered and with seen items removed: the seen
   items are the request's whole history, read by a second loader). The ablation trains the
   same ranker on the same requests with every summary masked out;
3. the SASRec baselines are :func:`lmat_platform.train.train_on_dataset` (the real-data
   training loop, early-stopped on validation NDCG@10) with ``max_len = K + tail`` and
   ``max_len`` = the longest history.

Results: ``bench/results/vista_quality.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from lmat_platform.models.evaluate import RankingAccumulator, seen_mask
from lmat_platform.models.vista import (
    RankerConfig,
    TargetAttentionRanker,
    VistaConfig,
    train_summarizer,
)
from lmat_platform.tenants import SummarySpec, Tenant

log = logging.getLogger(__name__)


def collect(store: str, thin: str, tenant: Tenant, *, seen: bool, batch_size: int = 512
            ) -> dict[str, Any]:
    """One pass of a summary tenant's loader over ``thin``: summaries, tails (right-aligned,
    newest last), labels, and (``seen``) each request's whole history for the filter."""
    from lmat_platform.reader import SequenceLoader
    from lmat_platform.train import whole_history

    n_tail = tenant.summary.tail_len if tenant.summary else 0
    loader = SequenceLoader(store, thin, tenant=tenant, batch_size=batch_size)
    hist = (iter(SequenceLoader(store, thin, tenant=whole_history(replace(tenant, summary=None)),
                                batch_size=batch_size)) if seen else None)
    out: dict[str, list[Any]] = {k: [] for k in ("summary", "mask", "tail", "tail_mask",
                                                 "label", "seen", "snapshot", "head_len")}
    for b in loader:
        lens = b.lengths
        tail = b.padded("item_id", max_len=n_tail, side="left")
        tm = torch.arange(n_tail)[None] >= (n_tail - torch.clamp(lens, max=n_tail))[:, None]
        out["summary"].append(b.summary)
        out["mask"].append(b.summary_mask)
        out["tail"].append(tail)
        out["tail_mask"].append(tm)
        out["label"].append(b.context["label"].to(torch.int64))
        out["snapshot"].append(b.summary_pointer["snapshot_id"])
        out["head_len"].append(b.summary_pointer["head_len"])
        if hist is not None:
            h = next(hist)
            if not torch.equal(h.request_id, b.request_id):
                raise RuntimeError("the two loaders disagree on request order")
            out["seen"].append((h.values["item_id"], h.lengths))
    res: dict[str, Any] = {k: torch.cat(v) for k, v in out.items() if v and k != "seen"}
    res["seen"] = out["seen"]
    return res


def without_summaries(d: dict[str, Any]) -> dict[str, Any]:
    """The same requests with no summary (the ablation: the tail alone)."""
    return {**d, "summary": torch.zeros_like(d["summary"]),
            "mask": torch.zeros_like(d["mask"])}


def _scores(net: TargetAttentionRanker, d: dict[str, Any], idx: torch.Tensor,
            cands: torch.Tensor) -> torch.Tensor:
    return net(d["summary"][idx], d["mask"][idx], d["tail"][idx], d["tail_mask"][idx], cands)


def evaluate(net: TargetAttentionRanker, d: dict[str, Any], n_items: int, bs: int = 256
             ) -> dict[str, float]:
    acc = RankingAccumulator(ks=(10,))
    cands = torch.arange(n_items + 1)
    net.eval()
    with torch.no_grad():
        pos = 0
        for items, lens in d["seen"]:
            b = len(lens)
            idx = torch.arange(pos, pos + b)
            s = torch.cat([_scores(net, d, idx[i:i + bs], cands) for i in range(0, b, bs)])
            s[:, 0] = float("-inf")
            acc.update(s, d["label"][idx], seen=seen_mask(items, lens, n_items + 1))
            pos += b
    net.train()
    return acc.result()


def train_ranker(train: dict[str, Any], valid: dict[str, Any], test: dict[str, Any], *,
                 n_items: int, d: int, tail: int, epochs: int, patience: int, lr: float,
                 batch_size: int, seed: int, budget_s: float | None = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = TargetAttentionRanker(RankerConfig(n_items=n_items + 1, d=d,
                                             summary_d=train["summary"].shape[-1],
                                             tail_len=tail))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    cands = torch.arange(n_items + 1)
    n = len(train["label"])
    g = torch.Generator().manual_seed(seed)
    best, best_state, bad, hist = -1.0, None, 0, []
    stopped_by_budget = False
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            s = _scores(net, train, idx, cands)
            s[:, 0] = float("-inf")
            loss = F.cross_entropy(s, train["label"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        v = evaluate(net, valid, n_items)
        hist.append({"epoch": ep, "loss": tot / n, **{f"valid_{k}": x for k, x in v.items()}})
        log.info("ranker epoch %d: %s", ep, hist[-1])
        if v["ndcg@10"] > best:
            best, bad = v["ndcg@10"], 0
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        else:
            bad += 1
            if patience and bad >= patience:
                break
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            log.info("ranker: time budget spent after epoch %d", ep)
            stopped_by_budget = True
            break
    train_s = time.perf_counter() - t0
    if best_state is not None:
        net.load_state_dict(best_state)
    return {"test": evaluate(net, test, n_items), "best_valid_ndcg@10": best,
            "epochs": len(hist), "train_s": train_s, "history": hist,
            "stopped_by_time_budget": stopped_by_budget, "lr": lr}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="work folder (default: DATA_DIR/vista-ml-100k)")
    ap.add_argument("--snapshots", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--tail", type=int, default=8)
    ap.add_argument("--ranker-d", type=int, default=64,
                    help="width of the downstream ranker (SASRec's d_model is 64)")
    ap.add_argument("--summarizer-epochs", type=int, default=12,
                    help="most passes over the summarizer's training histories")
    ap.add_argument("--summarizer-patience", type=int, default=2,
                    help="stop once this many epochs in a row lowered the loss by < 0.5%%")
    ap.add_argument("--summarizer-steps", type=int, default=0, help="step limit (0: none)")
    ap.add_argument("--summarizer-batch", type=int, default=32)
    ap.add_argument("--summarizer-len", type=int, default=1024,
                    help="most recent events of a history a summarizer training step reads")
    ap.add_argument("--summarizer-stride", type=int, default=32,
                    help="summarizer training histories: each user's last training request "
                    "and every stride-th before it")
    ap.add_argument("--summarizer-lr", type=float, default=3e-3)
    ap.add_argument("--cuts", type=int, default=4, help="reconstruction cuts per history a step")
    ap.add_argument("--summarizer-weights", default=None,
                    help="file of the summarizer's weights: loaded if it exists, else written "
                    "after training (one summarizer for runs with other snapshot counts)")
    ap.add_argument("--summarizer-only", action="store_true",
                    help="train (or load) the summarizer, save its weights, and stop")
    ap.add_argument("--sasrec-full-len", type=int, default=0,
                    help="max_len of the whole-history SASRec (0: the longest history)")
    ap.add_argument("--stride", type=int, default=4,
                    help="ranker training requests: each user's last and every stride-th")
    ap.add_argument("--sasrec-batch", type=int, default=256)
    ap.add_argument("--sasrec-full-batch", type=int, default=64,
                    help="batch of the whole-history SASRec (its windows each train ~100 "
                    "targets: smaller batches give it steps)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--budget-min", type=float, default=0,
                    help="stop a ranker after the epoch that passes this many minutes (0: none)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sasrec", action="store_true")
    ap.add_argument("--skip-vista", action="store_true")
    ap.add_argument("--variants", default="vista,vista_tail_only",
                    help="rankers to train: vista (summaries + tail), vista_tail_only (ablation)")
    ap.add_argument("--reuse-summarizer", action="store_true",
                    help="use the newest summarizer already registered in the prepared store")
    ap.add_argument("--out", default="bench/results/vista_quality.json")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="print one table of the results in these files (runs nothing)")
    a = ap.parse_args(argv)
    if a.table:
        merged: dict[str, Any] = {}
        for path in a.table:
            with open(path) as f:
                got = json.load(f)
            merged.update({k: v for k, v in got.items() if k not in merged or v})
        print(_table(merged))
        return merged
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    from lmat_platform.datasets.fetch import data_dir
    from lmat_platform.datasets.pipeline import prepare_dataset, training_thin
    from lmat_platform.summaries import compute_pending, register_summarizer, storage_report
    from lmat_platform.train import TrainConfig, train_on_dataset

    root = a.root or os.path.join(data_dir(), f"vista-ml-100k-s{a.snapshots}")
    t0 = time.perf_counter()
    prep = prepare_dataset("ml-100k", os.path.join(root, "data"), n_snapshots=a.snapshots)
    out: dict[str, Any] = {"config": vars(a), "dataset": {
        "users": prep.users, "items": prep.n_items, "ratings": prep.ratings,
        "snapshots": prep.snapshots, "max_history": prep.max_history}}
    log.info("prepared %s in %.0fs", prep.root, time.perf_counter() - t0)
    thin_train = training_thin(prep, a.stride)
    if not a.skip_vista or a.summarizer_only:
        # 1. summarizer (trained on the training requests' histories only: H(u, T) of a
        # training request holds no validation or test rating) and the summary tier
        hist_tenant = Tenant("vista_hist", ("item_id", "action", "event_ts"), a.summarizer_len)
        cfg = VistaConfig(n_items=prep.n_items + 1, n_actions=8, d=a.d, k=a.k, heads=2, layers=2,
                          window=16)
        from lmat_platform.models.vista import Summarizer
        from lmat_platform.summaries import summarizer_versions

        have = summarizer_versions(prep.store, "vista")
        model = None
        if a.reuse_summarizer and have:
            version = have[-1]
            out["summarizer"] = {"version": version, "reused": True}
        elif a.summarizer_weights and os.path.exists(a.summarizer_weights):
            with open(a.summarizer_weights, "rb") as fb:
                model = Summarizer.from_bytes(fb.read())
            meta_path = a.summarizer_weights + ".json"
            meta = {}
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    meta = json.load(f)
            out["summarizer"] = {**meta, "loaded_from": a.summarizer_weights}
        else:
            def keep(mdl: Any, m: dict[str, Any]) -> None:
                # Each epoch's weights, so a run stopped for time keeps its last epoch.
                if a.summarizer_weights:
                    with open(a.summarizer_weights + ".epoch", "wb") as f:
                        f.write(mdl.to_bytes())
                    save({**m, "stride": a.summarizer_stride, "cuts": a.cuts,
                          "max_len": a.summarizer_len, "batch": a.summarizer_batch},
                         a.summarizer_weights + ".epoch.json")

            model, m = train_summarizer(
                prep.store, training_thin(prep, a.summarizer_stride), hist_tenant, cfg=cfg,
                batch_size=a.summarizer_batch, lr=a.summarizer_lr, max_len=a.summarizer_len,
                epochs=a.summarizer_epochs, max_steps=a.summarizer_steps or None,
                patience=a.summarizer_patience, cuts=a.cuts, warmup_steps=50, on_epoch=keep)
            out["summarizer"] = {**m, "stride": a.summarizer_stride, "cuts": a.cuts,
                                 "max_len": a.summarizer_len, "batch": a.summarizer_batch}
            if a.summarizer_weights:
                with open(a.summarizer_weights, "wb") as fw:
                    fw.write(model.to_bytes())
                save(out["summarizer"], a.summarizer_weights + ".json")
        if model is not None:
            version = register_summarizer(prep.store, "vista", model)
            out["summarizer"]["version"] = version
        log.info("summarizer: %s", out["summarizer"])
        save(out, a.out)
    if a.summarizer_only:
        return out
    if not a.skip_vista:
        t = time.perf_counter()
        compute_pending(prep.store, version, model_name="vista", publish_delay_us=0)
        out["summary_tier"] = {"compute_s": time.perf_counter() - t,
                               **storage_report(prep.store, version)}
        log.info("summary tier: %s", out["summary_tier"])
        save(out, a.out)
        # 2. the downstream ranker on what the loader serves
        tenant = Tenant("vista_rank", ("item_id",), a.tail, summary=SummarySpec("vista", a.tail))
        t = time.perf_counter()
        tr = collect(prep.store, thin_train, tenant, seen=False)
        va = collect(prep.store, prep.thin["valid"], tenant, seen=True)
        te = collect(prep.store, prep.thin["test"], tenant, seen=True)
        out["served"] = {
            "seconds": time.perf_counter() - t, "train_requests": len(tr["label"]),
            "train_with_summary": float(tr["mask"].float().mean()),
            "test_with_summary": float(te["mask"].float().mean()),
            "test_mean_tail": float(te["tail_mask"].sum(1).float().mean()),
            "test_mean_summary_head_len": float(te["head_len"][te["mask"]].float().mean()),
        }
        log.info("served: %s", out["served"])
        for name in a.variants.split(","):
            use_summary = {"vista": True, "vista_tail_only": False}[name]
            sets = [d if use_summary else without_summaries(d) for d in (tr, va, te)]
            res = train_ranker(*sets, n_items=prep.n_items, d=a.ranker_d, tail=a.tail,
                               epochs=a.epochs, patience=a.patience, lr=a.lr, batch_size=256,
                               seed=0, budget_s=a.budget_min * 60 or None)
            out[name] = res
            log.info("%s test: %s", name, res["test"])
            save(out, a.out)
    # 3. SASRec baselines through the real-data training loop
    if not a.skip_sasrec:
        full = a.sasrec_full_len or prep.max_history
        for name, max_len, bs in (("sasrec_k_plus_tail", a.k + a.tail, a.sasrec_batch),
                                  ("sasrec_full", full, a.sasrec_full_batch)):
            tc = TrainConfig(epochs=a.epochs, patience=a.patience, device="cpu",
                             threads=a.threads, batch_size=bs)
            t = time.perf_counter()
            # stride max_len/2: the windows its recorded results (vista_quality_sasrec.json)
            # were trained with, before lmat train's default became max_len/5
            r = train_on_dataset(prep, os.path.join(root, name), max_len=max_len, config=tc,
                                 stride=max(1, max_len // 2), resume=False)
            out[name] = {"max_len": max_len, "batch_size": bs, "epochs": len(r.history),
                         "test": r.metrics.get("test"),
                         "best_valid": r.metrics.get("valid"),
                         "most_popular": r.metrics.get("most_popular"),
                         "train_s": time.perf_counter() - t}
            log.info("%s: %s", name, out[name])
            save(out, a.out)
    save(out, a.out)
    print(_table(out))
    return out


def save(out: dict[str, Any], path: str) -> None:
    """Written after every stage, so a long run interrupted keeps what it measured."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)


def _table(out: dict[str, Any]) -> str:
    rows = ["| model | reads | epochs | HR@10 | NDCG@10 | HR@10 filtered | NDCG@10 filtered |",
            "|---|---|---:|---:|---:|---:|---:|"]
    c = out["config"]
    for name, reads in (("vista", f"{c['k']} summary tokens + last {c['tail']} events"),
                        ("vista_tail_only", f"last {c['tail']} events after the summary's "
                                            "snapshot (no summary)"),
                        ("sasrec_full", f"last {out.get('sasrec_full', {}).get('max_len')} "
                                        "events (whole history)"),
                        ("sasrec_k_plus_tail", f"last {c['k'] + c['tail']} events")):
        if name == "sasrec_full" and "sasrec_full" in out:
            reads = f"last {out['sasrec_full'].get('max_len')} events (whole history)"
        r = out.get(name)
        if not r or not r.get("test"):
            continue
        t = r["test"]
        rows.append(f"| {name} | {reads} | {r.get('epochs', '')} | "
                    f"{t.get('hr@10', float('nan')):.4f} | "
                    f"{t.get('ndcg@10', float('nan')):.4f} | "
                    f"{t.get('hr@10_filtered', float('nan')):.4f} | "
                    f"{t.get('ndcg@10_filtered', float('nan')):.4f} |")
    mp = (out.get("sasrec_k_plus_tail") or {}).get("most_popular", {}).get("test")
    if mp:
        rows.append(f"| most popular | nothing | 0 | {mp['hr@10']:.4f} | {mp['ndcg@10']:.4f} | "
                    f"{mp['hr@10_filtered']:.4f} | {mp['ndcg@10_filtered']:.4f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
