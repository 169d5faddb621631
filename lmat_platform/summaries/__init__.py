"""The summary tier (VISTA, spec section 10): versioned, incremental, point-in-time summaries
of whole histories, and what the reader needs to serve them."""

from lmat_platform.summaries.serving import (
    ServedSummaries,
    ServingReport,
    SummaryServer,
    check_served,
)
from lmat_platform.summaries.tier import (
    SUMMARY_TABLES,
    RecomputeReport,
    SummaryError,
    SummaryRegistryEntry,
    compute_pending,
    compute_summaries,
    load_summarizer,
    recompute_check,
    register_summarizer,
    resolve_version,
    storage_report,
    summarizer_versions,
    summary_registry,
)

__all__ = [
    "SUMMARY_TABLES",
    "RecomputeReport",
    "ServedSummaries",
    "ServingReport",
    "SummaryError",
    "SummaryRegistryEntry",
    "SummaryServer",
    "check_served",
    "compute_pending",
    "compute_summaries",
    "load_summarizer",
    "recompute_check",
    "register_summarizer",
    "resolve_version",
    "storage_report",
    "summarizer_versions",
    "summary_registry",
]
