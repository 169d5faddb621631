"""bench.recd end to end on the tiny workload (bench marker): both formats serve the same
requests, every deduplicated batch expands to the plain one, and it moves fewer bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.bench
def test_recd_bench_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(ROOT)
    from bench import recd

    out = tmp_path / "recd.json"
    recd.main(["--scale", "tiny", "--workdir", str(tmp_path / "w"), "--out", str(out),
               "--rounds", "1", "--reps", "1", "--modes", "cold"])
    res = json.loads(out.read_text())
    rows = res["results"]["cold"]
    assert set(rows) == {"short", "medium", "long"}
    for r in rows.values():
        assert r["plain"]["examples"] == r["dedup"]["examples"] > 0
        assert r["dedup"]["sequences_per_batch"] < r["plain"]["sequences_per_batch"]
        assert r["bytes_ratio"] < 1 and r["plain"]["examples_per_s"] > 0
    assert "| cold | short |" in recd.markdown(res)
