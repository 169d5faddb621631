"""Landed files (external assets) and their ingest into the raw log and quarantine."""

import os
from collections.abc import Iterator

import dagster as dg
import pyarrow.dataset as pads

import lmat_platform as lmat
from assets.partitions import DAILY
from assets.resources import LmatResource

landing_events = dg.AssetSpec(
    "landing_events",
    partitions_def=DAILY,
    group_name="landing",
    kinds={"parquet"},
    description="Event files dropped in LANDING/events/DATE*.parquet (spec section 2); "
    "written by producers outside Dagster.",
)
landing_requests = dg.AssetSpec(
    "landing_requests",
    partitions_def=DAILY,
    group_name="landing",
    kinds={"parquet"},
    description="Request files (impressions to score) in LANDING/requests/DATE*.parquet.",
)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "raw_events",
            deps=[landing_events],
            group_name="ingest",
            kinds={"delta"},
            description="The raw event log: every accepted event of the day's landed files "
            "(nulls, event_ts > arrival_ts, rows behind the watermark and duplicates removed).",
        ),
        dg.AssetSpec(
            "quarantined_events",
            deps=[landing_events],
            group_name="ingest",
            kinds={"delta"},
            description="Rows of the day's landed files that ingest rejected, with their reason.",
        ),
    ],
    partitions_def=DAILY,
)
def ingest_events(
    context: dg.AssetExecutionContext, lmat_store: LmatResource
) -> Iterator[dg.MaterializeResult]:
    """``lmat ingest`` of the partition's landed event files (idempotent per file)."""
    files = lmat_store.landed("events", context.partition_key)
    if not files:
        raise dg.Failure(
            f"no landed event files for {context.partition_key} under "
            f"{os.path.join(lmat_store.landing, 'events')}"
        )
    store = lmat_store.open()
    result = lmat.ingest_files(store, files, engine=lmat_store.write_engine())
    res = result.as_dict()
    sources = [os.path.basename(f) for f in files]
    accepted = store.read_table(
        "raw", columns=["event_id"], filters=pads.field("source").isin(sources)
    )
    quarantined = store.read_table(
        "quarantine", columns=["reason"], filters=pads.field("source").isin(sources)
    )
    by_reason: dict[str, int] = {}
    if quarantined is not None:
        for r in quarantined.column("reason").to_pylist():
            by_reason[r] = by_reason.get(r, 0) + 1
    yield dg.MaterializeResult(
        asset_key="raw_events",
        metadata={
            "files": sources,
            "accepted_events": accepted.num_rows if accepted is not None else 0,
            "this_run": dg.MetadataValue.json(res),
            "raw_version": result.version,
            "store": dg.MetadataValue.path(store.root),
        },
    )
    yield dg.MaterializeResult(
        asset_key="quarantined_events",
        metadata={
            "quarantined_rows": sum(by_reason.values()),
            "by_reason": dg.MetadataValue.json(by_reason),
        },
    )
