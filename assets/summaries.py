"""VISTA summaries (spec section 10): the summarizer, and the summary tier one day at a time.

    thin_examples, uih_tier --> vista_summarizer (trained through SequenceLoader, registered)
    uih_snapshot, vista_summarizer --> vista_summaries [daily]: the day's snapshots' summaries,
                                       computed incrementally from the previous snapshot's state
    checks: summary_recompute (incremental == from scratch, blocking),
            summary_point_in_time (serving the day's requests: nothing published after its
            request, checksums equal the heads', blocking)
"""

import time

import dagster as dg
import numpy as np

import lmat_platform as lmat
from assets.checks import _day_rows
from assets.partitions import DAILY, day_range_us
from assets.resources import LmatResource

#: Users per snapshot whose summaries the recompute check folds from scratch.
RECOMPUTE_SAMPLE_USERS = 64
#: Requests of the day served by the point-in-time check.
SERVE_SAMPLE_REQUESTS = 256


class SummarizerConfig(dg.Config):
    """How the VISTA summarizer is trained (``lmat_platform.models.vista``)."""

    model: str = "vista"
    """Name it is registered under (tenants declare ``summary: {model: NAME}``)."""
    k: int = 8
    """Summary tokens."""
    d: int = 32
    """Token width."""
    layers: int = 2
    """Linear-attention layers."""
    max_len: int = 256
    """Most recent events of each history a training step reads."""
    batch_size: int = 64
    """Requests per step."""
    max_steps: int = 40
    """Training steps (0: one full epoch)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the init, the loader's shuffle and the cuts."""


class SummariesConfig(dg.Config):
    """Which summarizer's summaries to compute."""

    model: str = "vista"
    """The registered summarizer's name; its newest version is computed."""
    publish_delay_minutes: int = 60
    """Summary publish time Q = the snapshot's publish time P + this delay (the refresh
    schedule, also when a day is backfilled); -1: the wall clock when computed (live)."""


def _training_tenant(max_len: int) -> lmat.Tenant:
    return lmat.Tenant("vista_train", ("item_id", "action", "event_ts"), max_len)


@dg.asset(
    deps=["thin_examples", "uih_tier"],
    group_name="summaries",
    kinds={"pytorch"},
    description="The VISTA summarizer: learnable seed tokens over a causal quasi-linear attention "
    "stack, trained with the generative reconstruction loss on the histories SequenceLoader "
    "rebuilds for the batch-path examples, then registered in the store under its version "
    "(a hash of its weights).",
)
def vista_summarizer(
    context: dg.AssetExecutionContext, config: SummarizerConfig, lmat_store: LmatResource
) -> dg.MaterializeResult:
    from lmat_platform.models.vista import VistaConfig, train_summarizer
    from lmat_platform.summaries import register_summarizer

    store = lmat_store.open()
    cfg = VistaConfig(k=config.k, d=config.d, layers=config.layers)
    model, metrics = train_summarizer(
        store, lmat_store.thin_uri("examples"), _training_tenant(config.max_len), cfg=cfg,
        batch_size=config.batch_size, lr=config.lr, max_len=config.max_len,
        max_steps=config.max_steps or None, seed=config.seed,
    )
    version = register_summarizer(store, config.model, model)
    context.log.info(f"summarizer {config.model} version {version}: {metrics}")
    return dg.MaterializeResult(metadata={
        "model": config.model, "version": version, "k": config.k, "d": config.d,
        **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    })


def _day_snapshots(store: lmat.store.Store, partition_key: str) -> list[lmat.store.SnapshotInfo]:
    """Snapshots whose watermark falls in the day (what its ``uih_snapshot`` published)."""
    lo, hi = day_range_us(partition_key)
    return [s for s in lmat.list_snapshots(store) if lo < s.watermark <= hi]


