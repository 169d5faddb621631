"""bench.thin_bytes: column bytes of the shared synthetic store's two thin tables."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from bench.thin_bytes import column_bytes, decode_cpu, main, sweep, sweep_markdown


def test_streaming_counts_each_stored_tail_event(synth_store_ro, capsys) -> None:
    log_t = column_bytes(synth_store_ro.thin_log)
    batch_t = column_bytes(synth_store_ro.thin_batch)
    rows = DeltaTable(synth_store_ro.thin_log).to_pyarrow_table(columns=["tail_item_id"])
    stored = pc.sum(pc.list_value_length(rows.column("tail_item_id"))).as_py()
    assert log_t["requests"] == rows.num_rows
    assert abs(log_t["tail_events_stored_per_request"] * rows.num_rows - stored) < 1e-6
    assert batch_t["tail_events_stored_per_request"] == 0
    assert "bytes_per_stored_tail_event" not in batch_t
    # Streaming rows carry their tails; batch rows do not.
    assert log_t["columns_per_request"]["tail_item_id"] > batch_t["columns_per_request"]["tail_item_id"]
    assert main([synth_store_ro.thin_log, synth_store_ro.thin_batch]) == 0
    assert "first / second" in capsys.readouterr().out


def test_not_a_delta_table(tmp_path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    assert "not a Delta table" in capsys.readouterr().err


def test_bytes_split_into_pointers_tail_events_and_file_overhead(synth_store_ro) -> None:
    """Streaming bytes a request = pointer and request columns + (tail events stored a
    request) x (bytes a stored event) + file overhead: every column counted once."""
    for t in (synth_store_ro.thin_log, synth_store_ro.thin_batch):
        r = column_bytes(t)
        parts = (r["pointer_and_request_bytes_per_request"] + r["tail_event_bytes_per_request"]
                 + r["file_overhead_per_request"])
        assert abs(parts - r["file_bytes_per_request"]) < 1e-6
        assert r["file_overhead_per_request"] > 0
    log_t = column_bytes(synth_store_ro.thin_log)
    per_event = sum(log_t["bytes_per_stored_tail_event"].values())
    assert abs(log_t["tail_events_stored_per_request"] * per_event
               - log_t["tail_event_bytes_per_request"]) < 1e-6
    # Format 3: arrival times as delays; the null tail_arrival_ts lists cost next to nothing.
    each = log_t["bytes_per_stored_tail_event"]
    assert each["arrival_delay"] > 10 * each.get("arrival_ts", 0.0)


def test_decode_cpu_times_each_table(synth_store_ro, capsys) -> None:
    got = decode_cpu([synth_store_ro.thin_log, synth_store_ro.thin_batch],
                     ["item_id", "arrival_ts"], reps=2)
    assert [g["table"] for g in got] == [synth_store_ro.thin_log, synth_store_ro.thin_batch]
    assert all(len(g["cpu_s_all"]) == 2 and g["cpu_s_median"] > 0 for g in got)
    assert main([synth_store_ro.thin_log, "--decode", "item_id", "--reps", "1"]) == 0
    assert "decode CPU (item_id)" in capsys.readouterr().out


def test_bad_arguments(capsys) -> None:
    assert main([]) == 2
    assert "give thin tables" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--sweep", "10,x"])
    assert e.value.code == 2
    assert main(["--sweep", "10", "--days", "1"]) == 2


@pytest.mark.slow
def test_sweep_fewer_stored_events_a_request_at_higher_density(tmp_path) -> None:
    rows = sweep(tmp_path, [150, 600], days=2, snapshot_hours=4, scale="tiny")
    lo, hi = rows
    assert lo["requests_per_day"] == 150 and hi["requests_per_day"] == 600
    assert hi["batch"]["requests"] == 4 * lo["batch"]["requests"] == 1200
    # Each user's tail events are stored once per file: more requests share them.
    e_lo, e_hi = (r["streaming"]["tail_events_stored_per_request"] for r in rows)
    assert 0 < e_hi < e_lo
    for r in rows:
        assert r["streaming_merged"]["files"] <= r["streaming"]["files"]
        assert r["streaming_merged"]["requests"] == r["streaming"]["requests"]
        assert abs(r["ratio"] - r["streaming"]["file_bytes_per_request"]
                   / r["batch"]["file_bytes_per_request"]) < 1e-9
    assert "| 600 (" in sweep_markdown(rows)
