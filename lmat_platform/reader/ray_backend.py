"""Disaggregated preprocessing on Ray Data: the same reconstruction, run on CPU nodes.

::

    work units (bucket, slice)  --map_batches(reconstruct_bucket)-->  one row per request
    from_items, one block each     (CPU workers, any node)             (ids, length, list columns)
                                                                            |
                                   trainer  <--iter_torch_batches(collate: Arrow -> Batch)--+

The units are the ones :class:`~lmat_platform.reader.SequenceLoader` plans, and each is rebuilt by
the same :func:`~lmat_platform.reconstruct.reconstruct_bucket` call, so every request's sequence is
identical to the loader's; only the order differs (Ray streams blocks as they finish).

Ray is an optional dependency (``pip install lmat[ray]``): it is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmat_platform.exceptions import TenantError
from lmat_platform.reader.batch import Batch
from lmat_platform.reader.loader import (
    UNIT_VALUES,
    ConsumerSpec,
    SequenceLoader,
    WorkUnit,
    _UnitReader,
    plan_units,
)
from lmat_platform.reconstruct import column_array, tensor_numpy
from lmat_platform.store.core import Store
from lmat_platform.tenants import Tenant

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the Ray backend needs ray[data], which is not installed: pip install 'lmat[ray]'"
        ) from e
    return ray


def ensure_ray(*, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Start a local Ray instance unless one is running (or reachable via ``RAY_ADDRESS``)."""
    ray = _ray()
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if "RAY_ADDRESS" not in os.environ:
        kw["num_cpus"] = num_cpus or os.cpu_count() or 1
        # Ray's socket paths must stay short; the default under a long TMPDIR can be too long.
        kw["_temp_dir"] = temp_dir or os.path.join(tempfile.gettempdir(), "lmat-ray")
    ray.init(**kw)


class _Reconstruct:
    """map_batches function: a batch of work units in, one Arrow row per request out."""

    def __init__(self, spec: ConsumerSpec):
        self.spec = spec
        self.reader = _UnitReader(spec)

    def __call__(self, units: pa.Table) -> pa.Table:
        parts = []
        for u in units.to_pylist():
            seqs = self.reader.read(WorkUnit(**u), plan_only=False)
            t = seqs.to_table()
            for c in self.spec.context_columns:
                t = t.append_column(c, seqs.context.column(c))
            # The unit's bytes, on its first row, so that a sum over rows is exact.
            b = np.zeros(t.num_rows, dtype=np.int64)
            if t.num_rows:
                b[0] = seqs.bytes_read
            parts.append(t.append_column("bytes_read", pa.array(b)))
        return pa.concat_tables(parts) if parts else pa.table({})


def ray_dataset(
    store: Store | str,
    thin: str,
    *,
    tenant: Tenant,
    verify: bool = True,
    max_unit_rows: int | None = None,
    num_cpus: float = 1.0,
) -> Any:
    """A Ray ``Dataset`` with one row per request of ``thin``: ``request_id``, ``user_id``,
    ``request_ts``, ``length``, one list column per tenant column, the numeric context columns
    and ``bytes_read``. Lazy: nothing runs until it is consumed."""
    return _ray_dataset(store, thin, tenant=tenant, verify=verify, max_unit_rows=max_unit_rows,
                        num_cpus=num_cpus)[0]


def _ray_dataset(
    store: Store | str, thin: str, *, tenant: Tenant, verify: bool, max_unit_rows: int | None,
    num_cpus: float,
) -> tuple[Any, list[str]]:
    if tenant.summary is not None:
        raise TenantError(f"tenant '{tenant.name}': summary tenants are served by SequenceLoader "
                          "(the Ray backend has no summary server)")
    ray = _ray()
    ensure_ray()
    # Ray's units are materialized (Arrow rows), so their size follows a value budget.
    budget = max(256, min(65536, UNIT_VALUES // max(tenant.max_len, 1)))
    loader = SequenceLoader(store, thin, tenant=tenant, verify=verify,
                            max_unit_rows=max_unit_rows or budget)
    units = plan_units(loader.info.bucket_rows,
                       max_unit_rows=loader.max_unit_rows)
    spec = loader._specs(1, 0, [0])[0]
    items = [
        {"bucket": u.bucket, "part": u.part, "parts": u.parts, "rows": u.rows,
         "bucket_rows": u.bucket_rows}
        for u in units
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    return ds.map_batches(
        _Reconstruct,
        fn_constructor_args=(spec,),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(os.cpu_count() or 1))),
    ), loader.context_columns


def _collate_class(columns: tuple[str, ...], context: list[str]) -> Any:
    from ray.data.collate_fn import ArrowBatchCollateFn

    class JaggedCollate(ArrowBatchCollateFn):
        """Arrow rows (list columns) -> :class:`Batch` (values + lengths), no per-row Python."""

        def __call__(self, batch: pa.Table) -> Batch:  # type: ignore[override]
            return arrow_to_batch(batch, columns, context)

    return JaggedCollate()


def arrow_to_batch(table: pa.Table, columns: tuple[str, ...], context: list[str]) -> Batch:
    """Rows with list columns (as ``materialize`` writes them) -> :class:`Batch`."""
    import torch

    def arr(c: str) -> pa.Array:
        return column_array(table, c)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True))

    lengths = pc.fill_null(pc.list_value_length(arr(columns[0])), 0).to_numpy().astype(np.int64)
    values = {c: t(tensor_numpy(arr(c).flatten())) for c in columns}
    return Batch(
        request_id=t(arr("request_id").to_numpy()),
        lengths=t(lengths),
        values=values,
        context={c: t(tensor_numpy(arr(c))) for c in context if c in table.column_names},
        user_id=t(arr("user_id").to_numpy()),
        request_ts=t(arr("request_ts").to_numpy()),
        bytes_read=int(pc.sum(arr("bytes_read")).as_py() or 0)
        if "bytes_read" in table.column_names else 0,
    )


def iter_ray_batches(
    store: Store | str,
    thin: str,
    *,
    tenant: Tenant,
    batch_size: int = 512,
    prefetch_batches: int = 2,
    verify: bool = True,
    max_unit_rows: int | None = None,
) -> Iterator[Batch]:
    """Stream :class:`Batch` es reconstructed by Ray Data workers to this (trainer) process."""
    ds, ctx_cols = _ray_dataset(store, thin, tenant=tenant, verify=verify,
                                max_unit_rows=max_unit_rows, num_cpus=1.0)
    yield from ds.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=_collate_class(tenant.columns, ctx_cols),
        prefetch_batches=prefetch_batches,
        device="cpu",
    )
