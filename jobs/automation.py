"""Jobs, the daily schedule and the landing-folder sensor."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from assets.partitions import DAILY
from assets.resources import LmatResource

_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})")

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets("raw_events", "quarantined_events"),
    partitions_def=DAILY,
    description="Ingest one day's landed event files into the raw log and quarantine.",
)

daily_job = dg.define_asset_job(
    "daily_snapshot_job",
    selection=dg.AssetSelection.assets("uih_snapshot").downstream()
    - dg.AssetSelection.assets("sequence_model", "vista_summarizer"),
    partitions_def=DAILY,
    description="Publish the day's snapshot, then rebuild everything downstream of it: the tier "
    "layout, the day's thin tables, the tenants, the storage report and the day's summaries.",
)

train_job = dg.define_asset_job(
    "train_job",
    selection=dg.AssetSelection.assets("sequence_model", "vista_summarizer"),
    description="Train the causal sequence model and the VISTA summarizer through SequenceLoader "
    "(config: TrainConfig, SummarizerConfig).",
)

daily_snapshot_schedule = dg.build_schedule_from_partitioned_job(
    daily_job,
    hour_of_day=0,
    minute_of_hour=30,
    name="daily_snapshot_schedule",
    description="At 00:30 UTC, publish yesterday's snapshot and rebuild downstream assets.",
)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    description="Starts an ingest run for each day with new or changed files in "
    "LANDING/events (file names start with the day, YYYY-MM-DD). Producers should write "
    "files atomically (write elsewhere, then rename).",
)
def landing_sensor(
    context: dg.SensorEvaluationContext, lmat_store: LmatResource
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    seen: dict[str, str] = json.loads(context.cursor or "{}")
    folder = Path(lmat_store.landing) / "events"
    valid = set(DAILY.get_partition_keys())
    new: dict[str, list[str]] = {}
    for p in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        m = _DATE.match(p.name)
        st = p.stat()
        stamp = f"{st.st_mtime_ns}:{st.st_size}"
        if m is None or seen.get(p.name) == stamp:
            continue
        if m.group(1) not in valid:
            context.log.warning(f"{p.name}: {m.group(1)} is not a partition of {DAILY}")
            continue
        new.setdefault(m.group(1), []).append(f"{p.name}@{stamp}")
        seen[p.name] = stamp
    if not new:
        yield dg.SkipReason(f"no new files in {folder}")
    for day, files in sorted(new.items()):
        yield dg.RunRequest(run_key=f"{day}:{','.join(files)}", partition_key=day)
    context.update_cursor(json.dumps(seen))
