"""A real data set through the platform: import, ingest, snapshots, thin rows.

``prepare_dataset("ml-100k", root)`` leaves under ``root``::

    import/        events.parquet, items.parquet, requests-{all,train,valid,test}.parquet
    store/         the lmat store: events ingested, snapshots published through the data's time
    thin-train/    thin rows (batch path, pointer only) of the training requests
    thin-valid/    ... of the validation requests (one per user)
    thin-test/     ... of the test requests (one per user)
    prepared.json  what was built (counts, paths); its presence makes a rerun a no-op

Snapshots: ``n_snapshots`` watermarks at evenly spaced quantiles of the events' arrival times,
the last one just after the final arrival, each published the moment its watermark passes
(``published_at = watermark``). A request at T gets its head from the newest snapshot published
by T and its tail from the later tier and raw log, so every request exercises the pointer
protocol of spec section 5.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmat_platform.datasets.fetch import DATASETS, fetch_ratings
from lmat_platform.datasets.ratings import (
    EVENTS_FILE,
    ImportResult,
    TieOrder,
    import_ratings,
    read_ratings,
    requests_file,
)
from lmat_platform.exceptions import LmatError
from lmat_platform.store.ingest import IngestResult

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
PREPARED_FILE = "prepared.json"


@dataclass
class PreparedDataset:
    """Paths and counts of a data set prepared by :func:`prepare_dataset`."""

    root: str
    source: str
    store: str
    import_dir: str
    thin: dict[str, str]
    """Thin table of each split (``train``, ``valid``, ``test``)."""
    n_items: int
    """Catalogue size; item indices are 1..n_items (0 is padding)."""
    users: int
    ratings: int
    max_history: int
    """Longest H(u, T) of any request (the 'whole history' length)."""
    snapshots: int
    imported: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, root: str) -> PreparedDataset:
        """The description a previous :func:`prepare_dataset` left under ``root``."""
        path = os.path.join(root, PREPARED_FILE)
        if not os.path.exists(path):
            raise LmatError(f"{root}: not a prepared data set (no {PREPARED_FILE})")
        with open(path) as f:
            return cls(**json.load(f))


def slice_users(ratings: pa.Table, n_users: int) -> pa.Table:
    """The ratings of the ``n_users`` smallest user ids (a small, real slice for tests)."""
    users = np.unique(ratings["user_id"].to_numpy())[:n_users]
    return ratings.filter(pc.is_in(ratings["user_id"], pa.array(users)))


def snapshot_watermarks(arrival_ts: np.ndarray, n_snapshots: int) -> list[int]:
    """Strictly increasing watermarks at quantiles of ``arrival_ts``; the last is after all."""
    if n_snapshots < 1:
        raise ValueError(f"n_snapshots must be >= 1, but got {n_snapshots}")
    qs = np.quantile(arrival_ts, np.arange(1, n_snapshots) / n_snapshots).astype(np.int64)
    marks = sorted({int(q) for q in qs} | {int(arrival_ts.max()) + 1})
    return marks


def import_stage(
    source: str, root: str, *, tie_order: TieOrder = "hidden", users: int | None = None
) -> ImportResult:
    """Stage 1: fetch (a known name) or read (a file) ``source``; write ``root/import``."""
    path = fetch_ratings(source) if source in DATASETS else source
    ratings = read_ratings(path)
    if users is not None:
        ratings = slice_users(ratings, users)
    return import_ratings(ratings, os.path.join(root, "import"), tie_order=tie_order)


def ingest_stage(root: str, *, n_buckets: int = 8) -> IngestResult:
    """Stage 2: create ``root/store`` (if new) and ingest the imported events (idempotent: an
    already ingested file is skipped)."""
    from lmat_platform.exceptions import StoreNotFoundError
    from lmat_platform.store import ingest_files, init_store, open_store

    store_dir = os.path.join(root, "store")
    try:
        store = open_store(store_dir)
    except StoreNotFoundError:
        store = init_store(store_dir, n_buckets=n_buckets)
    events = os.path.join(root, "import", EVENTS_FILE)
    res = ingest_files(store, [events])
    n = pq.read_metadata(events).num_rows
    if res.skipped_files == 0 and res.accepted != n:
        raise LmatError(
            f"{events}: ingest accepted {res.accepted} of {n} events ({res.as_dict()})"
        )
    return res


def snapshot_stage(root: str, *, n_snapshots: int = 8) -> list[int]:
    """Stage 3: publish the snapshots (see the module docstring); published ones are kept."""
    from lmat_platform.store import list_snapshots, publish_snapshot

    store = os.path.join(root, "store")
    arrival = pq.read_table(os.path.join(root, "import", EVENTS_FILE), columns=["arrival_ts"])
    marks = snapshot_watermarks(arrival["arrival_ts"].to_numpy(), n_snapshots)
    have = {s.watermark for s in list_snapshots(store)}
    for w in marks:
        if w not in have:
            publish_snapshot(store, w, published_at=w)
    return marks


def thin_stage(root: str) -> dict[str, str]:
    """Stage 4: thin rows (batch path) of each split's requests; existing tables are kept."""
    from deltalake import DeltaTable

    from lmat_platform.protocol import write_thin

    thin = {}
    for s in SPLITS:
        thin[s] = os.path.join(root, f"thin-{s}")
        if not DeltaTable.is_deltatable(thin[s]):
            req = os.path.join(root, "import", requests_file(s))
            write_thin(os.path.join(root, "store"), req, thin[s], path="examples")
    return thin


