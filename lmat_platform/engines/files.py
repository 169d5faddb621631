"""Many writers, one commit: Parquet files written by tasks, committed by the driver.

A task writes one file of a Delta table (:func:`write_part`) and returns its ``AddAction``; the
driver commits all of a step's actions in one Delta transaction (:func:`commit_adds`), with the
step's app transaction, or creates the table with them. Nothing a task writes is visible until
that commit: a run killed before it leaves only unreferenced files (``vacuum`` removes them).

::

    <table>/bucket=3/<prefix>-<uuid>.parquet     one part: rows of one partition value
    <table>/<prefix>-<uuid>.parquet              an unpartitioned table's part
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.transaction import AddAction, RemoveAction

from lmat_platform.engines import Engine, LocalEngine

if TYPE_CHECKING:
    from lmat_platform.store.core import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """What one task writes: ``rows`` as one file of the Delta table at ``uri``."""

    uri: str
    rows: pa.Table
    #: (column, value) of the partition the file belongs to; those columns leave the file.
    partition: tuple[tuple[str, str], ...] = ()
    prefix: str = "part"
    data_change: bool = True
    #: ``pyarrow.parquet.write_table`` options.
    options: dict[str, Any] = field(default_factory=dict)
    #: The table's Arrow schema, if it exists: the file's columns take its types.
    schema: pa.Schema | None = None


def write_part(p: Part) -> AddAction:
    """Write one part's file (a task of any engine) and return its add action."""
    from lmat_platform.store.core import now_us, uri_filesystem
    from lmat_platform.store.deletion import file_stats_json

    rows = p.rows.drop_columns([c for c, _ in p.partition if c in p.rows.column_names])
    if p.schema is not None:
        rows = rows.cast(pa.schema([p.schema.field(c) if c in p.schema.names
                                    else rows.schema.field(c) for c in rows.column_names]))
    fs, root = uri_filesystem(p.uri)
    folder = "/".join(f"{c}={v}" for c, v in p.partition)
    rel = f"{folder}/{p.prefix}-{uuid.uuid4().hex}.parquet".lstrip("/")
    full = f"{root}/{rel}"
    fs.create_dir(f"{root}/{folder}".rstrip("/"), recursive=True)
    with fs.open_output_stream(full) as out:
        pq.write_table(rows, out, **p.options)
    size = fs.get_file_info(full).size or 0
    return AddAction(rel, size, dict(p.partition), now_us() // 1000, p.data_change,
                     file_stats_json(rows))


