"""The ``lmat`` command (spec section 8): one-line JSON on success; on bad input a non-zero exit,
exactly one line on stderr naming the file, column or argument, no traceback, store unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmat_platform.cli import main
from lmat_platform.store import open_store
from tests.helpers import (
    REPO,
    events_table,
    one_line_error,
    package_without_numba_cache,
    run_lmat,
    run_main,
    table_versions,
    tree,
    write_events,
)


def _ev(eid: int, arr: int = 20, **kw: object) -> dict[str, object]:
    return {
        "user_id": 1,
        "event_id": eid,
        "event_ts": arr - 5,
        "arrival_ts": arr,
        "item_id": 3,
        "action": 1,
        **kw,
    }


@pytest.fixture
def cli_store(tmp_path: Path) -> str:
    """A store with one ingested file (with a float32 trait) and one snapshot at 100."""
    root = str(tmp_path / "store")
    assert main(["init", root, "--buckets", "2", "--row-group-rows", "64"]) == 0
    f = write_events(
        tmp_path / "day0.parquet", [_ev(1, dwell_ms=1.5), _ev(2, arr=150)], traits=["dwell_ms"]
    )
    assert main(["ingest", root, f]) == 0
    assert main(["snapshot", root, "--watermark", "100", "--published-at", "110"]) == 0
    return root


def run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    return run_main(capsys, args)


def test_success_prints_one_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMAT_QUIET", "1")
    root = str(tmp_path / "s")
    code, out, _ = run(capsys, ["init", root, "--buckets", "2"])
    assert code == 0 and json.loads(out)["n_buckets"] == 2 and len(out.splitlines()) == 1
    f = write_events(
        tmp_path / "a.parquet",
        [_ev(1), _ev(1), {**_ev(2), "event_ts": 30}, {**_ev(3), "item_id": None}],
    )
    code, out, _ = run(capsys, ["ingest", root, f])
    assert code == 0 and len(out.splitlines()) == 1
    res = json.loads(out)
    assert (res["accepted"], res["duplicates"], res["quarantined_total"]) == (1, 1, 2)
    assert res["quarantined"] == {
        "null_required_column": 1,
        "event_ts_after_arrival_ts": 1,
        "behind_watermark": 0,
    }
    raw = open_store(root).open_table("raw")
    assert raw is not None and res["version"] == raw.version()
    code, out, _ = run(capsys, ["snapshot", root, "--watermark", "50"])
    assert code == 0 and json.loads(out) | {"created_at": 0} == {
        "snapshot_id": 0,
        "watermark": 50,
        "published_at": 50,
        "uih_version": 0,
        "events": 1,
        "created_at": 0,
    }
    code, out, _ = run(capsys, ["info", root])
    assert code == 0 and json.loads(out)["snapshots"] == 1
    code, out, _ = run(capsys, ["validate", root])
    assert code == 0 and json.loads(out)["ok"] is True


def _not_parquet(tmp: Path) -> str:
    p = tmp / "notes.parquet"
    p.write_text("user_id,event_id\n1,2\n")
    return str(p)


def _missing_column(tmp: Path) -> str:
    t = events_table([_ev(10, arr=200)]).drop_columns(["action"])
    pq.write_table(t, tmp / "no-action.parquet")
    return str(tmp / "no-action.parquet")


def _changed_trait(tmp: Path) -> str:
    t = events_table([_ev(10, arr=200, dwell_ms=2.0)], traits=["dwell_ms"])
    t = t.set_column(6, "dwell_ms", t.column("dwell_ms").cast(pa.float64()))
    pq.write_table(t, tmp / "dwell64.parquet")
    return str(tmp / "dwell64.parquet")


def _changed_required(tmp: Path) -> str:
    t = events_table([_ev(10, arr=200)])
    t = t.set_column(4, "item_id", t.column("item_id").cast(pa.string()))
    pq.write_table(t, tmp / "item-str.parquet")
    return str(tmp / "item-str.parquet")


BAD_INGESTS: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "missing_required_column": (_missing_column, ("no-action.parquet", "'action'")),
    "trait_type_changed": (_changed_trait, ("dwell64.parquet", "'dwell_ms'", "float")),
    "required_type_changed": (_changed_required, ("item-str.parquet", "'item_id'")),
    "not_parquet": (_not_parquet, ("notes.parquet", "Parquet")),
    "missing_file": (lambda tmp: str(tmp / "nope.parquet"), ("nope.parquet", "does not exist")),
}


@pytest.mark.parametrize("case", sorted(BAD_INGESTS))
def test_bad_ingest_input(
    case: str, cli_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, names = BAD_INGESTS[case]
    bad = make(tmp_path)
    good = write_events(tmp_path / "good.parquet", [_ev(50, arr=300)])
    st = open_store(cli_store)
    versions, files = table_versions(st), tree(cli_store)
    code, out, err = run(capsys, ["ingest", cli_store, good, bad])
    assert code != 0 and out == ""
    line = one_line_error(err)
    for n in names:
        assert n in line, (n, line)
    assert table_versions(st) == versions
    assert tree(cli_store) == files


def test_bad_snapshot_arguments(cli_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    st = open_store(cli_store)
    versions, files = table_versions(st), tree(cli_store)
    cases = [
        (["--watermark", "100"], ("--watermark", "100", "does not increase")),
        (["--watermark", "99"], ("--watermark", "99")),
        (["--watermark", "200", "--published-at", "150"], ("--published-at", "150")),
        (["--watermark", "200", "--published-at", "105"], ("--published-at", "105")),
        (["--watermark", "soon"], ("--watermark", "soon")),
        ([], ("--watermark",)),
    ]
    for extra, names in cases:
        code, out, err = run(capsys, ["snapshot", cli_store, *extra])
        assert code != 0 and out == ""
        line = one_line_error(err)
        for n in names:
            assert n in line, (extra, line)
    assert table_versions(st) == versions and tree(cli_store) == files


def test_store_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "no-store")
    f = write_events(tmp_path / "a.parquet", [_ev(1)])
    for args in (
        ["ingest", missing, f],
        ["snapshot", missing, "--watermark", "5"],
        ["forget", missing, "--user", "1"],
        ["info", missing],
        ["vacuum", missing],
        ["log", missing, f, "--out", str(tmp_path / "thin")],
    ):
        code, out, err = run(capsys, args)
        assert code != 0 and out == ""
        assert missing in one_line_error(err), args
    assert not Path(missing).exists()
    assert not (tmp_path / "thin").exists()


def test_init_over_an_existing_store_is_refused(
    cli_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    files = tree(cli_store)
    code, _, err = run(capsys, ["init", cli_store])
    assert code != 0 and cli_store in one_line_error(err)
    assert tree(cli_store) == files


def test_bad_input_in_a_real_process(cli_store: str, tmp_path: Path) -> None:
    """The installed command: exit code 2, one line, no traceback, store unchanged."""
    st = open_store(cli_store)
    versions, files = table_versions(st), tree(cli_store)
    bad = _changed_trait(tmp_path)
    for args, name in (
        (["ingest", cli_store, bad], "dwell64.parquet"),
        (["ingest", cli_store, _not_parquet(tmp_path)], "notes.parquet"),
        (["snapshot", cli_store, "--watermark", "7"], "--watermark"),
        (["ingest", str(tmp_path / "nowhere"), bad], "nowhere"),
    ):
        r = run_lmat(*args)
        assert r.returncode == 2, r
        assert r.stdout == ""
        assert name in one_line_error(r.stderr)
    assert table_versions(st) == versions and tree(cli_store) == files


def test_forget_takes_several_ids_after_one_user_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13, defect 3: ``--user 1 2 3`` (the spec's form) and ``--user 1 --user 2`` both
    work, and may be mixed; a non-integer id is refused naming the argument, nothing changed."""
    monkeypatch.setenv("LMAT_QUIET", "1")
    root = str(tmp_path / "s")
    assert main(["init", root, "--buckets", "2", "--row-group-rows", "64"]) == 0
    rows = [{**_ev(10 * u + i, arr=20 + i), "user_id": u} for u in range(1, 7) for i in range(2)]
    assert main(["ingest", root, write_events(tmp_path / "a.parquet", rows)]) == 0

    def users_left() -> set[int]:
        raw = open_store(root).read_table("raw")
        assert raw is not None
        return set(raw.column("user_id").to_pylist())

    code, out, err = run(capsys, ["forget", root, "--user", "1", "2", "3"])
    assert code == 0, err
    assert json.loads(out)["users"] == 3 and users_left() == {4, 5, 6}
    code, out, err = run(capsys, ["forget", root, "--user", "4", "--user", "5"])
    assert code == 0, err
    assert json.loads(out)["users"] == 2 and users_left() == {6}
    before, files = table_versions(open_store(root)), tree(root)
    code, _, err = run(capsys, ["forget", root, "--user", "6", "x"])
    assert code == 2 and "--user" in one_line_error(err) and "'x'" in err
    assert table_versions(open_store(root)) == before and tree(root) == files
    code, _, err = run(capsys, ["forget", root, "--user"])
    assert code == 2 and "--user" in one_line_error(err)