def finish_stage(
    root: str, source: str, imp: ImportResult, ing: IngestResult | None, snapshots: int,
    thin: dict[str, str],
) -> PreparedDataset:
    """Stage 5: write ``prepared.json`` (what training reads)."""
    ev = pq.read_table(os.path.join(root, "import", EVENTS_FILE), columns=["user_id"])
    longest = int(np.unique(ev["user_id"].to_numpy(), return_counts=True)[1].max())
    prep = PreparedDataset(
        root=os.path.abspath(root), source=source,
        store=os.path.abspath(os.path.join(root, "store")),
        import_dir=os.path.abspath(os.path.join(root, "import")),
        thin={k: os.path.abspath(v) for k, v in thin.items()}, n_items=imp.items,
        users=imp.users, ratings=imp.ratings, max_history=longest, snapshots=snapshots,
        imported=imp.as_dict(), ingest=ing.as_dict() if ing is not None else {},
    )
    done = os.path.join(root, PREPARED_FILE)
    tmp = f"{done}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(prep.as_dict(), f, indent=2, default=str)
    os.replace(tmp, done)
    return prep


def prepare_dataset(
    source: str,
    root: str,
    *,
    tie_order: TieOrder = "hidden",
    n_snapshots: int = 8,
    n_buckets: int = 8,
    users: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PreparedDataset:
    """Fetch (a known name) or read (a file) ``source`` and build everything under ``root``:
    :func:`import_stage`, :func:`ingest_stage`, :func:`snapshot_stage`, :func:`thin_stage`,
    :func:`finish_stage`.

    ``users`` keeps only that many users (the smallest ids): a real slice for tests.
    Rerunning on a finished ``root`` returns its description without doing anything; on an
    unfinished one, it finishes the work (every stage is idempotent).
    """
    if os.path.exists(os.path.join(root, PREPARED_FILE)):
        return PreparedDataset.load(root)
    say = progress or (lambda _m: None)
    imp = import_stage(source, root, tie_order=tie_order, users=users)
    say(f"imported {imp.ratings} ratings: {imp.users} users, {imp.items} items")
    ing = ingest_stage(root, n_buckets=n_buckets)
    say(f"ingested {ing.accepted} events")
    marks = snapshot_stage(root, n_snapshots=n_snapshots)
    say(f"published {len(marks)} snapshots")
    thin = thin_stage(root)
    say("wrote thin rows of the train, valid and test requests")
    return finish_stage(root, source, imp, ing, len(marks), thin)


WINDOW_TARGETS = "window_targets"
"""Context column of a training window: how many of its newest targets to train (the label
and the history items after the previous window's label)."""


def strided_requests(requests: pa.Table, stride: int) -> pa.Table:
    """Training windows: per user, the last request and about every ``stride``-th one before
    it, each with its :data:`WINDOW_TARGETS` count, in input order.

    Requests are ordered by ``(request_ts, request_id)`` per user. Going back from the user's
    last request in steps of ``stride``, each chosen request other than the last is moved to
    the first request of its timestamp (its H(u, T) then holds every earlier rating: no rating
    between two windows is hidden from the later one by a shared second). A window's targets
    are its label plus the history items after the previous window's label (all history items
    in the user's first window), so that with the ``all``-positions loss trained on the last
    ``window_targets`` positions, every training rating is a target exactly once an epoch,
    except the same-second predecessors of each user's last request (hidden from its window).
    ``stride = 1`` keeps every request; its windows train the label only.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, but got {stride}")
    n = requests.num_rows
    user = requests["user_id"].to_numpy()
    ts = requests["request_ts"].to_numpy()
    order = np.lexsort((requests["request_id"].to_numpy(), ts, user))
    u, t = user[order], ts[order]
    idx = np.arange(n)
    last = np.ones(n, dtype=bool)
    last[:-1] = u[:-1] != u[1:]
    first = np.ones(n, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    # Position counted back from each user's last request; each user's first position.
    end = np.minimum.accumulate(np.where(last, idx, n)[::-1])[::-1] if n else idx
    start = np.maximum.accumulate(np.where(first, idx, 0)) if n else idx
    # First position of each (user, timestamp) group: H(u, T) of position i holds i - start
    # ratings when i starts its group, group_start - start otherwise.
    new_group = first.copy()
    new_group[1:] |= t[1:] != t[:-1]
    group = np.maximum.accumulate(np.where(new_group, idx, 0)) if n else idx
    grid = (end - idx) % stride == 0
    pos = np.unique(np.where(last | (stride == 1), idx, group)[grid])
    visible = group[pos] - start[pos]  # history length of each chosen window
    prev = np.empty(len(pos), dtype=np.int64)  # previous chosen window's position (or -1)
    prev[1:] = pos[:-1] - start[pos[:-1]]
    newu = np.ones(len(pos), dtype=bool)
    newu[1:] = u[pos[1:]] != u[pos[:-1]]
    prev[newu] = -1
    targets = np.maximum(visible - prev - 1, 0) + 1
    keep = np.zeros(n, dtype=bool)
    keep[order[pos]] = True
    count = np.zeros(n, dtype=np.int32)
    count[order[pos]] = targets
    out = requests.filter(pa.array(keep))
    col = pa.array(count[keep])
    if WINDOW_TARGETS in out.column_names:
        return out.set_column(out.schema.get_field_index(WINDOW_TARGETS), WINDOW_TARGETS, col)
    return out.append_column(WINDOW_TARGETS, col)


def training_thin(prep: PreparedDataset, stride: int) -> str:
    """Thin table of the training windows chosen by :func:`strided_requests` (built once;
    its rows carry :data:`WINDOW_TARGETS`)."""
    from deltalake import DeltaTable

    from lmat_platform.protocol import write_thin

    if stride < 1:
        raise ValueError(f"stride must be >= 1, but got {stride}")
    out = os.path.join(prep.root, f"thin-train-w{stride}")
    if DeltaTable.is_deltatable(out):
        return out
    src = pq.read_table(os.path.join(prep.import_dir, requests_file("train")))
    req = os.path.join(prep.root, "import", f"requests-train-w{stride}.parquet")
    tmp = f"{req}.tmp-{os.getpid()}"
    pq.write_table(strided_requests(src, stride), tmp)
    os.replace(tmp, req)
    write_thin(prep.store, req, out, path="examples")
    return out


def import_result(root: str) -> ImportResult:
    """The :class:`ImportResult` that :func:`import_stage` recorded under ``root``."""
    from lmat_platform.datasets.ratings import META_FILE

    path = os.path.join(root, "import", META_FILE)
    if not os.path.exists(path):
        raise LmatError(f"{root}: nothing imported yet (no {path})")
    with open(path) as f:
        return ImportResult(**json.load(f))


def snapshot_count(root: str) -> int:
    """Snapshots published in ``root``'s store."""
    from lmat_platform.store import list_snapshots

    return len(list_snapshots(os.path.join(root, "store")))
