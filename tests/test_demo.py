"""``lmat demo`` end to end at the tiny scale: parity, where it put things, the reader line it
prints, and a storage line that counts every byte each path keeps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lmat_platform.demo import run_demo, ui_command
from lmat_platform.exceptions import LmatError
from tests.demo_fixtures import TinyDemo, build_tiny_demo, clean_env


def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> TinyDemo:
    return build_tiny_demo(tmp_path_factory)


def test_tiny_demo_prints_paths_reader_line_and_honest_storage(demo: TinyDemo) -> None:
    s, err, d = demo.summary, demo.stderr, demo.dir
    assert s["ok"] is True and s["parity_ok"] is True
    assert s["accepted"] > 0 and s["snapshots"] > 0 and s["requests"] > 0
    assert sum(s["quarantined"].values()) > 0 and s["duplicates"] > 0

    # Where things are: every path it names exists and is printed.
    for key in ("store", "thin_log", "thin_examples", "tenants_file", "landing"):
        assert Path(s[key]).exists(), key
        assert s[key] in err, f"{key} not in the printed summary"
    assert (Path(s["thin_log"]) / "_delta_log").is_dir()
    assert (Path(s["thin_examples"]) / "_delta_log").is_dir()
    # Landed as the Dagster assets expect (LANDING/events/DATE.parquet), so `lmat ui` can serve it.
    assert sorted(p.name for p in (d / "landing" / "events").glob("*.parquet")) == [
        "2023-11-15.parquet",
        "2023-11-16.parquet",
    ]
    assert "Browse it in the Dagster UI: lmat ui\n" in err + "\n"  # made in ./lmat-demo

    # The storage line counts every byte under the store and each path's thin table.
    st = s["storage"]
    assert st["store_on_disk"] == _tree_bytes(Path(s["store"]))
    assert sum(st["store_tables_on_disk"].values()) == st["store_on_disk"]
    for name, thin in (("streaming", "thin_log"), ("batch", "thin_examples")):
        p = st["paths"][name]
        assert p["thin_bytes"] == _tree_bytes(Path(s[thin]))
        assert p["total_bytes"] == st["store_on_disk"] + p["thin_bytes"]
        assert p["fat_over_total"] == round(st["fat_union_bytes"] / p["total_bytes"], 2)
        assert p["live_total_bytes"] <= p["total_bytes"]
    assert st["fat_union_bytes"] == (d / "fat_union.parquet").stat().st_size
    assert "fat is" in err and "streaming path" in err and "batch path" in err

    # The reader line, pasted into a shell from another folder, reads a batch.
    line = err.split("(paste into a shell):\n", 1)[1].splitlines()[0].strip()
    assert line == s["reader_command"]
    r = subprocess.run(["bash", "-c", line], cwd=demo.cwd.parent, env=clean_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("512 requests; lengths ["), r.stdout


def test_ui_command_names_a_demo_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ui_command(str(tmp_path / "lmat-demo")) == "lmat ui"
    assert ui_command(str(tmp_path / "x y")) == f"lmat ui --demo '{tmp_path}/x y'"


def test_demo_refuses_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(LmatError, match="not made by 'lmat demo'"):
        run_demo(foreign, scale="tiny", days=2)
    assert (foreign / "keep.txt").exists()