@dg.asset(
    partitions_def=DAILY,
    deps=["uih_snapshot", vista_summarizer],
    group_name="summaries",
    kinds={"delta"},
    description="The summary tier for the day's snapshots: for each user a snapshot touched, K "
    "int8 summary tokens (one scale per token) of their whole head, with the head length and "
    "checksum they summarize and the publish time Q >= P; computed from the previous "
    "snapshot's stored state and the new events only (earlier snapshots still missing are "
    "computed first, in order).",
)
def vista_summaries(
    context: dg.AssetExecutionContext, config: SummariesConfig, lmat_store: LmatResource
) -> dg.MaterializeResult:
    from lmat_platform.summaries import (
        compute_pending,
        resolve_version,
        storage_report,
        summarizer_versions,
    )

    store = lmat_store.open()
    if not summarizer_versions(store, config.model):
        return dg.MaterializeResult(metadata={
            "model": config.model,
            "status": f"no summarizer '{config.model}' registered yet (materialize "
                      "vista_summarizer, in train_job); later days compute every snapshot missed",
        })
    version = resolve_version(store, config.model)
    day = _day_snapshots(store, context.partition_key)
    t0 = time.perf_counter()
    # The day's snapshots and every earlier one missed, in order.
    entries = compute_pending(
        store, version, model_name=config.model,
        publish_delay_us=(None if config.publish_delay_minutes < 0
                          else config.publish_delay_minutes * 60_000_000),
        through=max((s.snapshot_id for s in day), default=-1))
    computed = [{"snapshot_id": e.snapshot_id, "users": e.users, "events": e.events,
                 "published_at": e.published_at} for e in entries]
    secs = time.perf_counter() - t0
    rep = storage_report(store, version)
    return dg.MaterializeResult(metadata={
        "model": config.model,
        "version": version,
        "snapshots": [s.snapshot_id for s in day],
        "computed": dg.MetadataValue.json(computed),
        "seconds": secs,
        "summary_bytes_per_user_snapshot": rep.get("summaries_bytes_per_row", 0.0),
        "state_bytes_per_user_snapshot": rep.get("summary_state_bytes_per_row", 0.0),
        "snapshots_kept": int(rep["snapshots_kept"]),
    })


def _model_of(context: dg.AssetCheckExecutionContext) -> str:
    return SummariesConfig().model


@dg.asset_check(
    asset=vista_summaries, blocking=True,
    description="A sample of the day's summaries recomputed from scratch (each user's whole "
    "head folded from a zero state) agrees with the incremental ones: states within a relative "
    "1e-6, tokens within one int8 step, checksums equal to the heads'.",
)
def summary_recompute(
    context: dg.AssetCheckExecutionContext, lmat_store: LmatResource
) -> dg.AssetCheckResult:
    from lmat_platform.summaries import recompute_check, resolve_version, summarizer_versions

    store = lmat_store.open()
    if not summarizer_versions(store, _model_of(context)):
        return dg.AssetCheckResult(passed=True, metadata={"status": "no summarizer registered"})
    version = resolve_version(store, _model_of(context))
    reps = [recompute_check(store, version, s.snapshot_id, max_users=RECOMPUTE_SAMPLE_USERS)
            for s in _day_snapshots(store, context.partition_key)]
    ok = all(r.ok for r in reps)
    return dg.AssetCheckResult(
        passed=ok, severity=dg.AssetCheckSeverity.ERROR,
        description=None if ok else f"incremental summaries differ from scratch: {reps}"[:1000],
        metadata={
            "users": sum(r.users for r in reps),
            "max_state_rel_err": max((r.max_state_rel_err for r in reps), default=0.0),
            "max_token_steps": max((r.max_token_steps for r in reps), default=0.0),
            "checksum_mismatches": sum(r.checksum_mismatches for r in reps),
        },
    )


@dg.asset_check(
    asset=vista_summaries, blocking=True,
    description="The day's batch-path requests served point in time: no summary served that "
    "was published after its request, and every served summary's checksum equals the head "
    "checksum of (user, snapshot) in the tier.",
)
def summary_point_in_time(
    context: dg.AssetCheckExecutionContext, lmat_store: LmatResource
) -> dg.AssetCheckResult:
    from lmat_platform.summaries import SummaryServer, check_served, summarizer_versions

    store = lmat_store.open()
    model = _model_of(context)
    if not summarizer_versions(store, model):
        return dg.AssetCheckResult(passed=True, metadata={"status": "no summarizer registered"})
    req = _day_rows(store, lmat_store.thin_uri("examples"), context.partition_key,
                    ["user_id", "request_ts"]).slice(0, SERVE_SAMPLE_REQUESTS)
    tenant = lmat.Tenant("vista_check", ("item_id",), 64,
                         summary=lmat.tenants.SummarySpec(model, 16))
    server = SummaryServer(store, tenant)
    users = req.column("user_id").to_numpy()
    ts = req.column("request_ts").to_numpy()
    served = server.serve(users, ts)
    rep = check_served(store, server.version, users, ts, served)
    return dg.AssetCheckResult(
        passed=rep.ok, severity=dg.AssetCheckSeverity.ERROR,
        description=None if rep.ok else "; ".join(rep.problems)[:1000],
        metadata={
            "requests": rep.checked, "with_summary": int(np.sum(served.mask)),
            "served_after_request": rep.future, "checksum_mismatches": rep.checksum_mismatches,
        },
    )


SUMMARY_CHECKS = [summary_recompute, summary_point_in_time]
