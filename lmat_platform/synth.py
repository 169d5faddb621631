"""Deterministic synthetic workload: daily event files and request files (spec sections 2 and 4).

The generator produces what a recommendation platform sees in production, at any scale from a few
hundred events to tens of millions: users with Zipf-distributed activity (so a few users have very
long histories), Zipf item popularity, sessions (bursts of events and requests within minutes),
and the dirty parts that ingest must handle: late events, stragglers from the previous day,
duplicates (within a file and re-sent from the previous day's file) and malformed rows.

Everything is a pure function of ``(config, day)``: each day, and each chunk of a day, has its own
seeded numpy ``Generator``, so days can be generated in any order, alone, or in parallel, and ids
are unique across days without generating earlier days (``id = day * ID_STRIDE + index``).
Generation is vectorized and chunked (:data:`CHUNK_ROWS` rows at a time), so memory stays bounded
and ``write_workload`` streams each file through one ``ParquetWriter``.

The library never prints; ``write_workload`` reports progress through an optional callable and
logs through :mod:`logging`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MICROS_PER_SECOND = 1_000_000
MICROS_PER_DAY = 86_400 * MICROS_PER_SECOND

#: Rows generated (and written) at a time. Fixed, not a config field, so that the data does not
#: depend on how it is generated: a day with N rows always has ``ceil(N / CHUNK_ROWS)`` chunks.
CHUNK_ROWS = 1_000_000

#: Ids are ``day * ID_STRIDE + index``; 2**40 leaves room for a trillion rows a day and for
#: millions of days before int64 overflows.
ID_STRIDE = 1 << 40

#: User ids of request users without any history live far above the event users' ids (1..n_users).
NEW_USER_BASE = 1 << 50

EVENT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("event_id", pa.int64()),
        pa.field("event_ts", pa.int64()),
        pa.field("arrival_ts", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field("action", pa.int16()),
        pa.field("dwell_ms", pa.float32()),
        pa.field("surface", pa.int16()),
    ]
)

REQUEST_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("request_ts", pa.int64()),
        pa.field("label", pa.int8()),
        pa.field("candidate_item_id", pa.int64()),
        pa.field("position", pa.int16()),
    ]
)

_REQUIRED_EVENT_COLUMNS = ("user_id", "event_id", "event_ts", "arrival_ts", "item_id", "action")

# Session shape. Events: ~6 per session, ~20 s apart. Requests: ~5 per session, ~45 s apart.
_EVENTS_PER_SESSION = 6.0
_EVENT_GAP_US = 20 * MICROS_PER_SECOND
_REQUESTS_PER_SESSION = 5.0
_REQUEST_GAP_US = 45 * MICROS_PER_SECOND

# Normal ingestion delay: log-normal around 300 ms, clipped to [1 ms, 30 s].
_DELAY_MEDIAN_US = 300_000
_DELAY_MIN_US = 1_000
_DELAY_MAX_US = 30 * MICROS_PER_SECOND
# Late events arrive between 10 minutes and 2 days after they happened (log-uniform).
_LATE_MIN_US = 600 * MICROS_PER_SECOND
_LATE_MAX_US = 2 * MICROS_PER_DAY
# Stragglers arrived up to 6 hours before the day's file starts.
_STRAGGLER_MAX_US = 6 * 3600 * MICROS_PER_SECOND

# Row kinds inside a day's event file (internal bookkeeping, not written).
_CLEAN, _MALFORMED, _STRAGGLER, _DUP = 0, 1, 2, 3


@dataclass(frozen=True)
class WorkloadConfig:
    """Knobs of the synthetic workload; the data is a pure function of these."""

    seed: int = 0
    """Root seed of every random stream."""
    n_users: int = 200
    """Users with event histories; user ids are 1..n_users (permuted by activity rank)."""
    n_items: int = 5000
    """Item catalogue size; item ids are 1..n_items (permuted by popularity rank)."""
    days: int = 4
    """Number of simulated days (one event file and one request file each)."""
    events_per_day: int = 2000
    """Rows per daily event file: the scale knob (hundreds to tens of millions in total)."""
    start_ts: int = 1_700_006_400_000_000
    """Start of day 0 in microseconds since the epoch (a UTC midnight)."""
    user_zipf: float = 1.2
    """Zipf exponent of user activity (events and requests); larger = more skewed."""
    item_zipf: float = 1.1
    """Zipf exponent of item popularity."""
    late_share: float = 0.05
    """Share of events that arrive long (10 min .. 2 days) after they happened."""
    straggler_share: float = 0.01
    """Share of day d's rows whose arrival_ts lies in day d-1 (none on day 0)."""
    dup_share: float = 0.01
    """Share of rows repeating an earlier event_id (same file, or re-sent from day d-1)."""
    malformed_share: float = 0.005
    """Share of rows with a null required column or event_ts > arrival_ts."""
    requests_per_day: int = 500
    """Rows per daily request file."""
    actions: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Action codes; the first is the most common (a view), later ones rarer."""
    new_user_share: float = 0.02
    """Share of request sessions by users without any event history."""

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError("n_users and n_items must be at least 1")
        if self.days < 0 or self.events_per_day < 0 or self.requests_per_day < 0:
            raise ValueError("days, events_per_day and requests_per_day must be >= 0")
        if self.events_per_day >= ID_STRIDE or self.requests_per_day >= ID_STRIDE:
            raise ValueError(f"at most {ID_STRIDE - 1} rows a day")
        if not self.actions:
            raise ValueError("actions must not be empty")
        shares = (self.late_share, self.straggler_share, self.dup_share, self.malformed_share)
        if any(s < 0 or s > 1 for s in shares) or not 0 <= self.new_user_share <= 1:
            raise ValueError("shares must lie in [0, 1]")
        if self.straggler_share + self.dup_share + self.malformed_share > 1:
            raise ValueError("straggler_share + dup_share + malformed_share must be <= 1")


@dataclass(frozen=True)
class DayStats:
    """What one day's event file holds, by kind of row (exact counts)."""

    day: int
    rows: int
    late: int
    stragglers: int
    duplicates: int
    resent: int
    """Of ``duplicates``: rows that repeat an event of the previous day's file."""
    malformed: int


