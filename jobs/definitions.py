"""The single Dagster entry point of lmat (``workspace.yaml`` and ``[tool.dagster]`` load it).

The environment is read here, when the definitions are built, never at import time:

| variable        | default                         | meaning                          |
|-----------------|---------------------------------|----------------------------------|
| ``LMAT_HOME``   | ``~/.lmat/ui``                  | base of the defaults below       |
| ``LMAT_STORE``  | ``$LMAT_HOME/store``            | store root (directory or URI)    |
| ``LMAT_LANDING``| ``$LMAT_HOME/landing``          | landing folder                   |
| ``LMAT_OUTPUTS``| ``$LMAT_HOME/outputs``          | thin tables, reports, models     |
| ``LMAT_TENANTS``| ``assets/default_tenants.yaml`` | tenants YAML                     |
"""

import dagster as dg

from assets import SUMMARY_CHECKS, LmatResource, build_assets, build_checks
from assets.real_data import REAL_DATA_ASSETS, REAL_DATA_CHECKS
from jobs import automation


def build_defs(resource: LmatResource | None = None) -> dg.Definitions:
    """The platform's definitions for one deployment (``resource``; default: from the env)."""
    resource = resource or LmatResource.from_env()
    tenants = resource.tenants()
    return dg.Definitions(
        assets=[*build_assets(tenants), *REAL_DATA_ASSETS],
        asset_checks=[*build_checks(tenants), *SUMMARY_CHECKS, *REAL_DATA_CHECKS],
        jobs=[automation.ingest_job, automation.daily_job, automation.train_job],
        schedules=[automation.daily_snapshot_schedule],
        sensors=[automation.landing_sensor],
        resources={"lmat_store": resource},
        # Steps are short and mostly I/O on one store: one process per run is faster than a
        # process per step, and the store's writers serialize on its lock anyway.
        executor=dg.in_process_executor,
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs()
