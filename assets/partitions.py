"""Daily partitions: one per UTC day of landed data, snapshots and thin example tables.

The partitions run from the data's first day to its last, so the UI counts the days that hold
data, not every day since some fixed date. ``lmat ui`` sets both from the landed files:

| variable         | default                                   | meaning                      |
|------------------|-------------------------------------------|------------------------------|
| ``LMAT_FIRST_DAY`` | the synthetic workload's day 0 (2023-11-15) | first partition (YYYY-MM-DD) |
| ``LMAT_LAST_DAY``  | none: open-ended, up to today (a live feed) | last partition (YYYY-MM-DD)  |

They are read when this module is imported (asset and job definitions take their partitions
when they are declared), so a code location picks up new values when it reloads.
"""

import datetime as dt
import os

import dagster as dg

from lmat_platform.exceptions import LmatError
from lmat_platform.synth import WorkloadConfig

#: The synthetic workload's day 0, the default first partition.
START_DATE = dt.datetime.fromtimestamp(WorkloadConfig().start_ts / 1e6, dt.UTC).date().isoformat()


def _env_day(name: str) -> dt.date | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise LmatError(f"{name}: expected a date YYYY-MM-DD, but got {value!r}") from None


def daily_partitions(first_day: str, last_day: str | None = None) -> dg.DailyPartitionsDefinition:
    """UTC days from ``first_day`` to ``last_day`` inclusive (open-ended when None)."""
    first = dt.date.fromisoformat(first_day)
    end = None
    if last_day is not None:
        last = dt.date.fromisoformat(last_day)
        if last < first:
            raise LmatError(f"LMAT_LAST_DAY: {last_day} is before LMAT_FIRST_DAY {first_day}")
        end = (last + dt.timedelta(days=1)).isoformat()  # Dagster's end date is exclusive
    return dg.DailyPartitionsDefinition(start_date=first.isoformat(), end_date=end, timezone="UTC")


FIRST_DAY = (_env_day("LMAT_FIRST_DAY") or dt.date.fromisoformat(START_DATE)).isoformat()
_last = _env_day("LMAT_LAST_DAY")
LAST_DAY = _last.isoformat() if _last else None

DAILY = daily_partitions(FIRST_DAY, LAST_DAY)


def day_range_us(partition_key: str) -> tuple[int, int]:
    """[start, end) of a daily partition in microseconds since the epoch (UTC)."""
    day = dt.datetime.strptime(partition_key, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    start = int(day.timestamp()) * 1_000_000
    return start, start + 86_400 * 1_000_000


def partition_of_us(ts_us: int) -> str:
    """The daily partition key holding a timestamp (microseconds)."""
    return dt.datetime.fromtimestamp(ts_us / 1e6, dt.UTC).date().isoformat()


def iso_us(ts_us: int) -> str:
    """A timestamp in microseconds as ISO 8601 UTC (``2023-11-15T04:00:00Z``), for metadata."""
    t = dt.datetime.fromtimestamp(ts_us // 1_000_000, dt.UTC).replace(microsecond=ts_us % 1_000_000)
    return t.isoformat(timespec="seconds" if ts_us % 1_000_000 == 0 else "microseconds").replace(
        "+00:00", "Z"
    )