@dataclass
class Workload:
    """A written workload: its config, its files and totals."""

    config: WorkloadConfig
    out_dir: Path
    event_files: list[Path] = field(default_factory=list)
    request_files: list[Path] = field(default_factory=list)
    n_events: int = 0
    n_requests: int = 0
    day_stats: list[DayStats] = field(default_factory=list)


def day_bounds(cfg: WorkloadConfig, day: int) -> tuple[int, int]:
    """Start (inclusive) and end (exclusive) of simulated day ``day``, in microseconds."""
    start = cfg.start_ts + day * MICROS_PER_DAY
    return start, start + MICROS_PER_DAY


# --------------------------------------------------------------------------------------------
# Shared distributions


def _rng(cfg: WorkloadConfig, day: int, stream: int, chunk: int = 0) -> np.random.Generator:
    # One independent stream per (day, purpose, chunk): order of generation never matters.
    return np.random.default_rng([cfg.seed, day, stream, chunk])


@functools.lru_cache(maxsize=16)
def _zipf_table(seed: int, n: int, s: float, tag: int) -> tuple[np.ndarray, np.ndarray]:
    """CDF over popularity ranks and the id of each rank (a seeded permutation of 1..n)."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    # A permutation so that the heaviest users/items are not simply ids 1, 2, 3...
    ids = np.random.default_rng([seed, tag]).permutation(n).astype(np.int64) + 1
    return cdf, ids


def _zipf_ids(rng: np.random.Generator, cdf: np.ndarray, ids: np.ndarray, size: int) -> np.ndarray:
    ranks = np.searchsorted(cdf, rng.random(size), side="right")
    return ids[np.minimum(ranks, len(ids) - 1)]


def _users(cfg: WorkloadConfig, rng: np.random.Generator, size: int) -> np.ndarray:
    cdf, ids = _zipf_table(cfg.seed, cfg.n_users, cfg.user_zipf, 1)
    return _zipf_ids(rng, cdf, ids, size)


def _items(cfg: WorkloadConfig, rng: np.random.Generator, size: int) -> np.ndarray:
    cdf, ids = _zipf_table(cfg.seed, cfg.n_items, cfg.item_zipf, 2)
    return _zipf_ids(rng, cdf, ids, size)


def _action_probs(cfg: WorkloadConfig) -> np.ndarray:
    # Geometric decay: with 5 actions about 65% / 23% / 8% / 3% / 1%.
    p = 0.35 ** np.arange(len(cfg.actions), dtype=np.float64)
    return p / p.sum()


def _sessions(
    rng: np.random.Generator, n: int, mean_len: float, mean_gap_us: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Split n rows into sessions: (session index of each row, offset in the session, count)."""
    # Every session has >= 1 row, so n lengths always cover n rows.
    lens = rng.geometric(1.0 / mean_len, size=max(n, 1))
    ends = np.cumsum(lens)
    k = int(np.searchsorted(ends, n, side="left")) + 1 if n else 0
    lens = lens[:k].copy()
    if k:
        lens[-1] -= int(ends[k - 1]) - n
    sess = np.repeat(np.arange(k), lens)
    gaps = rng.exponential(mean_gap_us, size=n).astype(np.int64)
    first = np.concatenate(([0], np.cumsum(lens)[:-1])) if k else np.zeros(0, np.int64)
    gaps[first] = 0
    cum = np.cumsum(gaps)
    offsets = cum - cum[first][sess] if n else cum
    return sess, offsets, k


