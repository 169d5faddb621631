"""Great Expectations (GX Core 1.x) suites on events and thin rows.

Two suites, each a pure function of its inputs (a table in, a :class:`QualityReport` out), so the
same code backs the Dagster asset checks and the tests:

- ``events``: required event columns are not null, ``action`` lies in the declared domain of
  action codes, and ``event_ts <= arrival_ts``.
- ``thin_rows``: the request and pointer columns are not null, ``request_id`` is unique and
  ``head_len >= 0``.

GX runs in an ephemeral, in-memory context with a pandas data source; analytics and progress bars
are off. GX is imported lazily (it costs seconds), so ``import lmat_platform.quality`` is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lmat_platform.schema import EVENT_COLUMNS

log = logging.getLogger(__name__)

#: Thin-row columns that must never be null (the tail is null on the batch path by design).
THIN_REQUIRED = (
    "request_id",
    "user_id",
    "request_ts",
    "bucket",
    "snapshot_id",
    "head_len",
    "head_checksum",
)


@dataclass
class QualityReport:
    """Outcome of one GX suite on one table: overall success and one line per expectation."""

    suite: str
    rows: int
    success: bool
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["success"]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "rows": self.rows,
            "success": self.success,
            "expectations": len(self.results),
            "failed": self.failed,
        }


def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    cfg = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=cfg)


def events_expectations(actions: Iterable[int]) -> list[Any]:
    """The ``events`` suite's expectations for a declared domain of action codes."""
    import great_expectations as gx

    ex = gx.expectations
    out: list[Any] = [ex.ExpectColumnValuesToNotBeNull(column=c) for c in EVENT_COLUMNS]
    out.append(ex.ExpectColumnValuesToBeInSet(column="action", value_set=sorted(set(actions))))
    out.append(
        ex.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="arrival_ts",
            column_B="event_ts",
            or_equal=True,
            ignore_row_if="either_value_is_missing",
        )
    )
    return out


def thin_rows_expectations() -> list[Any]:
    """The ``thin_rows`` suite's expectations."""
    import great_expectations as gx

    ex = gx.expectations
    out: list[Any] = [ex.ExpectColumnValuesToNotBeNull(column=c) for c in THIN_REQUIRED]
    out.append(ex.ExpectColumnValuesToBeUnique(column="request_id"))
    out.append(ex.ExpectColumnValuesToBeBetween(column="head_len", min_value=0))
    return out


def run_suite(name: str, table: pa.Table, expectations: Sequence[Any]) -> QualityReport:
    """Validate ``table`` against ``expectations`` in a fresh ephemeral GX context."""
    import great_expectations as gx

    # Nested types (thin-row tails) mean nothing to these expectations and pandas
    # converts them slowly: validate only the flat columns.
    flat = table.select([f.name for f in table.schema if not pa.types.is_nested(f.type)])
    df = flat.to_pandas()
    ctx = _context()
    asset = ctx.data_sources.add_pandas(f"lmat_{name}").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": df}
    )
    res = batch.validate(gx.ExpectationSuite(name=name, expectations=list(expectations)))
    results = []
    for r in res.results:
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        results.append(
            {
                "expectation": cfg.type,
                "kwargs": {
                    k: (list(v) if isinstance(v, set | tuple) else v) for k, v in kwargs.items()
                },
                "success": bool(r.success),
                "unexpected_count": int(r.result.get("unexpected_count") or 0),
                "sample": [str(x) for x in (r.result.get("partial_unexpected_list") or [])[:3]],
            }
        )
    rep = QualityReport(name, table.num_rows, bool(res.success), results)
    log.info(
        "GX suite %s on %d rows: %s",
        name,
        table.num_rows,
        "passed" if rep.success else f"{len(rep.failed)} expectation(s) failed",
    )
    return rep


def validate_events(events: pa.Table, actions: Iterable[int]) -> QualityReport:
    """Run the ``events`` suite on a table of events (e.g. the accepted rows of one ingest)."""
    return run_suite("events", events, events_expectations(actions))


def validate_thin_rows(rows: pa.Table) -> QualityReport:
    """Run the ``thin_rows`` suite on a table of thin rows."""
    return run_suite("thin_rows", rows, thin_rows_expectations())
