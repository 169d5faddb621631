"""Import a ratings file as lmat events and next-item requests.

A rating ``(user, item, rating, timestamp in seconds)`` at row r of the file becomes

* an **event**: ``event_id = r + 1`` (stable for a given file), ``user_id``, ``item_id`` (the
  item's dense index, 1..N in ascending raw-id order; 0 stays free for padding),
  ``event_ts = timestamp x 10^6``, ``action = ceil(rating)`` (the star count, 1..5 for
  MovieLens' half stars too), and the trait ``rating`` (float32);
* a **request** of next-item prediction: ``request_id = event_id``, ``request_ts`` = the
  rating's arrival time, ``label`` = the rated item's index, and ``split`` (train / valid / test
  by :func:`~lmat_platform.models.evaluate.leave_one_out_split`).

**Arrival (the delay model).** ``tie_order="hidden"`` (the default) sets ``arrival_ts =
event_ts``: the rating arrives the instant it is made. The request of a rating at T then sees
H(u, T), the ratings with ``arrival_ts < T``, so ratings of one user that share a timestamp are
invisible to each other, exactly as the spec's H(u, T) demands. Libraries that order a user's
ratings by (timestamp, file row) (RecBole: a stable sort) instead show a rating every
same-second rating above it in the file. ``tie_order="row"`` models that order as arrivals:
the k-th rating (0-based, file order) of a user within one second arrives k microseconds after
it, and its request is made on arrival, so H(u, T) equals the row-ordered history. The import
reports how many requests each choice affects (``tie_hidden_requests``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmat_platform.exceptions import InputFileError, SchemaError

log = logging.getLogger(__name__)

US = 1_000_000
TieOrder = Literal["hidden", "row"]

_ALIASES = {
    "user_id": ("user_id", "userid", "user"),
    "item_id": ("item_id", "itemid", "movieid", "movie_id", "item"),
    "rating": ("rating", "score"),
    "timestamp": ("timestamp", "ts", "time"),
}

EVENTS_FILE = "events.parquet"
ITEMS_FILE = "items.parquet"
META_FILE = "import.json"


def requests_file(split: str) -> str:
    """File name of one split's requests (``all`` for every request)."""
    return f"requests-{split}.parquet"


def read_ratings(path: str) -> pa.Table:
    """A ratings file as ``user_id, item_id, rating, timestamp (s), row``.

    Accepts Parquet, CSV/TSV with a header (MovieLens ``ratings.csv``: ``userId, movieId,
    rating, timestamp``), RecBole ``.inter`` (typed header ``user_id:token ...``) and the
    original MovieLens-100K ``u.data`` (tab-separated, no header). ``row`` is the rating's
    position in the file (kept if the file has a ``row`` column).
    """
    from lmat_platform.datasets.fetch import parse_inter

    if not os.path.isfile(path):
        raise InputFileError(f"{path}: no such ratings file")
    low = path.lower()
    try:
        if low.endswith(".parquet"):
            t = pq.read_table(path)
        elif low.endswith(".inter"):
            with open(path, "rb") as f:
                return parse_inter(f.read(), where=path)
        else:
            import pyarrow.csv as pcsv

            delim = "\t" if low.endswith((".tsv", ".data", ".inter")) else ","
            headless = low.endswith(".data")
            t = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(
                    column_names=["user_id", "item_id", "rating", "timestamp"] if headless
                    else None
                ),
                parse_options=pcsv.ParseOptions(delimiter=delim),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise InputFileError(f"{path}: cannot read ratings ({' '.join(str(e).split())})") from e
    cols: dict[str, pa.ChunkedArray] = {}
    lower = {n.lower().split(":")[0]: n for n in t.column_names}
    for want, names in _ALIASES.items():
        hit = next((lower[a] for a in names if a in lower), None)
        if hit is None:
            raise SchemaError(
                f"{path}: no {want} column (looked for {', '.join(names)}; have "
                f"{', '.join(t.column_names)})"
            )
        cols[want] = t[hit]
    try:
        out = {
            "user_id": cols["user_id"].cast(pa.int64()),
            "item_id": cols["item_id"].cast(pa.int64()),
            "rating": cols["rating"].cast(pa.float32()),
            "timestamp": cols["timestamp"].cast(pa.float64()).cast(pa.int64()),
        }
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SchemaError(f"{path}: {' '.join(str(e).split())}") from e
    row = t["row"].cast(pa.int64()) if "row" in t.column_names else pa.array(
        np.arange(t.num_rows, dtype=np.int64))
    from lmat_platform.datasets.fetch import RATINGS_SCHEMA

    return pa.table({**out, "row": row}, schema=RATINGS_SCHEMA)