# --------------------------------------------------------------------------------------------
# Events


def _chunk_layout(cfg: WorkloadConfig, day: int) -> list[tuple[int, int, int, int]]:
    """(row offset, rows, slice start, slice end) of each chunk: chunks cover equal time slices."""
    n = cfg.events_per_day
    k = max(1, math.ceil(n / CHUNK_ROWS))
    start, _ = day_bounds(cfg, day)
    out = []
    for c in range(k):
        lo, hi = n * c // k, n * (c + 1) // k
        t0 = start + MICROS_PER_DAY * c // k
        t1 = start + MICROS_PER_DAY * (c + 1) // k
        out.append((lo, hi - lo, t0, t1))
    return out


def _core_chunk(cfg: WorkloadConfig, day: int, chunk: int) -> dict[str, np.ndarray]:
    """The clean rows of one chunk, sorted by arrival_ts, with their final event ids."""
    offset, n, t0, t1 = _chunk_layout(cfg, day)[chunk]
    rng = _rng(cfg, day, 0, chunk)
    sess, offs, k = _sessions(rng, n, _EVENTS_PER_SESSION, _EVENT_GAP_US)
    users = _users(cfg, rng, k)
    starts = rng.integers(t0, t1, size=k, dtype=np.int64)
    # Sessions that run past the slice's end wrap to its start, keeping arrival_ts in the slice.
    arrival = t0 + (starts[sess] + offs - t0) % (t1 - t0)
    delay = np.exp(rng.normal(math.log(_DELAY_MEDIAN_US), 1.2, size=n))
    delay = np.clip(delay, _DELAY_MIN_US, _DELAY_MAX_US).astype(np.int64)
    n_late = round(cfg.late_share * n)
    late_rows = rng.choice(n, size=n_late, replace=False)
    lo, hi = math.log(_LATE_MIN_US), math.log(_LATE_MAX_US)
    delay[late_rows] = np.exp(rng.uniform(lo, hi, size=n_late)).astype(np.int64)
    actions = np.asarray(cfg.actions, dtype=np.int16)[
        rng.choice(len(cfg.actions), size=n, p=_action_probs(cfg))
    ]
    cols = {
        "user_id": users[sess],
        "event_ts": arrival - delay,
        "arrival_ts": arrival,
        "item_id": _items(cfg, rng, n),
        "action": actions,
        "dwell_ms": rng.lognormal(math.log(3000.0), 1.0, size=n).astype(np.float32),
        "surface": rng.choice(4, size=n, p=[0.6, 0.25, 0.1, 0.05]).astype(np.int16),
        "_late": np.zeros(n, dtype=bool),
    }
    cols["_late"][late_rows] = True
    # A log file is (roughly) in arrival order; ids follow that order.
    order = np.argsort(arrival, kind="stable")
    cols = {name: a[order] for name, a in cols.items()}
    cols["event_id"] = day * ID_STRIDE + offset + np.arange(n, dtype=np.int64)
    return cols


