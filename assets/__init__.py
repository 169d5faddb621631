"""Dagster assets and asset checks: thin wrappers over ``lmat_platform``.

The graph, left to right (daily-partitioned up to the thin tables)::

    landing_events -> raw_events, quarantined_events -> uih_snapshot -> uih_tier
    landing_requests ------------------------------------+-> thin_log, thin_examples
                                                           -> tenant_<name> ... -> storage_report
                                                                              -> sequence_model
    thin_examples, uih_tier -> vista_summarizer; uih_snapshot, vista_summarizer -> vista_summaries
"""

import dagster as dg

import lmat_platform as lmat
from assets.checks import build_checks
from assets.examples import thin_examples, thin_log
from assets.ingest import ingest_events, landing_events, landing_requests
from assets.reports import build_storage_report
from assets.resources import LmatResource
from assets.summaries import SUMMARY_CHECKS, vista_summaries, vista_summarizer
from assets.tenants import build_tenant_assets
from assets.tier import uih_snapshot, uih_tier
from assets.training import build_model_asset

__all__ = ["SUMMARY_CHECKS", "LmatResource", "build_assets", "build_checks"]


def build_assets(
    tenants: dict[str, lmat.Tenant],
) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """Every asset of the platform for a set of tenants (one asset per tenant)."""
    return [
        landing_events,
        landing_requests,
        ingest_events,
        uih_snapshot,
        uih_tier,
        thin_log,
        thin_examples,
        *build_tenant_assets(tenants),
        build_storage_report(tenants),
        build_model_asset(tenants),
        vista_summarizer,
        vista_summaries,
    ]
