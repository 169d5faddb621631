"""The trained sequential model, an asset like any data product (its lineage reaches the events)."""

import os

import dagster as dg

import lmat_platform as lmat
from assets.resources import LmatResource
from assets.tenants import tenant_key


class TrainConfig(dg.Config):
    """A training run of the causal sequence model (``lmat_platform.train``)."""

    tenant: str = ""
    """Tenant whose sequences feed the model; empty picks the first tenant with item_id."""
    epochs: int = 1
    """Passes over the batch-path thin table."""
    max_steps: int = 0
    """Stop after this many steps (0: no limit)."""
    batch_size: int = 256
    """Requests per batch."""
    lr: float = 3e-3
    """AdamW learning rate."""
    max_seq_len: int = 64
    """Most recent items the model attends to."""
    d_model: int = 32
    """Model width."""
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
        description="A small causal transformer over a tenant's item sequence predicting the "
        "request's label, trained through SequenceLoader; the saved model plus its metrics "
        "(loss, examples/s, share of step time waiting for data).",
    )
    def _model(
        context: dg.AssetExecutionContext, config: TrainConfig, lmat_store: LmatResource
    ) -> dg.MaterializeResult:
        from lmat_platform.train import ModelConfig, train_model

        tenant = _pick_tenant(tenants, config.tenant)
        res = train_model(
            lmat_store.store,
            lmat_store.thin_uri("examples"),
            tenant,
            out_dir=os.path.join(lmat_store.outputs, "models", tenant.name),
            model=ModelConfig(max_seq_len=config.max_seq_len, d_model=config.d_model),
            epochs=config.epochs,
            max_steps=config.max_steps or None,
            batch_size=config.batch_size,
            lr=config.lr,
            num_workers=config.num_workers,
            device=config.device,
            seed=config.seed,
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
                "steps": m["steps"],
                "examples": m["examples"],
                "first_loss": float(m["first_loss"]),
                "final_loss": float(m["final_loss"]),
                "examples_per_s": float(m["examples_per_s"]),
                "data_wait_share": float(m["data_wait_share"]),
                "parameters": m["parameters"],
                "model_path": dg.MetadataValue.path(res.model_path or ""),
                "loss_curve": dg.MetadataValue.json([round(x, 4) for x in res.losses[:200]]),
            }
        )

    return _model