def split_by(table: pa.Table, column: str) -> list[tuple[int, pa.Table]]:
    """``table``'s rows by value of the integer ``column`` (ascending), each part in the
    table's row order."""
    values = table.column(column).to_numpy()
    order = np.argsort(values, kind="stable")
    uniq, starts = np.unique(values[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return [(v, table.take(pa.array(order[s:e])))
            for v, s, e in zip(uniq.tolist(), starts.tolist(), ends.tolist(), strict=True)]


def write_parts(engine: Engine | None, parts: Sequence[Part]) -> list[AddAction]:
    """Each part's file written by ``engine``'s tasks (None: this process)."""
    return (engine or LocalEngine()).map(write_part, list(parts))


def commit_properties(
    op: str, metadata: dict[str, Any] | None = None, txn: tuple[str, int] | None = None
) -> CommitProperties:
    """lmat's commit metadata (``lmat.op``, ``lmat.<key>``) and app transaction ``txn``."""
    custom = {"lmat.op": op, **{f"lmat.{k}": str(v) for k, v in (metadata or {}).items()}}
    return CommitProperties(
        custom_metadata=custom,
        app_transactions=[Transaction(app_id=txn[0], version=txn[1])] if txn else None,
    )


def commit_adds(
    table: DeltaTable | str,
    actions: Sequence[AddAction | RemoveAction],
    schema: pa.Schema,
    *,
    partition_by: list[str] | None,
    props: CommitProperties,
    description: str | None = None,
) -> DeltaTable:
    """Commit ``actions`` in one Delta transaction: to the open table ``table`` (new columns of
    ``schema`` are added to it first, as an additive schema change), or, when ``table`` is a
    URI, by creating the table with them. Returns the table at its new version."""
    from deltalake import Schema as DSchema

    from lmat_platform.store.core import storage_options

    if isinstance(table, str):
        from deltalake.transaction import create_table_with_add_actions

        create_table_with_add_actions(
            table, DSchema.from_arrow(schema), list(actions),  # type: ignore[arg-type]
            mode="error", partition_by=partition_by, description=description,
            commit_properties=props, storage_options=storage_options())
        return DeltaTable(table, storage_options=storage_options())
    dt = table
    have = pa.schema(dt.schema().to_arrow())
    new = [f for f in schema if f.name not in have.names]
    if new:
        from deltalake.schema import Field as DField

        dt.alter.add_columns([DField.from_arrow(f) for f in new])
        dt = DeltaTable(dt.table_uri, storage_options=storage_options())
    dt.create_write_transaction(list(actions), "append", pa.schema(dt.schema().to_arrow()),
                                partition_by=partition_by, commit_properties=props)
    return DeltaTable(dt.table_uri, storage_options=storage_options())


def append_parts(
    store: Store,
    name: str,
    data: pa.Table,
    *,
    engine: Engine | None,
    op: str,
    partition_by: list[str] | None = None,
    txn: tuple[str, int] | None = None,
    metadata: dict[str, Any] | None = None,
) -> int:
    """:meth:`Store.append` of ``data`` to table ``name``, its files written by ``engine``'s
    tasks (one per partition value; one for an unpartitioned table) and committed here in one
    commit with the same metadata and app transaction; returns the new version. The local
    engine (or None) is :meth:`Store.append` itself."""
    from lmat_platform.engines import is_local
    from lmat_platform.store.core import checkpoint_if_due

    if is_local(engine) or data.num_rows == 0:
        return store.append(name, data, op=op, partition_by=partition_by, txn=txn,
                            metadata=metadata)
    existing = store.open_table(name)
    parts_by = (list(existing.metadata().partition_columns) if existing is not None
                else partition_by or [])
    have = pa.schema(existing.schema().to_arrow()) if existing is not None else None
    uri = store.table_uri(name)
    if len(parts_by) > 1:
        raise ValueError(f"{name}: tables partitioned by more than one column are not supported")
    if parts_by:
        pieces = [Part(uri, rows, ((parts_by[0], str(v)),), schema=have)
                  for v, rows in split_by(data, parts_by[0])]
    else:
        pieces = [Part(uri, data, schema=have)]
    adds = write_parts(engine, pieces)
    schema = data.schema if have is None else pa.schema(
        [*have, *(f for f in data.schema if f.name not in have.names)])
    dt = commit_adds(existing if existing is not None else uri, adds, schema,
                     partition_by=parts_by or None, props=commit_properties(op, metadata, txn))
    checkpoint_if_due(dt)
    return dt.version()


def merge_bucket_files(
    dt: DeltaTable,
    uri: str,
    *,
    order: Sequence[str],
    options: Callable[[pa.Schema], dict[str, Any]],
    min_files: int,
    op: str,
    error: Callable[[str], Exception],
) -> tuple[DeltaTable, dict[str, int]]:
    """Each bucket of the bucket-partitioned table ``dt`` (at ``uri``) that has at least
    ``min_files`` files, merged into one file whose rows are in ``order``, written with
    ``options(rows' schema)``, in one layout-only commit (``op``): every add and remove carries
    ``dataChange = false``. A bucket whose rows read differ in number from its files' counts in
    the log raises ``error(message)`` before anything is committed. Returns the table at its
    new version and ``buckets``, ``files_in``, ``files_out``."""
    import pyarrow.dataset as pads

    from lmat_platform.store.core import delta_dataset, now_us

    acts = pa.table(dt.get_add_actions(flatten=True))
    files: dict[int, list[tuple[str, int, int]]] = {}
    for path, b, size, n in zip(acts.column("path").to_pylist(),
                                acts.column("partition.bucket").to_pylist(),
                                acts.column("size_bytes").to_pylist(),
                                acts.column("num_records").to_pylist(), strict=True):
        files.setdefault(int(b), []).append((path, int(size), int(n or 0)))
    chosen = {b: fl for b, fl in sorted(files.items()) if len(fl) >= max(min_files, 1)}
    if not chosen:
        return dt, {"buckets": 0, "files_in": 0, "files_out": 0}
    schema = pa.schema(dt.schema().to_arrow())
    ds = delta_dataset(dt)
    ts = now_us() // 1000
    actions: list[AddAction | RemoveAction] = []
    for b, fl in chosen.items():
        rows = ds.to_table(filter=pads.field("bucket") == b)
        if rows.num_rows != sum(n for _, _, n in fl):
            raise error(f"{uri}: bucket {b} has {rows.num_rows} rows, its log says "
                        f"{sum(n for _, _, n in fl)}")
        rows = rows.sort_by([(c, "ascending") for c in order]).drop_columns(["bucket"])
        actions.append(write_part(Part(uri, rows, (("bucket", str(b)),), data_change=False,
                                       options=options(rows.schema), schema=schema)))
        actions += [RemoveAction(path, False, ts, size, {"bucket": str(b)})
                    for path, size, _ in fl]
    files_in = sum(len(fl) for fl in chosen.values())
    new = commit_adds(dt, actions, schema, partition_by=["bucket"],
                      props=commit_properties(op, {"files_in": files_in,
                                                   "files_out": len(chosen)}))
    return new, {"buckets": len(chosen), "files_in": files_in, "files_out": len(chosen)}
