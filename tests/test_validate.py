"""The pure validators on crafted input: each must pass what is allowed and flag what is not."""

from __future__ import annotations

import json

import pyarrow as pa

from lmat_platform.tenants import Tenant
from lmat_platform.validate import check_leakage, check_uih_commits, compare_outputs, read_commits


def _add(path: str, rows: int, *, data_change: bool = True) -> dict:
    return {"path": path, "dataChange": data_change, "stats": json.dumps({"numRecords": rows})}


def _remove(path: str, *, data_change: bool = True) -> dict:
    return {"path": path, "dataChange": data_change}


def _commit(version: int, *, add=(), remove=(), op: str | None = None, schema=None) -> dict:
    info = {"operation": "WRITE", **({"lmat.op": op} if op else {})}
    meta = None
    if schema is not None:
        meta = {
            "schemaString": json.dumps(
                {
                    "type": "struct",
                    "fields": [
                        {"name": n, "type": "long", "nullable": True, "metadata": {}}
                        for n in schema
                    ],
                }
            )
        }
    return {
        "version": version,
        "add": list(add),
        "remove": list(remove),
        "commitInfo": info,
        "metaData": meta,
    }


COLS = ["user_id", "event_id", "event_ts"]
GOOD = [
    _commit(0, add=[_add("a", 10), _add("b", 5)], op="publish", schema=COLS),
    _commit(1, add=[_add("c", 7)], op="publish"),
    _commit(
        2,
        add=[_add("ab", 15, data_change=False)],
        remove=[_remove("a", data_change=False), _remove("b", data_change=False)],
        op="compact",
    ),
    _commit(3, add=[_add("c2", 6)], remove=[_remove("c")], op="forget"),
    _commit(4, schema=[*COLS, "dwell_ms"]),  # additive schema change
]


def test_allowed_history_passes() -> None:
    rep = check_uih_commits(GOOD)
    assert rep.ok, rep.problems
    assert rep.checked == len(GOOD)


def test_remove_with_data_change_outside_forget_is_flagged() -> None:
    for op in (None, "publish", "compact", "delete"):
        bad = [*GOOD, _commit(5, add=[_add("ab2", 14)], remove=[_remove("ab")], op=op)]
        rep = check_uih_commits(bad)
        assert not rep.ok and rep.counts == {"rewrite": 1}, (op, rep.counts)
        assert "version 5" in rep.problems[0]
    # A plain delete that removes a file without adding any is flagged too.
    rep = check_uih_commits([*GOOD, _commit(5, remove=[_remove("ab")])])
    assert rep.counts == {"rewrite": 1}


def test_layout_rewrite_that_changes_row_counts_is_flagged() -> None:
    for rows_out in (14, 16, 0):
        bad = [
            *GOOD,
            _commit(
                5,
                add=[_add("ab3", rows_out, data_change=False)],
                remove=[_remove("ab", data_change=False)],
                op="compact",
            ),
        ]
        rep = check_uih_commits(bad)
        assert rep.counts == {"layout_rows": 1}, rows_out
        assert "15 -> " in rep.problems[0]
    # Mixed flags (an add that claims a data change in a rewrite) are a rewrite, not layout.
    bad = [
        *GOOD,
        _commit(5, add=[_add("ab3", 15)], remove=[_remove("ab", data_change=False)], op="compact"),
    ]
    assert check_uih_commits(bad).counts == {"rewrite": 1}


def test_add_without_data_change_outside_compaction_is_flagged() -> None:
    bad = [*GOOD, _commit(5, add=[_add("x", 3, data_change=False)], op="publish")]
    assert check_uih_commits(bad).counts == {"bad_append": 1}


def test_dropped_column_is_flagged() -> None:
    bad = [*GOOD, _commit(5, schema=["user_id", "event_id"])]
    rep = check_uih_commits(bad)
    assert rep.counts == {"schema": 1} and "event_ts" in rep.problems[0]


