"""The store's registry of thin tables, and how a user's thin rows leave them.

A training example of a user is that user's data (spec section 7): ``forget`` must find every
thin table written for the store, wherever it lives. ``lmat log`` and ``lmat examples`` register
the table they write here *before* writing to it (registering is idempotent), so a table the
store has written to is always listed, even if the writer was killed half way.

The registry and the thin-file layout live in the store so that deletion (``store/``) does not
import the protocol (``protocol/thin.py`` builds the rows and imports this module)::

    STORE/thin_tables/   Delta: uri | registered_at      (one row per thin table)
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from lmat_platform.store.core import Store, now_us

log = logging.getLogger(__name__)

REGISTRY = "thin_tables"
#: How thin files are written, as pyarrow's writer options; :func:`thin_parquet_options` adds
#: each column's encoding and which columns keep statistics.
#: Zstandard level 15: thin files are written once (and rewritten only by ``forget`` and
#: ``compact-thin``), read every pass; on the demo's streaming rows it stores 4% fewer bytes
#: than level 1 for about 3x the compression CPU (16,000 requests: 0.4 s against 0.12 s) and
#: decodes as fast (``bench/results/thin_bytes.md``).
THIN_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd", "compression_level": 15, "use_dictionary": False,
    # The Delta log holds the table's schema; Arrow's copy of it was a third of a small file.
    "store_schema": False,
}
#: Thin columns whose values rise along a user's run of a file: delta-encoded. A user's stored
#: tail events are in arrival order, and event ids are (nearly) issued in that order.
DELTA_COLUMNS = frozenset({"tail_arrival_ts", "tail_event_id"})
#: Columns of well-mixed random bits, where splitting bytes gains nothing.
PLAIN_COLUMNS = frozenset({"head_checksum"})
#: Columns whose Parquet statistics (min and max, in the footer and in each page header) thin
#: files keep: the one column reads of a thin table filter by (a forgotten or pending user's rows
#: are dropped by ``user_id``; buckets are partitions, and the Delta log keeps its own file
#: statistics). Every other flat column's cost the demo's streaming rows 3.2 B a request.
STATISTICS_COLUMNS = frozenset({"user_id"})
#: Rows of one thin file are in this order (a reader merges a bucket's files in it, without a
#: sort when there is one file, and cuts the bucket into user-contiguous slices).
ROW_ORDER = ("user_id", "request_ts", "request_id")


def thin_parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """pyarrow writer options of a thin file of ``schema`` (written by ``lmat log`` and
    ``lmat examples``, and rewritten by ``forget``).

    Zstandard pages without dictionaries; integer and float columns (list elements included)
    byte-stream-split, so that the compressor sees each byte plane of the values apart (the
    high bytes of ids, times and counts barely change), except :data:`DELTA_COLUMNS` (delta
    encoding) and :data:`PLAIN_COLUMNS`; statistics for :data:`STATISTICS_COLUMNS` only. On
    the demo this halves both paths' thin files against LZ4 plain pages with Arrow's schema
    (streaming 237 -> 126 B a request, batch 25 -> 13, Parquet bytes), and they decode no
    slower (``bench/results/thin_bytes.md``)."""
    encoding: dict[str, str] = {}
    for f in schema:
        typ = f.type.value_type if pa.types.is_list(f.type) else f.type
        path = f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
        if f.name in PLAIN_COLUMNS or not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
            continue
        if f.name in DELTA_COLUMNS and pa.types.is_integer(typ):
            encoding[path] = "DELTA_BINARY_PACKED"
        elif not pa.types.is_float16(typ):
            encoding[path] = "BYTE_STREAM_SPLIT"
    return {**THIN_PARQUET_OPTIONS, "column_encoding": encoding,
            "write_statistics": [f.name for f in schema if f.name in STATISTICS_COLUMNS]}


def register_thin_table(store: Store, uri: str) -> None:
    """Remember a thin table written for ``store``, so that ``forget`` removes its users' rows
    from it (a no-op when it is already registered)."""
    if uri in registered_thin_tables(store):
        return
    store.append(
        REGISTRY,
        pa.table({"uri": [uri], "registered_at": pa.array([now_us()], pa.int64())}),
        op="register_thin",
    )


def registered_thin_tables(store: Store) -> list[str]:
    """URIs of every thin table registered with ``store``, sorted."""
    t = store.read_table(REGISTRY, columns=["uri"])
    return sorted(set(t.column("uri").to_pylist())) if t is not None else []
