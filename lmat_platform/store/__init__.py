"""The tiers: raw log + quarantine, the immutable UIH tier, snapshots, deletion and retention."""

from lmat_platform.store.core import (
    Store,
    as_store,
    delta_dataset,
    disk_bytes,
    init_store,
    live_bytes,
    open_store,
)
from lmat_platform.store.deletion import forget_users, forgotten_users, pending_users, vacuum
from lmat_platform.store.ingest import IngestResult, ingest_files
from lmat_platform.store.snapshots import (
    SnapshotInfo,
    latest_snapshot,
    list_snapshots,
    publish_snapshot,
)
from lmat_platform.store.uih import compact_buckets

__all__ = [
    "IngestResult",
    "SnapshotInfo",
    "Store",
    "as_store",
    "compact_buckets",
    "delta_dataset",
    "disk_bytes",
    "live_bytes",
    "forget_users",
    "forgotten_users",
    "ingest_files",
    "init_store",
    "latest_snapshot",
    "list_snapshots",
    "open_store",
    "pending_users",
    "publish_snapshot",
    "vacuum",
]
