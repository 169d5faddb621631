"""The trained sequential model, an asset like any data product (its lineage reaches the events)."""

import os

import dagster as dg

import lmat_platform as lmat
from assets.resources import LmatResource
from assets.tenants import tenant_key


class TrainConfig(dg.Config):
    """A training run of the next-item model (``lmat_platform.train``) on the thin examples."""

    tenant: str = ""
    """Tenant whose sequences feed the model; empty picks the first tenant with item_id."""
    label_column: str = "candidate_item_id"
    """Request column holding the item to predict (an item id of the store)."""
    epochs: int = 1
    """Passes over the batch-path thin table."""
    max_steps: int = 0
    """Stop after this many steps (0: no limit)."""
    batch_size: int = 256
    """Requests per batch."""
    lr: float = 1e-3
    """Adam learning rate."""
    max_seq_len: int = 64
    """Most recent items the model attends to."""
    d_model: int = 32
    """Model width."""
    block: str = "sasrec"
    """sasrec or hstu blocks."""
    num_workers: int = 0
    """SequenceLoader worker processes."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu or cuda."""
    seed: int = 0
    """Seed of the model init and the loader's shuffle."""


def _pick_tenant(tenants: dict[str, lmat.Tenant], name: str) -> lmat.Tenant:
    if name:
        if name not in tenants:
            raise dg.Failure(f"unknown tenant '{name}' (tenants: {', '.join(tenants)})")
        return tenants[name]
    for t in tenants.values():
        if "item_id" in t.columns:
            return t
    raise dg.Failure("no tenant has an item_id column to train on")


def build_model_asset(tenants: dict[str, lmat.Tenant]) -> dg.AssetsDefinition:
    @dg.asset(
        name="sequence_model",
        deps=["thin_examples", *(tenant_key(n) for n in tenants)],
        group_name="training",
        kinds={"pytorch"},
        description="The next-item model (a SASRec-style causal transformer, full softmax over "
        "the store's items) over a tenant's item sequence, predicting each request's candidate "
        "item, trained through SequenceLoader; the saved model plus its metrics (loss per "
        "epoch, examples/s, share of step time waiting for data).",
    )
    def _model(
        context: dg.AssetExecutionContext, config: TrainConfig, lmat_store: LmatResource
    ) -> dg.MaterializeResult:
        from lmat_platform.models.sasrec import SASRecConfig
        from lmat_platform.train import TrainConfig as LoopConfig
        from lmat_platform.train import catalogue_size, train_next_item

        tenant = _pick_tenant(tenants, config.tenant)
        n_items = catalogue_size(lmat_store.store)
        res = train_next_item(
            lmat_store.store,
            lmat_store.thin_uri("examples"),
            tenant,
            n_items=n_items,
            out_dir=os.path.join(lmat_store.outputs, "models", tenant.name),
            model=SASRecConfig(n_items=n_items, max_len=min(config.max_seq_len, tenant.max_len),
                               d_model=config.d_model, block=config.block),  # type: ignore[arg-type]
            config=LoopConfig(
                epochs=config.epochs, max_steps=config.max_steps or None,
                batch_size=config.batch_size, lr=config.lr, num_workers=config.num_workers,
                device=config.device, seed=config.seed, label_column=config.label_column,
                patience=0,
            ),
            resume=False,
        )
        m = res.metrics
        context.log.info(
            f"{m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, "
            f"{m['examples_per_s']:.0f} examples/s, data wait {100 * m['data_wait_share']:.0f}%"
        )
        return dg.MaterializeResult(
            metadata={
                "tenant": tenant.name,
                "device": m["device"],
                "n_items": n_items,
                "steps": m["steps"],
                "examples": m["examples"],
                "first_loss": float(m["first_loss"]),
                "final_loss": float(m["final_loss"]),
                "examples_per_s": float(m["examples_per_s"]),
                "data_wait_share": float(m["data_wait_share"]),
                "parameters": m["parameters"],
                "model_path": dg.MetadataValue.path(res.model_path),
                "loss_curve": dg.MetadataValue.json(
                    [round(h["train_loss"], 4) for h in res.history]
                ),
            }
        )

    return _model
