"""Event, request and thin-row schemas, and validation of input files (spec sections 2, 4, 5).

Timestamps are int64 microseconds since the epoch everywhere inside the platform; on input,
Arrow ``timestamp[us]`` (with or without a time zone) and ``int64`` are accepted.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmat_platform.exceptions import InputFileError, RequestError, SchemaError

#: Required event columns and their types (spec section 2).
EVENT_COLUMNS: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "event_id": pa.int64(),
    "event_ts": pa.int64(),
    "arrival_ts": pa.int64(),
    "item_id": pa.int64(),
    "action": pa.int16(),
}
TIMESTAMP_COLUMNS = ("event_ts", "arrival_ts")

#: Required request columns (spec section 4).
REQUEST_COLUMNS: dict[str, pa.DataType] = {
    "request_id": pa.int64(),
    "user_id": pa.int64(),
    "request_ts": pa.int64(),
}

#: Columns the platform adds to stored tables; input may not use these names.
RESERVED_COLUMNS = frozenset(
    {"bucket", "snapshot_id", "head_len", "head_checksum", "tail_len", "reason", "source",
     "batch_id"}
)
#: Request columns may not start with this (the streaming tail's columns do).
RESERVED_PREFIX = "tail_"

MICROS_PER_DAY = 86_400 * 1_000_000


def _lossy_ts(col: pa.ChunkedArray, name: str, where: str) -> str:
    """Why a timestamp column cannot be microseconds: its first value that is not a whole
    number of microseconds (nanoseconds), or that is out of the int64 microsecond range."""
    t = col.type
    raw = col.cast(pa.int64()).to_numpy(zero_copy_only=False)
    valid = ~np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False))
    if t.unit == "ns":
        bad = np.flatnonzero(valid & (raw % 1000 != 0))
        if len(bad):
            return (f"{where}: column '{name}' has {t} values that are not whole microseconds "
                    f"(row {int(bad[0])}: {int(raw[bad[0]])} ns; {len(bad)} row(s)); lmat stores "
                    "microseconds: round or truncate them before ingest")
    return f"{where}: column '{name}' has {t} values out of the int64 microsecond range"


def _coerce_ts(col: pa.ChunkedArray, name: str, where: str) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_timestamp(t):
        if t.unit != "us":
            try:
                col = col.cast(pa.timestamp("us", tz=t.tz))
            except pa.ArrowInvalid:
                raise SchemaError(_lossy_ts(col, name, where)) from None
        return col.cast(pa.int64())
    if pa.types.is_integer(t):
        return col.cast(pa.int64())
    raise SchemaError(
        f"{where}: column '{name}' must be timestamp[us] or int64 microseconds, but got {t}"
    )


def _coerce_int(col: pa.ChunkedArray, name: str, want: pa.DataType, where: str) -> pa.ChunkedArray:
    t = col.type
    if t == want:
        return col
    if pa.types.is_integer(t) or pa.types.is_null(t):
        try:
            return col.cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise SchemaError(f"{where}: column '{name}' does not fit {want}: {e}") from None
    raise SchemaError(f"{where}: column '{name}' must be {want}, but got {t}")


def read_parquet_file(path: str, *, what: str = "file") -> pa.Table:
    """Read one Parquet file, turning every failure into a one-line :class:`InputFileError`."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise InputFileError(f"{path}: {what} does not exist") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: {what} is a directory, expected a Parquet file") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputFileError(f"{path}: not a readable Parquet file ({msg})") from None


def normalize_events(table: pa.Table, *, where: str) -> pa.Table:
    """Check and coerce an event table: required columns present and typed, traits kept as is.

    Nulls are allowed here (they are quarantined by ingest, not rejected). Raises
    :class:`SchemaError` naming the file and column when a required column is missing or has a
    type that cannot represent it.
    """
    names = set(table.column_names)
    missing = [c for c in EVENT_COLUMNS if c not in names]
    if missing:
        raise SchemaError(f"{where}: missing required column '{missing[0]}'")
    reserved = sorted(names & RESERVED_COLUMNS)
    if reserved:
        raise SchemaError(f"{where}: column '{reserved[0]}' is reserved by lmat")
    arrays = []
    fields = []
    for name in table.column_names:
        col = table.column(name)
        if name in TIMESTAMP_COLUMNS:
            col = _coerce_ts(col, name, where)
        elif name in EVENT_COLUMNS:
            col = _coerce_int(col, name, EVENT_COLUMNS[name], where)
        elif pa.types.is_nested(col.type) or pa.types.is_null(col.type):
            raise SchemaError(
                f"{where}: trait column '{name}' has type {col.type}; traits must be scalar"
            )
        arrays.append(col)
        fields.append(pa.field(name, col.type))
    # Required columns first, in a fixed order; traits after, in file order.
    out = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    order = list(EVENT_COLUMNS) + [c for c in out.column_names if c not in EVENT_COLUMNS]
    return out.select(order)


def check_trait_types(
    incoming: pa.Schema, stored: pa.Schema, *, where: str
) -> list[pa.Field]:
    """Return trait fields that are new (additive evolution); raise if a type changed."""
    new_fields = []
    for field in incoming:
        if field.name in stored.names:
            have = stored.field(field.name).type
            if have != field.type:
                raise SchemaError(
                    f"{where}: column '{field.name}' changed type from {have} to {field.type}"
                )
        else:
            new_fields.append(field)
    return new_fields


def normalize_requests(table: pa.Table, *, where: str) -> pa.Table:
    """Check and coerce a request table (spec section 4): required columns, unique request_id."""
    names = set(table.column_names)
    for c in REQUEST_COLUMNS:
        if c not in names:
            raise RequestError(f"{where}: missing required column '{c}'")
    reserved = sorted((names & RESERVED_COLUMNS) | {n for n in names if n.startswith(RESERVED_PREFIX)})
    if reserved:
        raise RequestError(f"{where}: column '{reserved[0]}' is reserved by lmat")
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if name == "request_ts":
            col = _coerce_ts(col, name, where)
        elif name in REQUEST_COLUMNS:
            col = _coerce_int(col, name, REQUEST_COLUMNS[name], where)
        if name in REQUEST_COLUMNS and col.null_count:
            raise RequestError(f"{where}: column '{name}' has {col.null_count} null value(s)")
        cols[name] = col
    out = pa.table(cols)
    rid = out.column("request_id").to_numpy()
    if len(rid):
        import numpy as np

        s = np.sort(rid)
        dup = s[1:][s[1:] == s[:-1]]
        if len(dup):
            raise RequestError(
                f"{where}: duplicate request_id {int(dup[0])} ({len(np.unique(dup))} duplicated)"
            )
    order = list(REQUEST_COLUMNS) + [c for c in out.column_names if c not in REQUEST_COLUMNS]
    return out.select(order)
