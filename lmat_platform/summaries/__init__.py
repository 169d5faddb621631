"""The summary tier (VISTA, spec section 10): versioned, incremental, point-in-time summaries
of whole histories, and what the reader needs to serve them.

* :mod:`~lmat_platform.summaries.tier`: summarizers, the tier's tables, incremental computation,
  the from-scratch recompute check, storage;
* :mod:`~lmat_platform.summaries.serving`: point-in-time serving and its check;
* :mod:`~lmat_platform.summaries.retention`: pruning superseded recurrent states (no torch);
* :mod:`~lmat_platform.summaries.commands`: ``lmat train-summarizer`` and ``lmat summarize``.

Names are loaded on first use: the tier imports torch, and ``lmat`` must start without it.
"""

from __future__ import annotations

from lmat_platform.lazy import lazy_names

_WHERE = {
    "ServedSummaries": "serving",
    "ServingReport": "serving",
    "SummaryServer": "serving",
    "check_served": "serving",
    "SUMMARY_TABLES": "tier",
    "RecomputeReport": "tier",
    "SummaryError": "tier",
    "SummaryRegistryEntry": "tier",
    "compute_pending": "tier",
    "prune_states": "retention",
    "superseded_states": "retention",
    "compute_summaries": "tier",
    "load_summarizer": "tier",
    "recompute_check": "tier",
    "register_summarizer": "tier",
    "resolve_version": "tier",
    "storage_report": "tier",
    "summarizer_versions": "tier",
    "summary_registry": "tier",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