@dataclass
class ImportResult:
    """What :func:`import_ratings` wrote and counted."""

    out_dir: str
    ratings: int
    users: int
    items: int
    tie_order: str
    requests: dict[str, int] = field(default_factory=dict)
    """Requests per split (``train``, ``valid``, ``test``)."""
    tie_groups: int = 0
    """(user, timestamp) groups holding more than one rating."""
    tie_hidden_requests: dict[str, int] = field(default_factory=dict)
    """Per split: requests whose H(u, T) lacks a same-second rating a row-ordered library shows."""
    tie_hidden_events: int = 0
    """Sum over requests of the ratings so hidden."""
    empty_history_requests: dict[str, int] = field(default_factory=dict)
    """Per split: requests whose H(u, T) is empty."""
    first_ts: int = 0
    last_ts: int = 0
    """Range of ``event_ts`` (microseconds)."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _validate(t: pa.Table, where: str) -> None:
    for c in ("user_id", "item_id", "rating", "timestamp", "row"):
        n = t[c].null_count
        if n:
            raise SchemaError(f"{where}: column '{c}' has {n} null value(s)")
    if t.num_rows == 0:
        raise InputFileError(f"{where}: no ratings")
    if pc.min(t["timestamp"]).as_py() < 0:
        raise SchemaError(f"{where}: column 'timestamp' has negative values")
    rows = t["row"].to_numpy()
    if len(np.unique(rows)) != len(rows):
        raise SchemaError(f"{where}: column 'row' has duplicate values")


def import_ratings(
    ratings: pa.Table | str,
    out_dir: str,
    *,
    tie_order: TieOrder = "hidden",
) -> ImportResult:
    """Write ``events.parquet``, ``items.parquet`` and ``requests-{all,train,valid,test}.parquet``
    under ``out_dir`` from a ratings table (or a file :func:`read_ratings` reads).

    See the module docstring for the mapping and the delay model ``tie_order``.
    """
    where = ratings if isinstance(ratings, str) else "ratings"
    t = read_ratings(ratings) if isinstance(ratings, str) else ratings
    if tie_order not in ("hidden", "row"):
        raise ValueError(f"tie_order must be 'hidden' or 'row', but got {tie_order!r}")
    _validate(t, where)
    user = t["user_id"].to_numpy()
    raw_item = t["item_id"].to_numpy()
    rating = t["rating"].to_numpy().astype(np.float32)
    ts_s = t["timestamp"].to_numpy()
    row = t["row"].to_numpy()
    n = len(user)

    items, item_idx = np.unique(raw_item, return_inverse=True)
    item_id = item_idx.astype(np.int64) + 1
    event_id = row + 1
    event_ts = ts_s * US
    # Rank of each rating among its user's ratings of the same second, in file order.
    order = np.lexsort((row, ts_s, user))
    u_o, t_o = user[order], ts_s[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (u_o[1:] != u_o[:-1]) | (t_o[1:] != t_o[:-1])
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank_o = np.arange(n) - group_start
    rank = np.empty(n, dtype=np.int64)
    rank[order] = rank_o
    if int(rank.max()) >= US:
        raise SchemaError(f"{where}: a user has {int(rank.max()) + 1} ratings in one second")
    arrival_ts = event_ts + rank if tie_order == "row" else event_ts.copy()
    action = np.ceil(rating).astype(np.int16)
    from lmat_platform.models.evaluate import (
        SPLIT_NAMES,
        TEST,
        TRAIN,
        VALID,
        leave_one_out_split,
    )

    split = leave_one_out_split(user, event_ts, event_id)

    # |H(u, T)| of each request: its user's ratings that arrived strictly before T, i.e. the
    # offset, within the user's block sorted by arrival, of the first rating arriving at T.
    by_arr = np.lexsort((arrival_ts, user))
    ua, aa = user[by_arr], arrival_ts[by_arr]
    idx = np.arange(n)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = ua[1:] != ua[:-1]
    new_arr = new_user.copy()
    new_arr[1:] |= aa[1:] != aa[:-1]
    hist_sorted = (np.maximum.accumulate(np.where(new_arr, idx, 0))
                   - np.maximum.accumulate(np.where(new_user, idx, 0)))
    hist_len = np.empty(n, dtype=np.int64)
    hist_len[by_arr] = hist_sorted
    hidden = np.zeros(n, dtype=np.int64) if tie_order == "row" else rank

    os.makedirs(out_dir, exist_ok=True)
    events = pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "event_id": pa.array(event_id, pa.int64()),
            "event_ts": pa.array(event_ts, pa.int64()),
            "arrival_ts": pa.array(arrival_ts, pa.int64()),
            "item_id": pa.array(item_id, pa.int64()),
            "action": pa.array(action, pa.int16()),
            "rating": pa.array(rating, pa.float32()),
        }
    )
    _write(events, os.path.join(out_dir, EVENTS_FILE))
    counts = np.bincount(item_id, minlength=len(items) + 1)
    _write(
        pa.table(
            {
                "item_id": pa.array(np.arange(1, len(items) + 1), pa.int64()),
                "raw_item_id": pa.array(items, pa.int64()),
                "ratings": pa.array(counts[1:], pa.int64()),
            }
        ),
        os.path.join(out_dir, ITEMS_FILE),
    )
    requests = pa.table(
        {
            "request_id": pa.array(event_id, pa.int64()),
            "user_id": pa.array(user, pa.int64()),
            "request_ts": pa.array(arrival_ts, pa.int64()),
            "label": pa.array(item_id, pa.int64()),
            "split": pa.array(split, pa.int8()),
        }
    )
    _write(requests, os.path.join(out_dir, requests_file("all")))
    res = ImportResult(
        out_dir=out_dir,
        ratings=n,
        users=len(np.unique(user)),
        items=len(items),
        tie_order=tie_order,
        tie_groups=int(np.sum(rank == 1)),
        tie_hidden_events=int(hidden.sum()),
        first_ts=int(event_ts.min()),
        last_ts=int(event_ts.max()),
    )
    for code in (TRAIN, VALID, TEST):
        name = SPLIT_NAMES[code]
        mask = split == code
        _write(requests.filter(pa.array(mask)), os.path.join(out_dir, requests_file(name)))
        res.requests[name] = int(mask.sum())
        res.tie_hidden_requests[name] = int(np.sum(hidden[mask] > 0))
        res.empty_history_requests[name] = int(np.sum(hist_len[mask] == 0))
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(res.as_dict(), f, indent=2)
    log.info(
        "imported %d ratings (%d users, %d items); %d requests miss same-second ratings",
        n, res.users, res.items, sum(res.tie_hidden_requests.values()),
    )
    return res


def _write(t: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(t, tmp)
    os.replace(tmp, path)


