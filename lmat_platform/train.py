"""The training loop: a next-item model trained through :class:`~lmat_platform.reader.SequenceLoader`.

Every example is a thin row (batch path): the loader rebuilds the request's history H(u, T)
through the tenant's projection, and the model (:class:`~lmat_platform.models.sasrec.SASRec`)
predicts the request's label item with cross-entropy over the whole catalogue.

* **Evaluation** (:mod:`~lmat_platform.models.evaluate`) after every epoch on the validation
  requests, full ranking, HR@K / NDCG@K with and without seen-item filtering; early stopping on
  validation NDCG@10 with ``patience`` epochs; the test requests are scored once, by the best
  model. Evaluation reads each request's whole visible history (:func:`whole_history`) once
  per run (:func:`eval_batches`): the model sees its last ``max_len`` items, the seen-item
  filter all of them.
* **Checkpoints**: model, optimizer, RNG state, the loader's ``state_dict()`` (where the pass
  stands) and the run's history are written together, atomically, every ``checkpoint_every``
  steps and after every epoch. A run started again on the same ``out_dir`` resumes from the
  checkpoint and continues the interrupted pass at the next unseen batch; on CPU its result
  equals an uninterrupted run's.
* **Outputs** under ``out_dir``: ``model.pt`` (config + state dict of the best model),
  ``metrics.json`` (per-epoch history, best validation, test, throughput, the share of step
  time spent waiting for data), ``training.png`` (loss and validation curves), ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from lmat_platform.datasets.pipeline import WINDOW_TARGETS, PreparedDataset
from lmat_platform.models.evaluate import RankingAccumulator, most_popular_scores, seen_mask
from lmat_platform.models.sasrec import SASRec, SASRecConfig, load_sasrec, right_align
from lmat_platform.tenants import Tenant

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"
WHOLE_HISTORY = 1_000_000
"""``max_len`` of a tenant that keeps a request's whole visible history."""
ARRIVAL_PAD = -(2**62)
"""Arrival time of padding (below every real one)."""
DEFAULT_STRIDE_DIVISOR = 5
"""``train_on_dataset``'s default training stride with the ``all`` loss is ``max_len`` divided
by this (10 at ``max_len`` 50: each target sees 40 to 50 earlier items where the user has them)."""
EVAL_CELLS = 512 * 50 * 50
"""Default :attr:`TrainConfig.eval_cells`: 512 requests at ``max_len`` 50 in one pass (about
5 MB of attention weights per head and layer; 20 MB with the mask, scores and softmax copies)."""


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train_next_item` trains."""

    epochs: int = 200
    """Most passes over the training requests."""
    batch_size: int = 256
    """Requests per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    patience: int = 10
    """Stop after this many epochs without a better validation NDCG@10 (0: never stop early)."""
    max_steps: int | None = None
    budget_s: float | None = None
    """Start no epoch after this many seconds (wall time of this process, so a resumed run gets
    the budget again; 0 tests a checkpoint's best epoch at once); the best epoch so far is
    tested (None: no limit)."""
    """Stop after this many steps in all (None: no limit)."""
    checkpoint_every: int = 100
    """Steps between checkpoints inside an epoch (a checkpoint also ends every epoch)."""
    num_workers: int = 0
    """SequenceLoader worker processes."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu or cuda."""
    seed: int = 0
    """Seed of the model's init, dropout and the loader's shuffle."""
    eval_batch_size: int = 512
    """Requests per evaluation batch read (each request's whole visible history)."""
    eval_cells: int = EVAL_CELLS
    """Most attention cells (requests x width squared, width = the chunk's longest history cut
    to the model's ``max_len``) one evaluation forward pass may hold: a batch is scored in
    chunks of ``max(1, eval_cells // width**2)`` requests, so a long model gets small chunks and
    evaluation memory stays about the same at every length. Metrics do not depend on it."""
    item_column: str = "item_id"
    """Tenant column holding item indices 1..n_items."""
    label_column: str = "label"
    """Request column holding the target item index."""
    k: int = 10
    """Cut-off of HR@K and NDCG@K (early stopping uses NDCG@K)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    loss: str = "all"
    """``all``: every position of a request's sequence predicts the next item (the newest
    predicts the label); ``last``: only the label (see :meth:`SASRec.loss`). Batches whose
    thin rows carry ``window_targets`` (:func:`~lmat_platform.datasets.pipeline.strided_requests`)
    train only that many of each window's newest targets."""
    time_column: str | None = None
    """Tenant column of the items' arrival times: with ``all``, each item is predicted from its
    own H(u, T) inside the window (same-second items invisible to each other; see
    :meth:`SASRec.loss`). None: from the item just before it."""
    lr_decay: float = 1.0
    """Multiply the learning rate by this after every ``lr_decay_patience`` epochs in a row
    without a better validation NDCG@K (1.0: constant learning rate)."""
    lr_decay_patience: int = 3
    """Epochs without a better validation NDCG@K between learning-rate decays."""


@dataclass
class TrainResult:
    """What a training run produced."""

    metrics: dict[str, Any]
    model_path: str
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def whole_history(tenant: Tenant) -> Tenant:
    """``tenant`` without its length limit (what evaluation and the seen-item filter read)."""
    return replace(tenant, name=f"{tenant.name}-whole", max_len=WHOLE_HISTORY)


def evaluate_batches(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[Any],
    *,
    n_items: int,
    item_column: str = "item_id",
    label_column: str = "label",
    ks: tuple[int, ...] = (10,),
    device: torch.device | None = None,
    max_len: int | None = None,
    cells: int | None = None,
) -> dict[str, float]:
    """HR@K / NDCG@K (and ``_filtered``) of ``score(items, lengths) -> [B, n_items + 1]`` over
    reader batches; the seen items are each batch's whole sequence.

    With ``cells``, a batch is scored in chunks of requests small enough that requests x
    width\ :sup:`2` stays within ``cells`` (width: the batch's longest sequence, cut to
    ``max_len`` when given; at least one request a chunk), which bounds an attention model's
    memory; the metrics are the same for every ``cells``."""
    acc = RankingAccumulator(ks=ks)
    with torch.no_grad():
        for batch in batches:
            b = batch.to(device) if device is not None else batch
            items, lengths = b.values[item_column], b.lengths
            labels = b.context[label_column]
            for lo, hi, vlo, vhi in _chunks(lengths, max_len=max_len, cells=cells):
                its, lens = items[vlo:vhi], lengths[lo:hi]
                acc.update(score(its, lens), labels[lo:hi],
                           seen=seen_mask(its, lens, n_items + 1))
    return acc.result()


def _chunks(lengths: torch.Tensor, *, max_len: int | None, cells: int | None
            ) -> list[tuple[int, int, int, int]]:
    """``(first, end)`` request and ``(first, end)`` value offsets of each chunk of a jagged
    batch with ``lengths`` (see :func:`evaluate_batches`)."""
    b = len(lengths)
    if b == 0:
        return []
    rows = b
    if cells is not None:
        width = int(lengths.max())
        if max_len is not None:
            width = min(width, max_len)
        rows = max(1, cells // max(1, width) ** 2)
    ends = torch.cumsum(lengths.to(torch.int64), 0).tolist()
    return [(lo, min(lo + rows, b), ends[lo - 1] if lo else 0, ends[min(lo + rows, b) - 1])
            for lo in range(0, b, rows)]


def _loader(store: str, thin: str, tenant: Tenant, *, batch_size: int, shuffle: bool,
            seed: int, num_workers: int) -> Any:
    from lmat_platform.reader import SequenceLoader

    return SequenceLoader(store, thin, tenant=tenant, batch_size=batch_size, shuffle=shuffle,
                          seed=seed, num_workers=num_workers)


def eval_batches(
    store: str, thin: str, tenant: Tenant, *, config: TrainConfig = TrainConfig()
) -> list[Any]:
    """The requests of ``thin`` as reader batches holding each request's whole visible history,
    read once: every evaluation of the same requests (each epoch's, the baseline's) reuses them."""
    return list(_loader(store, thin, whole_history(tenant), batch_size=config.eval_batch_size,
                        shuffle=False, seed=0, num_workers=0))


def evaluate_model(
    net: SASRec,
    batches: Iterable[Any],
    *,
    config: TrainConfig = TrainConfig(),
    device: torch.device | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of ``net`` on ``batches`` (from :func:`eval_batches`)."""
    was = net.training
    net.eval()
    try:
        return evaluate_batches(
            lambda items, lengths: net.scores(net.tokens(items, lengths)), batches,
            n_items=net.cfg.n_items, item_column=config.item_column,
            label_column=config.label_column, ks=(config.k,), device=device,
            max_len=net.cfg.max_len, cells=config.eval_cells,
        )
    finally:
        net.train(was)


def evaluate_popular(
    counts: torch.Tensor,
    batches: Iterable[Any],
    *,
    config: TrainConfig = TrainConfig(),
) -> dict[str, float]:
    """The most-popular baseline (``counts`` [n_items + 1], see ``most_popular_scores``) on
    ``batches`` (from :func:`eval_batches`)."""
    return evaluate_batches(
        lambda items, lengths: counts.expand(len(lengths), -1), batches,
        n_items=len(counts) - 1, item_column=config.item_column,
        label_column=config.label_column, ks=(config.k,),
    )


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_next_item(
    store: str,
    thin_train: str,
    tenant: Tenant,
    *,
    n_items: int,
    out_dir: str,
    model: SASRecConfig | None = None,
    config: TrainConfig = TrainConfig(),
    valid_thin: str | None = None,
    test_thin: str | None = None,
    popular_items: np.ndarray | None = None,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
    dataset: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a next-item model on ``thin_train``'s requests read through ``SequenceLoader``.

    ``tenant`` decides what the training batches hold (its ``max_len`` is the history length
    the model is trained on); ``model.max_len`` defaults to it. With ``valid_thin``, every epoch
    is evaluated and training stops early; the best epoch's model is kept. ``popular_items`` (the
    training ratings' item indices) adds the most-popular baseline to the metrics. ``on_step(step)`` is called
    after every optimizer step (after any checkpoint of that step). ``dataset`` (what the data
    is) goes into the metrics as is.
    """
    for c in (config.item_column, config.time_column):
        if c is not None and c not in tenant.columns:
            raise ValueError(
                f"tenant '{tenant.name}' has no column '{c}' (columns: {list(tenant.columns)})"
            )
    cfg = model or SASRecConfig(n_items=n_items, max_len=min(tenant.max_len, 200))
    if cfg.n_items != n_items:
        raise ValueError(f"model.n_items {cfg.n_items} differs from n_items {n_items}")
    os.makedirs(out_dir, exist_ok=True)
    dev = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    net = SASRec(cfg).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = _loader(store, thin_train, tenant, batch_size=config.batch_size, shuffle=True,
                     seed=config.seed, num_workers=config.num_workers)

    ck_path = os.path.join(out_dir, CHECKPOINT_FILE)
    st: dict[str, Any] = {
        "epoch": 0, "step": 0, "history": [], "best": None, "bad_epochs": 0,
        "epoch_loss": 0.0, "epoch_examples": 0, "epoch_batches": 0,
        "wait_s": 0.0, "step_s": 0.0, "examples": 0, "stopped": None,
    }
    best_state: dict[str, torch.Tensor] | None = None
    evals: dict[str, list[Any]] = {}  # each evaluation set's batches, read at first use

    def eval_set(thin: str) -> list[Any]:
        if thin not in evals:
            evals[thin] = eval_batches(store, thin, tenant, config=config)
        return evals[thin]

    mid_pass = False  # resuming inside a pass: the loader continues it
    # The loader's saved state, kept until this process iterates the loader: a fresh loader's
    # state_dict() is "epoch 0, nothing read", so a process that stops before its first pass
    # (a budget already spent) must save what it resumed from, or the next one replays epoch 0.
    saved_loader: dict[str, Any] | None = None
    if resume and os.path.exists(ck_path):
        ck = torch.load(ck_path, map_location=dev, weights_only=False)
        # A checkpoint saved before a model field existed (e.g. ``repeat``) had its default;
        # one with a field this code does not know was saved for another model.
        saved = ck["model_config"]
        if set(saved) - set(cfg.as_dict()) or type(cfg)(**saved).as_dict() != cfg.as_dict():
            raise ValueError(
                f"{ck_path}: saved for model {ck['model_config']}, not {cfg.as_dict()}; "
                "use another out_dir or resume=False"
            )
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        st = ck["state"]
        if st["stopped"] == "budget":  # run again: continue with a new budget
            st["stopped"] = None
        best_state = ck["best_state"]
        if not ck["loader"]["complete"]:
            loader.load_state_dict(ck["loader"])
            mid_pass = True
        saved_loader = ck["loader"]
        log.info("resumed %s at epoch %d step %d", ck_path, st["epoch"], st["step"])

    def checkpoint() -> None:
        _atomic_save({
            "model": net.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "loader": loader.state_dict() if saved_loader is None else saved_loader,
            "state": st, "best_state": best_state,
            "model_config": cfg.as_dict(), "train_config": asdict(config),
        }, ck_path)

    t_start = time.perf_counter()
    net.train()
    while st["stopped"] is None and st["epoch"] < config.epochs:
        if config.budget_s is not None and time.perf_counter() - t_start >= config.budget_s:
            st["stopped"] = "budget"  # a pass cut off inside is dropped; the best is kept
            break
        if not mid_pass:
            loader.set_epoch(st["epoch"])
        mid_pass = False
        it = iter(loader)
        saved_loader = None
        while True:
            if config.max_steps is not None and st["step"] >= config.max_steps:
                st["stopped"] = "max_steps"
                break
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            batch = batch.to(dev)
            t1 = time.perf_counter()
            tokens = net.tokens(batch.values[config.item_column], batch.lengths)
            arrivals = None
            if config.time_column is not None:
                arrivals = right_align(batch.values[config.time_column], batch.lengths,
                                       max_len=cfg.max_len, fill=ARRIVAL_PAD)
            loss, n_targets = net.loss(tokens, batch.context[config.label_column],
                                       positions=config.loss, arrivals=arrivals,
                                       window_targets=batch.context.get(WINDOW_TARGETS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.item())  # syncs the device, so step timing is honest
            t2 = time.perf_counter()
            st["wait_s"] += t1 - t0
            st["step_s"] += t2 - t0
            st["step"] += 1
            n = len(batch.lengths)
            st["examples"] += n
            st["epoch_examples"] += n
            st["epoch_loss"] += value * n_targets
            st["targets"] = st.get("targets", 0) + n_targets
            st["epoch_targets"] = st.get("epoch_targets", 0) + n_targets
            st["epoch_batches"] += 1
            if st["step"] % config.checkpoint_every == 0:
                checkpoint()
            if on_step is not None:
                on_step(st["step"])
        if st["stopped"] is not None:
            break
        row: dict[str, Any] = {
            "epoch": st["epoch"],
            "train_loss": st["epoch_loss"] / max(st.get("epoch_targets", 0), 1),
            "examples": st["epoch_examples"],
            "targets": st.get("epoch_targets", 0),
            "step": st["step"],
        }
        if valid_thin is not None:
            row["valid"] = evaluate_model(net, eval_set(valid_thin), config=config, device=dev)
            key = f"ndcg@{config.k}"
            if st["best"] is None or row["valid"][key] > st["best"]["valid"][key]:
                st["best"], st["bad_epochs"] = row, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                st["bad_epochs"] += 1
                if config.lr_decay != 1.0 and st["bad_epochs"] % config.lr_decay_patience == 0:
                    for group in opt.param_groups:
                        group["lr"] *= config.lr_decay
                    row["lr"] = opt.param_groups[0]["lr"]
            log.info("epoch %d: loss %.4f, valid HR@%d %.4f NDCG@%d %.4f", st["epoch"],
                     row["train_loss"], config.k, row["valid"][f"hr@{config.k}"], config.k,
                     row["valid"][key])
        else:
            log.info("epoch %d: loss %.4f", st["epoch"], row["train_loss"])
        st["history"].append(row)
        st["epoch"] += 1
        st["epoch_loss"], st["epoch_examples"], st["epoch_batches"] = 0.0, 0, 0
        st["epoch_targets"] = 0
        if config.patience and st["bad_epochs"] >= config.patience:
            st["stopped"] = "early_stopping"
        checkpoint()
    if st["stopped"] is None:
        st["stopped"] = "epochs"
    checkpoint()

    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    model_path = os.path.join(out_dir, MODEL_FILE)
    _atomic_save({"state_dict": net.state_dict(), "config": cfg.as_dict(),
                  "tenant": tenant.as_dict()}, model_path)
    metrics: dict[str, Any] = {
        "tenant": tenant.as_dict(),
        "model": cfg.as_dict(),
        "train": asdict(config),
        "device": str(dev),
        "epochs_run": len(st["history"]),
        "steps": st["step"],
        "examples": st["examples"],
        "stopped": st["stopped"],
        "examples_per_s": st["examples"] / st["step_s"] if st["step_s"] else 0.0,
        "targets": st.get("targets", 0),
        "targets_per_s": st.get("targets", 0) / st["step_s"] if st["step_s"] else 0.0,
        "data_wait_share": st["wait_s"] / st["step_s"] if st["step_s"] else 0.0,
        "step_s": st["step_s"],
        "wall_s_this_process": time.perf_counter() - t_start,
        "parameters": sum(p.numel() for p in net.parameters()),
        "first_loss": st["history"][0]["train_loss"] if st["history"] else math.nan,
        "final_loss": st["history"][-1]["train_loss"] if st["history"] else math.nan,
        "history": st["history"],
    }
    if st["best"] is not None:
        metrics["best_epoch"] = st["best"]["epoch"]
        metrics["valid"] = st["best"]["valid"]
    if test_thin is not None:
        metrics["test"] = evaluate_model(net, eval_set(test_thin), config=config, device=dev)
    if popular_items is not None:
        pop = most_popular_scores(popular_items, n_items + 1)
        metrics["most_popular"] = {
            name: evaluate_popular(pop, eval_set(thin), config=config)
            for name, thin in (("valid", valid_thin), ("test", test_thin)) if thin is not None
        }
    if dataset is not None:
        metrics["dataset"] = dataset
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    plot_history(metrics, os.path.join(out_dir, PLOT_FILE))
    log.info("trained %s: %d epochs, %d steps, %.0f examples/s, data wait %.1f%%%s",
             tenant.name, metrics["epochs_run"], st["step"], metrics["examples_per_s"],
             100 * metrics["data_wait_share"],
             f", test {metrics['test']}" if "test" in metrics else "")
    return TrainResult(metrics, model_path, st["history"])


def plot_history(metrics: dict[str, Any], path: str) -> None:
    """Training loss and validation HR/NDCG per epoch, with the most-popular baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics.get("history", [])
    k = metrics["train"]["k"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ep = [h["epoch"] for h in hist]
    a1.plot(ep, [h["train_loss"] for h in hist], marker=".")
    a1.set_xlabel("epoch")
    a1.set_ylabel("train cross-entropy")
    if hist and "valid" in hist[0]:
        for m in (f"hr@{k}", f"ndcg@{k}"):
            a2.plot(ep, [h["valid"][m] for h in hist], marker=".", label=f"valid {m}")
        pop = metrics.get("most_popular", {}).get("valid")
        if pop:
            for m, ls in ((f"hr@{k}", ":"), (f"ndcg@{k}", "--")):
                a2.axhline(pop[m], color="grey", ls=ls, label=f"most popular {m}")
        a2.legend(fontsize=7)
    a2.set_xlabel("epoch")
    a2.set_title(f"{metrics['model']['block']}, max_len {metrics['model']['max_len']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_model(path: str, *, map_location: str = "cpu") -> SASRec:
    """A model saved by :func:`train_next_item`."""
    return load_sasrec(path, map_location=map_location)


def train_on_dataset(
    prep: PreparedDataset,
    out_dir: str,
    *,
    max_len: int = 50,
    model: SASRecConfig | None = None,
    config: TrainConfig = TrainConfig(),
    stride: int | None = None,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train and evaluate on a data set from :func:`~lmat_platform.datasets.prepare_dataset`.

    The tenant reads ``item_id`` (and ``config.time_column``) with ``max_len``
    (``WHOLE_HISTORY`` or anything at least the longest history: the whole history); the
    most-popular baseline counts the training ratings' items. ``stride`` picks the training
    windows (each user's last request and about every stride-th before it,
    :func:`~lmat_platform.datasets.pipeline.strided_requests`); the default is every request
    for the ``last`` loss and ``max(1, max_len // 5)`` for ``all`` (``DEFAULT_STRIDE_DIVISOR``:
    stride 10 at ``max_len`` 50, chosen over ``max_len // 2`` on ML-100K's validation NDCG@10
    over 4 seeds, docs/real_data.md). With ``all`` each window
    trains its newest ``window_targets`` positions (the ratings since the previous window), so
    every training rating is a target once an epoch at every ``max_len``, predicted from at
    least ``max_len - stride`` earlier items where the user has them (see docs/real_data.md,
    "Loss").
    """
    import pyarrow.parquet as pq

    from lmat_platform.datasets.pipeline import training_thin
    from lmat_platform.datasets.ratings import requests_file

    cols = (config.item_column,) + ((config.time_column,) if config.time_column else ())
    tenant = Tenant("next_item", cols, max_len)
    model_len = min(max_len, prep.max_history)
    if stride is None:
        stride = 1 if config.loss == "last" else max(1, model_len // DEFAULT_STRIDE_DIVISOR)
    cfg = model or SASRecConfig(n_items=prep.n_items, max_len=model_len)
    train_items = pq.read_table(os.path.join(prep.import_dir, requests_file("train")),
                                columns=["label"])["label"].to_numpy()
    return train_next_item(
        prep.store, training_thin(prep, stride), tenant, n_items=prep.n_items, out_dir=out_dir,
        model=cfg, config=config, valid_thin=prep.thin["valid"], test_thin=prep.thin["test"],
        popular_items=train_items, resume=resume, on_step=on_step,
        dataset={"source": prep.source, "root": prep.root,
                 "tie_order": prep.imported.get("tie_order"), "ratings": prep.ratings,
                 "users": prep.users, "train_stride": stride, "items": prep.n_items},
    )


def catalogue_size(store: str, column: str = "item_id") -> int:
    """The largest item index stored in ``column`` (tier and raw log): the ``n_items`` a model
    over a store's own item ids needs."""
    import pyarrow.compute as pc

    from lmat_platform.store.core import as_store, delta_dataset

    st = as_store(store)
    top = 0
    for name in ("uih", "raw"):
        dt = st.open_table(name)
        if dt is None:
            continue
        col = delta_dataset(dt).to_table(columns=[column]).column(column)
        if len(col):
            top = max(top, int(pc.max(col).as_py()))
    return top


def evaluate_saved(prep: PreparedDataset, run_dir: str, *, config: TrainConfig = TrainConfig()
                   ) -> dict[str, dict[str, float]]:
    """Test metrics of the model saved in ``run_dir`` and of the most-popular baseline."""
    import pyarrow.parquet as pq

    from lmat_platform.datasets.ratings import requests_file

    path = os.path.join(run_dir, MODEL_FILE)
    net = load_model(path)
    t = torch.load(path, map_location="cpu", weights_only=True)["tenant"]
    tenant = Tenant(t["name"], tuple(t["columns"]), int(t["max_len"]))
    train_items = pq.read_table(os.path.join(prep.import_dir, requests_file("train")),
                                columns=["label"])["label"].to_numpy()
    pop = most_popular_scores(train_items, prep.n_items + 1)
    test = eval_batches(prep.store, prep.thin["test"], tenant, config=config)
    return {
        "test": evaluate_model(net, test, config=config),
        "most_popular": evaluate_popular(pop, test, config=config),
    }