def test_read_commits_parses_delta_json_lines() -> None:
    text = "\n".join(
        [
            json.dumps({"commitInfo": {"operation": "WRITE", "lmat.op": "forget"}}),
            json.dumps({"add": {"path": "p1", "dataChange": True, "stats": '{"numRecords": 3}'}}),
            json.dumps({"remove": {"path": "p0", "dataChange": True}}),
            json.dumps({"txn": {"appId": "x", "version": 1}}),
        ]
    )
    commits = read_commits([(7, text), (2, json.dumps({"commitInfo": {}}))])
    assert [c["version"] for c in commits] == [2, 7]
    assert commits[1]["commitInfo"]["lmat.op"] == "forget"
    assert [a["path"] for a in commits[1]["add"]] == ["p1"]
    assert [r["path"] for r in commits[1]["remove"]] == ["p0"]
    assert check_uih_commits(commits).ok


# ----------------------------------------------------------------------------- outputs

T1 = Tenant("t", ("event_id", "item_id"), 3, actions=(1, 2), window_days=1.0)
DAY = 86_400 * 1_000_000
EVENTS = pa.table(
    {
        "event_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
        "event_ts": pa.array([10, 20, 20, 30, 40], pa.int64()) + 5 * DAY,
        "arrival_ts": pa.array([11, 21, 22, 31, 1000], pa.int64()) + 5 * DAY,
        "action": pa.array([1, 2, 1, 3, 1], pa.int16()),
    }
)


def _out(seqs: list[list[int]], lengths: list[int] | None = None) -> pa.Table:
    return pa.table(
        {
            "request_id": pa.array(range(len(seqs)), pa.int64()),
            "user_id": pa.array([1] * len(seqs), pa.int64()),
            "request_ts": pa.array([100 + 5 * DAY] * len(seqs), pa.int64()),
            "length": pa.array(lengths or [len(s) for s in seqs], pa.int32()),
            "event_id": pa.array(seqs, pa.list_(pa.int64())),
            "item_id": pa.array([[0] * len(s) for s in seqs], pa.list_(pa.int64())),
        }
    )


def test_leakage_validator_on_crafted_outputs() -> None:
    assert check_leakage(_out([[1, 2, 3], [], [3]]), EVENTS, T1).ok
    cases = {
        "future_leakage": _out([[1, 2, 5]]),  # event 5 arrived after the request time
        "action_filter": _out([[1, 4]]),  # action 3 is not the tenant's
        "ordering": _out([[3, 2]]),  # equal event_ts: ascending event_id
        "unknown_events": _out([[1, 99]]),
        "over_max_len": _out([[1, 2, 3, 1]]),
        "length_mismatch": _out([[1, 2]], lengths=[3]),
    }
    for kind, out in cases.items():
        rep = check_leakage(out, EVENTS, T1)
        assert not rep.ok and rep.counts.get(kind, 0) >= 1, (kind, rep.counts)
    old = EVENTS.set_column(1, "event_ts", pa.array([10, 20, 20, 30, 40], pa.int64()))
    rep = check_leakage(_out([[1]]), old, T1)
    assert rep.counts.get("window") == 1
    extra = _out([[1]]).append_column("surface", pa.array([[1]], pa.list_(pa.int64())))
    assert check_leakage(extra, EVENTS, T1).counts.get("unexpected_columns") == 1


def test_compare_outputs_finds_every_kind_of_difference() -> None:
    a = _out([[1, 2], [3]])
    assert compare_outputs(a, a).ok
    b = _out([[1, 2], [4]])
    rep = compare_outputs(a, b)
    assert rep.counts == {"mismatch:event_id": 1} and "request 1" in rep.problems[0]
    rep = compare_outputs(_out([[1, 2]]), a)
    assert rep.counts.get("missing_requests") == 1
    rep = compare_outputs(a.drop_columns(["item_id"]), a)
    assert rep.counts == {"missing_columns": 1}
