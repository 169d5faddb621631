"""lmat: versioned late materialization of ultra-long user histories.

The public API, and nothing else. See ``SPEC.md`` for what each piece computes.
"""

from __future__ import annotations

from typing import Any

from lmat_platform import numba_cache as _numba_cache  # noqa: F401  (first: see the module)
from lmat_platform.exceptions import (
    ImmutabilityError,
    LeakageError,
    LmatError,
    O2OConsistencyError,
    SchemaError,
    StoreNotFoundError,
    TenantError,
    ThinTableError,
)
from lmat_platform.fatrows import write_fat_rows
from lmat_platform.protocol import POINTER_BYTES, Pointer, write_thin
from lmat_platform.reconstruct import ReadContext, Sequences, iter_reconstruct, materialize
from lmat_platform.store import (
    compact_buckets,
    disk_bytes,
    forget_users,
    ingest_files,
    init_store,
    list_snapshots,
    open_store,
    publish_snapshot,
    vacuum,
)
from lmat_platform.tenants import Tenant, load_tenants, parse_tenants, union_tenant

__all__ = [
    "POINTER_BYTES",
    "Batch",
    "ImmutabilityError",
    "LeakageError",
    "LmatError",
    "O2OConsistencyError",
    "Pointer",
    "ReadContext",
    "SchemaError",
    "SequenceLoader",
    "Sequences",
    "StoreNotFoundError",
    "Tenant",
    "TenantError",
    "ThinTableError",
    "compact_buckets",
    "disk_bytes",
    "forget_users",
    "ingest_files",
    "init_store",
    "iter_reconstruct",
    "list_snapshots",
    "load_tenants",
    "materialize",
    "open_store",
    "parse_tenants",
    "publish_snapshot",
    "union_tenant",
    "vacuum",
    "write_fat_rows",
    "write_thin",
]


def __getattr__(name: str) -> Any:
    # The reader imports torch; keep ``import lmat_platform`` light for the CLI and Dagster.
    if name in ("SequenceLoader", "Batch"):
        from lmat_platform import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'lmat_platform' has no attribute {name!r}")
