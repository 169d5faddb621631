"""``lmat demo`` end to end at the tiny scale (about five seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmat_platform.demo import format_summary, run_demo
from lmat_platform.exceptions import LmatError


def test_tiny_demo_runs_and_checks_parity(tmp_path: Path) -> None:
    s = run_demo(tmp_path / "demo", scale="tiny", days=2)
    assert s["ok"] is True
    assert set(s["parity"]) == {"retrieval", "ranking"}
    for name, p in s["parity"].items():
        assert p["streaming_vs_batch"] and p["vs_reference_sample"], name
        assert p["future_leakage"] == 0 and p["events"] > 0
    assert s["accepted"] > 0 and s["snapshots"] > 0 and s["requests"] > 0
    assert sum(s["quarantined"].values()) > 0 and s["duplicates"] > 0
    assert s["fat_union_bytes"] > 0 and s["thin_bytes_batch"] > 0
    text = format_summary(s)
    assert "OK" in text and "quarantined" in text
    # The demo folder is recreated on a second run; a foreign folder is never deleted.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(LmatError, match="not made by 'lmat demo'"):
        run_demo(foreign, scale="tiny", days=2)
    assert (foreign / "keep.txt").exists()