# --- start-up: each command imports only what it uses ------------------------------------

#: Imported by no command that only parses arguments, reads the store's metadata or checks
#: its log: machine learning, orchestration and the distributed engine.
_NEVER_LIGHT = ("torch", "dagster", "ray", "polars", "great_expectations", "matplotlib")

_PROBE = """
import json, sys
from lmat_platform.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if "." not in m)}),
      file=sys.stderr)
"""


def _imports_of(*args: str) -> tuple[int, set[str]]:
    """Run ``lmat ARGS`` in a fresh interpreter: (exit code, top-level modules it imported)."""
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                       cwd=REPO, timeout=120, env={**os.environ, "LMAT_QUIET": "1"})
    probe = json.loads(r.stderr.strip().splitlines()[-1])
    return probe["code"], set(probe["modules"])


def test_help_imports_nothing_heavy() -> None:
    """``lmat --help`` (and an argument error) parse arguments only: no torch, Dagster or Ray,
    nor pyarrow, deltalake, numba or pandas (the old package imported the whole API first)."""
    for args in (["--help"], ["snapshot", "--help"], ["no-such-command"]):
        code, mods = _imports_of(*args)
        assert code == (0 if "--help" in args else 2), args
        heavy = mods & {*_NEVER_LIGHT, "pyarrow", "deltalake", "numba", "pandas", "numpy"}
        assert not heavy, (args, sorted(heavy))


