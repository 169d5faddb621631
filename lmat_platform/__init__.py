"""lmat: versioned late materialization of ultra-long user histories.

The public API, and nothing else. See ``docs/spec.md`` for what each piece computes.

Names are loaded on first use (PEP 562): ``import lmat_platform`` imports only the error
classes, so the ``lmat`` command starts without pyarrow, deltalake, numba or torch and each
subcommand imports what it uses. ``from lmat_platform import SequenceLoader`` and
``lmat_platform.SequenceLoader`` work as with eager imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from lmat_platform.lazy import lazy_names

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from lmat_platform.fatrows import write_fat_rows
    from lmat_platform.protocol import POINTER_BYTES, Pointer, write_thin
    from lmat_platform.reader import Batch, SequenceLoader
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

#: Each lazy name and the module that defines it (the reader imports torch).
_WHERE = {
    "write_fat_rows": "fatrows",
    "POINTER_BYTES": "protocol",
    "Pointer": "protocol",
    "write_thin": "protocol",
    "Batch": "reader",
    "SequenceLoader": "reader",
    "ReadContext": "reconstruct",
    "Sequences": "reconstruct",
    "iter_reconstruct": "reconstruct",
    "materialize": "reconstruct",
    "compact_buckets": "store",
    "disk_bytes": "store",
    "forget_users": "store",
    "ingest_files": "store",
    "init_store": "store",
    "list_snapshots": "store",
    "open_store": "store",
    "publish_snapshot": "store",
    "vacuum": "store",
    "Tenant": "tenants",
    "load_tenants": "tenants",
    "parse_tenants": "tenants",
    "union_tenant": "tenants",
}

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
