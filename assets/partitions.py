"""Daily partitions: one per UTC day of landed data, snapshots and thin example tables."""

import datetime as dt

import dagster as dg

from lmat_platform.synth import WorkloadConfig

#: First day of data: the synthetic workload's day 0 (2023-11-15), so the demo fills the first
#: partitions. A deployment with older data would move this back.
START_DATE = dt.datetime.fromtimestamp(WorkloadConfig().start_ts / 1e6, dt.UTC).date().isoformat()

DAILY = dg.DailyPartitionsDefinition(start_date=START_DATE, timezone="UTC")


def day_range_us(partition_key: str) -> tuple[int, int]:
    """[start, end) of a daily partition in microseconds since the epoch (UTC)."""
    day = dt.datetime.strptime(partition_key, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    start = int(day.timestamp()) * 1_000_000
    return start, start + 86_400 * 1_000_000


def partition_of_us(ts_us: int) -> str:
    """The daily partition key holding a timestamp (microseconds)."""
    return dt.datetime.fromtimestamp(ts_us / 1e6, dt.UTC).date().isoformat()
