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
