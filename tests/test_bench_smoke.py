"""The reader benchmark runs end to end at tiny scale (parity check included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_reader_bench_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(ROOT)
    from bench import bench_reader

    out = tmp_path / "bench.json"
    assert bench_reader.main(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    res = json.loads(out.read_text())
    assert {r["tenant"] for r in res["results"]} == {"short", "medium", "long"}
    assert {r["reader"] for r in res["results"]} == {"seq", "fat"}
    for r in res["results"]:
        assert r["examples"] == res["setup"]["requests"]
        assert r["bytes_read"] > 0 and r["peak_rss_mib"] > 0
    assert all(n > 0 for n in res["parity_checked"].values())
