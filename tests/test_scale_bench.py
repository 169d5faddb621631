"""The scale benchmark (issue 15) runs end to end at a tiny size and reports every measure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.bench
@pytest.mark.timeout(1800)  # about 4 min on an idle 2-core machine; much more under load
def test_scale_bench_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(ROOT)
    from bench import scale

    out = tmp_path / "scale.json"
    assert scale.main(["--events", "60000", "--steps", "20000,60000", "--users", "500",
                       "--chunk", "20000", "--batch", "2000", "--requests", "100",
                       "--keep-stores", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    steps = res["steps"]
    assert [s["events"] >= t for s, t in zip(steps, (20000, 60000), strict=True)] == [True, True]
    for s in steps:
        assert s["ingest"]["accepted"] == 2000 - 20 and s["ingest"]["duplicates"] == 20
        assert s["ingest"]["dedup_read"]["row_groups_read"] >= 1
        assert s["publish"]["events"] == 2000 - 20
        assert set(s["read"]) == {"256", "2048", "16384"}
        assert all(r["examples"] == 100 for r in s["read"].values())
        # The loader's count of tier bytes is backed by what the process really read.
        assert all(r["io_read_bytes_per_example"] >= r["bytes_per_example"] > 0
                   for r in s["read"].values())
        assert s["bytes_per_event"]["live"]["uih"] > 0 and s["peak_rss_mb"] > 0
    assert (tmp_path / "scale.png").exists()

    # The kept stores, measured interleaved: the same hour into each, ratios to the smallest.
    kept = [s["kept_store"] for s in steps]
    assert scale.main(["--compare", ",".join(kept), "--users", "500", "--batch", "2000",
                       "--hours", "1", "--work", str(tmp_path / "c"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["steps"] == steps  # kept beside the comparison
    cmp = res["compare"]["stores"]
    assert [c["events_at_start"] for c in cmp] == [s["events"] for s in steps]  # kept intact
    assert all(c["events"] > c["events_at_start"] for c in cmp)
    for c in cmp:
        assert len(c["ingest_s_all"]) == len(c["publish_s_all"]) == 1
        assert c["dedup_read"]["ids"] == 2000
        assert all(0 < n <= 500 for n in c["touched_users"])
        assert all(r >= 0 for r in c["latest_rows_read"])
    assert cmp[0]["ingest_ratio"] == 1.0 and cmp[1]["ingest_ratio"] > 0