def _kinds(cfg: WorkloadConfig, day: int, chunk: int, n: int) -> np.ndarray:
    """Which rows of a chunk are turned malformed / straggler / duplicate (exact counts)."""
    rng = _rng(cfg, day, 1, chunk)
    n_mal = round(cfg.malformed_share * n)
    n_strag = round(cfg.straggler_share * n) if day > 0 else 0
    n_dup = round(cfg.dup_share * n)
    picked = rng.choice(n, size=n_mal + n_strag + n_dup, replace=False)
    kinds = np.zeros(n, dtype=np.int8)
    kinds[picked[:n_mal]] = _MALFORMED
    kinds[picked[n_mal : n_mal + n_strag]] = _STRAGGLER
    kinds[picked[n_mal + n_strag :]] = _DUP
    return kinds


def _event_chunk(cfg: WorkloadConfig, day: int, chunk: int) -> tuple[pa.Table, DayStats]:
    core = _core_chunk(cfg, day, chunk)
    n = len(core["event_id"])
    kinds = _kinds(cfg, day, chunk, n)
    rng = _rng(cfg, day, 2, chunk)
    day_start, _ = day_bounds(cfg, day)
    cols = {name: core[name].copy() for name in EVENT_SCHEMA.names}
    fields = [c for c in EVENT_SCHEMA.names if c != "arrival_ts"]

    # Stragglers: arrived in the previous day, shipped late in today's file.
    strag = np.flatnonzero(kinds == _STRAGGLER)
    if len(strag):
        arr = day_start - rng.integers(1, _STRAGGLER_MAX_US, size=len(strag), dtype=np.int64)
        delay = cols["arrival_ts"][strag] - cols["event_ts"][strag]
        cols["arrival_ts"][strag] = arr
        cols["event_ts"][strag] = arr - delay

    # Duplicates keep their slot's arrival_ts (the copy arrived again, later) and copy every
    # other column of a clean source row. Half of them re-send a row of the previous day's file.
    dups = np.flatnonzero(kinds == _DUP)
    clean = np.flatnonzero(kinds == _CLEAN)
    n_resent = 0
    if len(dups):
        resend = rng.random(len(dups)) < 0.5
        prev = _resend_sources(cfg, day - 1) if day > 0 else None
        if prev is None:
            resend[:] = False
        else:
            # Chunk c re-sends only source rows c, c + k, c + 2k, ... (k chunks), without
            # replacement, so no source is re-sent twice in one day's file.
            n_chunks = len(_chunk_layout(cfg, day))
            avail = np.arange(chunk, len(prev["event_id"]), n_chunks)
            take = np.flatnonzero(resend)[len(avail) :]
            resend[take] = False
            slots = dups[resend]
            src = rng.choice(avail, size=len(slots), replace=False)
            for name in fields:
                cols[name][slots] = prev[name][src]
            n_resent = len(slots)
        # Same-file copies take a clean row that comes earlier in the chunk ("first one wins").
        slots = dups[~resend]
        cand = (rng.random(len(slots)) * slots).astype(np.int64)
        pos = np.searchsorted(clean, cand, side="right") - 1
        ok = pos >= 0
        src = clean[np.maximum(pos, 0)]
        # A slot with no clean row before it stays an ordinary (unique) event.
        kinds[slots[~ok]] = _CLEAN
        for name in fields:
            cols[name][slots[ok]] = cols[name][src[ok]]

    # Malformed: half get a null required column, half an event_ts after their arrival_ts.
    mal = np.flatnonzero(kinds == _MALFORMED)
    masks: dict[str, np.ndarray] = {}
    if len(mal):
        nulls = rng.random(len(mal)) < 0.5
        which = rng.integers(0, len(_REQUIRED_EVENT_COLUMNS), size=len(mal))
        for i, name in enumerate(_REQUIRED_EVENT_COLUMNS):
            rows = mal[nulls & (which == i)]
            if len(rows):
                masks[name] = np.zeros(n, dtype=bool)
                masks[name][rows] = True
        future = mal[~nulls]
        cols["event_ts"][future] = cols["arrival_ts"][future] + rng.integers(
            1_000, 600 * MICROS_PER_SECOND, size=len(future), dtype=np.int64
        )

    arrays = [pa.array(cols[f.name], type=f.type, mask=masks.get(f.name)) for f in EVENT_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)
    stats = DayStats(
        day=day,
        rows=n,
        late=int(np.count_nonzero(core["_late"] & (kinds == _CLEAN))),
        stragglers=len(strag),
        duplicates=int(np.count_nonzero(kinds == _DUP)),
        resent=n_resent,
        malformed=len(mal),
    )
    return table, stats


