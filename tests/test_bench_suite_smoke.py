"""The benchmark suite runs end to end at tiny scale, so it cannot rot (issue 6).

It runs ``python -m bench.suite --scale tiny`` in a subprocess (as a user would), then checks
that the JSON has every section, that every peer was verified equal to the lmat reader before
it was timed, and that the markdown table and plots were written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SECTIONS = (
    "machine",
    "workload",
    "paper_metrics",
    "peers",
    "limits",
    "scaling",
    "ablations",
    "targets",
)


@pytest.mark.timeout(120)
def test_bench_suite_tiny(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.suite",
            "--scale",
            "tiny",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## Targets" in proc.stdout  # the table is printed
    res = json.loads((out / "results.json").read_text())
    for s in SECTIONS:
        assert s in res, f"section {s} missing"
    m = res["machine"]
    assert m["cpu_count"] and m["versions"]["pyarrow"] and m["versions"]["numpy"]

    tenants = res["peers"]["tenants"]
    assert set(tenants) == {"short", "medium", "long"}
    for name, r in tenants.items():
        assert r["lmat"]["examples"] == res["workload"]["requests"]
        for peer in ("fat", "duckdb", "polars", "naive_delta"):
            assert r[peer]["verified"], f"{peer}/{name}: {r[peer].get('diff')}"
            assert r[peer]["examples_per_s"] > 0
        if "lance" in r:
            assert r["lance"]["verified"], r["lance"].get("diff")
        pm = res["paper_metrics"]["tenants"][name]
        assert pm["ratios_lmat_over_fat"]["examples_per_s"] > 0
        assert res["limits"][name]["fraction_of_memcpy"] > 0
        assert res["ablations"]["affinity"][name]["off"]["examples"] > 0
        assert res["ablations"]["prefetch"][name]["with_step"]["on_seconds"] > 0

    assert res["paper_metrics"]["bytes_written"]["per_day"]
    assert len(res["scaling"]["history"]) >= 2 and res["scaling"]["requests"]
    assert res["scaling"]["onboarding"]["speedup"] > 0
    assert all({"target", "measured", "goal", "met"} <= set(t) for t in res["targets"])
    assert (out / "results.md").read_text().startswith("# lmat benchmark suite")
    assert all((out / p).is_file() for p in res["plots"]), res["plots"]


# The cold-pass benchmark (issue 16, ``bench/cold_pass.py``) end to end at tiny scale: every
# reader row, the first-batch rows and the data stall reported, every reader on the same requests.
@pytest.mark.bench
def test_cold_pass_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.chdir(ROOT)
    from bench import cold_pass
    from bench.workload import TENANTS

    out = tmp_path / "cold.json"
    assert cold_pass.main(["--scale", "tiny", "--workdir", str(tmp_path / "w"), "--rounds", "1",
                           "--reps", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    for t in TENANTS:
        row = res["table"][t.name]
        assert all(row[r] > 0 for r in cold_pass.READERS)
        assert all(row[f"lmat_cold_w{w}_first_batch_s"] > 0 for w in (0, 2))
        # Every reader served the same requests.
        n = {res["runs"][t.name][r][0]["examples"] for r in cold_pass.READERS}
        assert len(n) == 1 and n.pop() > 0
        n_served = res["runs"][t.name]["lmat_cold_w0"][0]["examples"]
        for w in ("w0", "w1", "w2"):
            assert 0 <= res["stall"][t.name][w]["wait_share"] < 1
        bd = res["breakdown"][t.name]
        assert bd["examples"] == n_served and bd["pass_s"] > 0
        assert abs(sum(bd["stages_s"].values()) - bd["pass_s"]) < 1e-6
        assert row["lmat_cold_w0_import_s"] > 0 and row["lmat_cold_w0_first_batch_cpu_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "**warm**" in md and "cache off" in md