def test_store_commands_import_only_the_store(cli_store: str) -> None:
    """``lmat info`` and ``lmat validate`` need pyarrow and deltalake, not torch, Dagster or
    Ray, nor the compiled kernels (numba): they read the registry and the tier's log only;
    ``validate`` reads no Parquet, so not pyarrow's dataset module (and pandas) either."""
    for args in (["info", cli_store], ["validate", cli_store]):
        code, mods = _imports_of(*args)
        assert code == 0, args
        assert {"pyarrow", "deltalake"} <= mods, args  # the probe sees real imports
        unwanted = mods & {*_NEVER_LIGHT, "numba"}
        assert not unwanted, (args, sorted(unwanted))
    # validate reads the tier's Delta log only: no pyarrow dataset (which imports pandas).
    assert "pandas" not in mods


def test_public_api_loads_on_first_use() -> None:
    """Every public name of ``lmat_platform`` and ``lmat_platform.store`` resolves to the
    object its module defines; an unknown name is an AttributeError."""
    import lmat_platform
    import lmat_platform.reader
    import lmat_platform.store
    import lmat_platform.store.core

    for pkg in (lmat_platform, lmat_platform.store):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, (pkg.__name__, name)
        assert set(pkg.__all__) <= set(dir(pkg))
        with pytest.raises(AttributeError, match="no_such_name"):
            pkg.no_such_name  # noqa: B018
    assert lmat_platform.SequenceLoader is lmat_platform.reader.SequenceLoader
    assert lmat_platform.open_store is lmat_platform.store.core.open_store
    from lmat_platform import Batch, write_thin  # the ``from`` form goes through the same hook

    assert Batch is lmat_platform.reader.Batch and callable(write_thin)
    # Submodules are attributes of a freshly imported package, as with the eager imports
    # (``lmat.store.Store`` in annotations, ``lmat.tenants.SummarySpec``), and load on use.
    code = ("import sys, lmat_platform as lmat\n"
            "assert 'pyarrow' not in sys.modules and 'numba' not in sys.modules\n"
            "assert lmat.tenants.SummarySpec and lmat.store.Store and lmat.store.uih.STRIPES\n"
            "assert lmat.LmatError is lmat.exceptions.LmatError\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_kernel_modules_find_a_cache_folder_when_imported_first(tmp_path: Path) -> None:
    """The package no longer imports ``numba_cache`` up front, so each module that defines
    cached kernels must reach it before its kernels are defined: imported first, in a process
    where numba's own cache folders are unwritable, each imports (numba alone raises 'no
    locator available')."""
    pkg, env = package_without_numba_cache(tmp_path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    kernel_modules = sorted(
        "lmat_platform." + ".".join(p.relative_to(pkg / "lmat_platform").with_suffix("").parts)
        for p in (pkg / "lmat_platform").rglob("*.py") if "cache=True" in p.read_text())
    assert {"lmat_platform.kernels", "lmat_platform.store.heads"} <= set(kernel_modules)
    for mod in kernel_modules:
        r = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, (mod, r.stderr[-2000:])
        assert r.stdout.startswith(str(pkg)), r.stdout


def test_info_counts_every_table_of_the_store(
    cli_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lmat info`` counts the bytes of every Delta table in the store, also those of tiers
    written later (the summary tier's tables), and only Delta tables."""
    from deltalake import write_deltalake

    write_deltalake(os.path.join(cli_store, "summaries"), pa.table({"user_id": [1, 2]}))
    os.makedirs(os.path.join(cli_store, "not_a_table"))
    Path(cli_store, "not_a_table", "x.bin").write_bytes(b"x" * 100)
    code, out, err = run(capsys, ["info", cli_store])
    assert code == 0, err
    sizes = json.loads(out)["bytes"]
    on_disk = sum(p.stat().st_size for p in Path(cli_store, "summaries").rglob("*") if p.is_file())
    assert sizes["summaries"] == on_disk > 0
    assert "not_a_table" not in sizes and sizes["uih"] > 0 and sizes["forgotten"] == 0