def _resend_sources(cfg: WorkloadConfig, day: int) -> dict[str, np.ndarray] | None:
    """Clean rows of ``day``'s first chunk, as written to its file (sources of re-sent rows)."""
    if day < 0 or cfg.events_per_day == 0:
        return None
    core = _core_chunk(cfg, day, 0)
    keep = _kinds(cfg, day, 0, len(core["event_id"])) == _CLEAN
    if not keep.any():
        return None
    return {name: a[keep] for name, a in core.items()}


def iter_day_events(cfg: WorkloadConfig, day: int) -> Iterator[tuple[pa.Table, DayStats]]:
    """Day ``day``'s event file chunk by chunk (at most :data:`CHUNK_ROWS` rows each)."""
    for chunk in range(len(_chunk_layout(cfg, day))):
        yield _event_chunk(cfg, day, chunk)


def generate_day_events_with_stats(cfg: WorkloadConfig, day: int) -> tuple[pa.Table, DayStats]:
    """Day ``day``'s whole event file in memory, with exact counts of each kind of row."""
    tables, stats = [], []
    for t, s in iter_day_events(cfg, day):
        tables.append(t)
        stats.append(s)
    return pa.concat_tables(tables), _sum_stats(day, stats)


def generate_day_events(cfg: WorkloadConfig, day: int) -> pa.Table:
    """Day ``day``'s whole event file in memory (schema :data:`EVENT_SCHEMA`)."""
    return generate_day_events_with_stats(cfg, day)[0]


def _sum_stats(day: int, stats: list[DayStats]) -> DayStats:
    return DayStats(
        day=day,
        rows=sum(s.rows for s in stats),
        late=sum(s.late for s in stats),
        stragglers=sum(s.stragglers for s in stats),
        duplicates=sum(s.duplicates for s in stats),
        resent=sum(s.resent for s in stats),
        malformed=sum(s.malformed for s in stats),
    )


# --------------------------------------------------------------------------------------------
# Requests


