"""The tiers: raw log + quarantine, the immutable UIH tier, snapshots, deletion and retention.

Names are loaded on first use (PEP 562), so ``from lmat_platform.store import open_store``
imports the store's core and not the tier's compiled kernels (numba); submodules import as
usual (``from lmat_platform.store import uih``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmat_platform.lazy import lazy_names

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from lmat_platform.store.core import (
        Store,
        as_store,
        delta_dataset,
        disk_bytes,
        init_store,
        live_bytes,
        open_store,
    )
    from lmat_platform.store.deletion import (
        forget_users,
        forgotten_users,
        pending_users,
        vacuum,
    )
    from lmat_platform.store.ingest import IngestResult, ingest_files
    from lmat_platform.store.snapshots import (
        SnapshotInfo,
        latest_snapshot,
        list_snapshots,
        publish_snapshot,
    )
    from lmat_platform.store.uih import compact_buckets

#: Each lazy name and the submodule that defines it.
_WHERE = {
    "Store": "core",
    "as_store": "core",
    "delta_dataset": "core",
    "disk_bytes": "core",
    "init_store": "core",
    "live_bytes": "core",
    "open_store": "core",
    "forget_users": "deletion",
    "forgotten_users": "deletion",
    "pending_users": "deletion",
    "vacuum": "deletion",
    "IngestResult": "ingest",
    "ingest_files": "ingest",
    "SnapshotInfo": "snapshots",
    "latest_snapshot": "snapshots",
    "list_snapshots": "snapshots",
    "publish_snapshot": "snapshots",
    "compact_buckets": "uih",
}

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
