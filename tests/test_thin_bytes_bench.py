"""bench.thin_bytes: column bytes of the shared synthetic store's two thin tables."""

from __future__ import annotations

import pyarrow.compute as pc
from deltalake import DeltaTable

from bench.thin_bytes import column_bytes, main


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
