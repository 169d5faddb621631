"""Thin example tables: the streaming log path and the batch backfill path (spec section 5)."""

from typing import Any, Literal

import dagster as dg
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import DeltaTable

import lmat_platform as lmat
from assets.ingest import landing_requests
from assets.partitions import DAILY
from assets.resources import LmatResource
from lmat_platform.protocol import open_thin
from lmat_platform.store import Store
from lmat_platform.store.core import delta_dataset

_DESCRIPTIONS = {
    "log": "Streaming path: the day's requests as thin rows with the head pointer (snapshot, "
    "length, checksum) and a physical copy of the tail, as serving logs them.",
    "examples": "Batch path (backfill): the day's requests as thin rows with the head pointer "
    "only; tails are read from the raw log at materialization time.",
}


def _already_written(store: Store, uri: str, files: list[str]) -> int | None:
    """Rows already in ``uri`` for every request of ``files`` (None if any is missing), so that
    re-running a partition is a no-op instead of a duplicate-request error."""
    if not DeltaTable.is_deltatable(uri):
        return None
    ids = pq.read_table(files, columns=["request_id"]).column("request_id")
    have = (
        delta_dataset(open_thin(store, uri))
        .to_table(columns=["request_id"], filter=pads.field("request_id").isin(ids))
    )
    return have.num_rows if have.num_rows == len(ids) else None


def build_thin_asset(kind: Literal["log", "examples"]) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"thin_{kind}",
        partitions_def=DAILY,
        deps=[landing_requests, "raw_events", "uih_snapshot"],
        group_name="examples",
        kinds={"delta"},
        description=_DESCRIPTIONS[kind],
    )
    def _thin(context: dg.AssetExecutionContext, lmat_store: LmatResource) -> dg.MaterializeResult:
        files = lmat_store.landed("requests", context.partition_key)
        if not files:
            raise dg.Failure(f"no landed request files for {context.partition_key}")
        store = lmat_store.open()
        uri = lmat_store.thin_uri(kind)
        rows = _already_written(store, uri, files)
        written: list[dict[str, Any]] = (
            [] if rows is not None else [
                lmat.write_thin(store, f, uri, path=kind, engine=lmat_store.write_engine())
                for f in files]
        )
        return dg.MaterializeResult(
            metadata={
                "uri": dg.MetadataValue.path(uri),
                "requests": rows if rows is not None else sum(int(w["requests"]) for w in written),
                "status": "already written" if rows is not None else "written",
                "tail_events": sum(int(w["tail_events"]) for w in written),
                "table_version": DeltaTable(uri).version(),
            }
        )

    return _thin


thin_log = build_thin_asset("log")
thin_examples = build_thin_asset("examples")
