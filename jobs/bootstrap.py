"""Materialize the whole asset graph once, in process: every landed day, then the rest.

Used by ``lmat ui`` (run as ``python -m jobs.bootstrap`` with ``DAGSTER_HOME`` set, so the UI
opens on a graph whose assets and checks have results) and by the tests.
"""

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from assets.partitions import DAILY

log = logging.getLogger(__name__)

#: The daily-partitioned assets, materialized one run per day.
DAILY_ASSETS = ("raw_events", "quarantined_events", "uih_snapshot", "thin_log", "thin_examples")


def landed_days(defs: dg.Definitions) -> list[str]:
    """Partition keys with at least one landed event file, oldest first."""
    resources: Mapping[str, Any] = defs.resources or {}
    resource = resources["lmat_store"]
    keys = DAILY.get_partition_keys()
    return [k for k in keys if resource.landed("events", k)]


def materialize_all(
    defs: dg.Definitions,
    *,
    instance: dg.DagsterInstance,
    partition_keys: Sequence[str] | None = None,
    run_config: Mapping[str, Any] | None = None,
    raise_on_error: bool = True,
    include: dg.AssetSelection | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """One run per day over the daily assets, then one run over everything downstream.

    ``run_config`` goes to the final run (for example the ``sequence_model`` training config);
    ``include`` restricts the final run (default: every unpartitioned asset).
    """
    assets = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    checks = list(defs.asset_checks or [])
    resources = dict(defs.resources or {})
    daily = dg.AssetSelection.assets(*DAILY_ASSETS)
    results = []
    for key in partition_keys if partition_keys is not None else landed_days(defs):
        log.info("materializing day %s", key)
        results.append(
            dg.materialize(
                [*assets, *checks],
                selection=daily,
                partition_key=key,
                resources=resources,
                instance=instance,
                raise_on_error=raise_on_error,
            )
        )
        if not results[-1].success:
            return results
    # Partitioned assets outside the daily set (the summary tier) need a trained model first:
    # the daily job computes them, every snapshot missed included.
    later = [k for a in assets if a.partitions_def is not None for k in a.keys
             if k.to_user_string() not in DAILY_ASSETS]
    # The real_data group (MovieLens fetched from PyPI, minutes of training) runs on demand only.
    rest = include if include is not None else (
        dg.AssetSelection.all() - daily - dg.AssetSelection.assets(*later)
        - dg.AssetSelection.groups("real_data"))
    results.append(
        dg.materialize(
            [*assets, *checks],
            selection=rest,
            resources=resources,
            instance=instance,
            run_config=dict(run_config or {}),
            raise_on_error=raise_on_error,
        )
    )
    return results


def main() -> int:
    from jobs.definitions import build_defs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    defs = build_defs()
    results = materialize_all(defs, instance=dg.DagsterInstance.get(), raise_on_error=False)
    return 0 if results and all(r.success for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