def generate_day_requests(cfg: WorkloadConfig, day: int) -> pa.Table:
    """Day ``day``'s request file (schema :data:`REQUEST_SCHEMA`), sorted by request_ts.

    Requests come in sessions of a few requests minutes apart. Half of the sessions of known
    users start at a clean event of the day (same user, around its arrival_ts; a quarter of those
    exactly at it, the ``arrival_ts == T`` edge case), so requests interleave with the user's
    arriving events. About ``new_user_share`` of sessions belong to users without any history.
    Anchors come from the day's first event chunk only, which at more than :data:`CHUNK_ROWS`
    events a day is the first part of the day.
    """
    n = cfg.requests_per_day
    rng = _rng(cfg, day, 3)
    day_start, day_end = day_bounds(cfg, day)
    sess, offs, k = _sessions(rng, n, _REQUESTS_PER_SESSION, _REQUEST_GAP_US)

    users = _users(cfg, rng, k)
    starts = rng.integers(day_start, day_end, size=k, dtype=np.int64)
    order = rng.permutation(k)
    n_new = min(k, max(1, round(cfg.new_user_share * k))) if cfg.new_user_share > 0 else 0
    new = order[:n_new]
    users[new] = NEW_USER_BASE + day * ID_STRIDE + np.arange(n_new, dtype=np.int64)

    anchors = _resend_sources(cfg, day) if cfg.events_per_day else None
    if anchors is not None and k > n_new:
        anchored = order[n_new : n_new + (k - n_new + 1) // 2]
        src = rng.integers(0, len(anchors["event_id"]), size=len(anchored))
        users[anchored] = anchors["user_id"][src]
        shift = rng.exponential(60 * MICROS_PER_SECOND, size=len(anchored)).astype(np.int64)
        shift *= rng.choice(np.array([-1, 1], dtype=np.int64), size=len(anchored))
        shift[: max(1, len(anchored) // 4)] = 0
        starts[anchored] = anchors["arrival_ts"][src] + shift

    # Sessions running past midnight wrap to the day's start: request_ts stays in the day.
    ts = day_start + (starts[sess] + offs - day_start) % MICROS_PER_DAY
    label_p = np.where(rng.random(n) < 0.3, 0.25, 0.05)
    cols = {
        "user_id": users[sess],
        "request_ts": ts,
        "label": (rng.random(n) < label_p).astype(np.int8),
        "candidate_item_id": _items(cfg, rng, n),
        "position": np.minimum(rng.geometric(0.15, size=n) - 1, 99).astype(np.int16),
    }
    order_ts = np.argsort(ts, kind="stable")
    cols = {name: a[order_ts] for name, a in cols.items()}
    cols["request_id"] = day * ID_STRIDE + np.arange(n, dtype=np.int64)
    return pa.Table.from_arrays(
        [pa.array(cols[f.name], type=f.type) for f in REQUEST_SCHEMA], schema=REQUEST_SCHEMA
    )


# --------------------------------------------------------------------------------------------
# Files


def write_workload(
    cfg: WorkloadConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
) -> Workload:
    """Write ``out_dir/events/day-NNN.parquet`` and ``out_dir/requests/day-NNN.parquet``.

    Each event file is streamed chunk by chunk through one ``ParquetWriter``, so memory is
    bounded by :data:`CHUNK_ROWS` rows whatever ``events_per_day`` is.
    """
    out = Path(out_dir)
    (out / "events").mkdir(parents=True, exist_ok=True)
    (out / "requests").mkdir(parents=True, exist_ok=True)
    wl = Workload(config=cfg, out_dir=out)
    for day in range(cfg.days):
        path = out / "events" / f"day-{day:03d}.parquet"
        stats = []
        with pq.ParquetWriter(path, EVENT_SCHEMA) as writer:
            for table, s in iter_day_events(cfg, day):
                writer.write_table(table)
                stats.append(s)
        day_stats = _sum_stats(day, stats)
        wl.event_files.append(path)
        wl.day_stats.append(day_stats)
        wl.n_events += day_stats.rows

        rpath = out / "requests" / f"day-{day:03d}.parquet"
        requests = generate_day_requests(cfg, day)
        pq.write_table(requests, rpath)
        wl.request_files.append(rpath)
        wl.n_requests += requests.num_rows

        msg = f"day {day + 1}/{cfg.days}: {day_stats.rows} events, {requests.num_rows} requests"
        log.info("synth %s", msg)
        if progress is not None:
            progress(msg)
    return wl
