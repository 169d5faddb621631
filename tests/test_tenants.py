"""Tenants (spec section 6): YAML declarations, validation errors naming tenant and field, and
projection pushdown (a short-history tenant reads far fewer bytes than a long one)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmat_platform.exceptions import TenantError
from lmat_platform.reconstruct import iter_reconstruct
from lmat_platform.schema import MICROS_PER_DAY
from lmat_platform.store import compact_buckets
from lmat_platform.tenants import Tenant, load_tenants, union_tenant
from tests.conftest import SynthStore
from tests.helpers import one_line_error, run_main

SPEC_YAML = """\
tenants:
  - name: retrieval
    columns: [item_id, action]
    max_len: 256
    actions: [1, 2]
  - name: ranking
    columns: [item_id, action, event_ts, dwell_ms]
    max_len: 8192
    window_days: 365
"""


def test_spec_example_loads(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(SPEC_YAML)
    t = load_tenants(str(p))
    assert list(t) == ["retrieval", "ranking"]
    assert t["retrieval"] == Tenant("retrieval", ("item_id", "action"), 256, actions=(1, 2))
    assert t["ranking"].window_us == 365 * MICROS_PER_DAY
    assert t["ranking"].actions is None and t["retrieval"].window_days is None
    u = union_tenant(t.values())
    assert u.columns == ("item_id", "action", "event_ts", "dwell_ms")
    assert u.max_len == 8192 and u.actions is None and u.window_days is None


BAD = {
    "zero_max_len": ("- {name: a, columns: [item_id], max_len: 0}", ("'a'", "max_len")),
    "negative_max_len": ("- {name: a, columns: [item_id], max_len: -3}", ("'a'", "max_len")),
    "string_max_len": ("- {name: a, columns: [item_id], max_len: many}", ("'a'", "max_len")),
    "bool_max_len": ("- {name: a, columns: [item_id], max_len: true}", ("'a'", "max_len")),
    "empty_actions": (
        "- {name: b, columns: [item_id], max_len: 5, actions: []}",
        ("'b'", "actions"),
    ),
    "text_actions": (
        "- {name: b, columns: [item_id], max_len: 5, actions: [click]}",
        ("'b'", "actions"),
    ),
    "zero_window": (
        "- {name: c, columns: [item_id], max_len: 5, window_days: 0}",
        ("'c'", "window_days"),
    ),
    "no_columns": ("- {name: d, columns: [], max_len: 5}", ("'d'", "columns")),
    "twice_column": ("- {name: d, columns: [item_id, item_id], max_len: 5}", ("'d'", "columns")),
    "unknown_field": (
        "- {name: e, columns: [item_id], max_len: 5, colour: red}",
        ("'e'", "colour"),
    ),
    "no_name": ("- {columns: [item_id], max_len: 5}", ("name",)),
    "declared_twice": (
        "- {name: f, columns: [item_id], max_len: 5}\n  - {name: f, columns: [action], max_len: 5}",
        ("'f'", "twice"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_tenant_is_a_one_line_error_naming_tenant_and_field(
    case: str, tmp_path: Path
) -> None:
    body, names = BAD[case]
    p = tmp_path / "t.yaml"
    p.write_text("tenants:\n  " + body + "\n")
    with pytest.raises(TenantError) as ei:
        load_tenants(str(p))
    msg = str(ei.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg, (case, msg)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("tenants: [ {name: a, columns: [item_id], max_len: 5 ]\n", ("not valid YAML",)),
        ("tenants:\n  - name: a\n   columns: [x]\n", ("not valid YAML", "line")),
        ("- just a list\n", ("tenants",)),
        ("tenants: []\n", ("tenants",)),
    ],
)
def test_tenant_file_that_does_not_parse(text: str, names: tuple[str, ...], tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(TenantError) as ei:
        load_tenants(str(p))
    assert str(p) in str(ei.value)
    for n in names:
        assert n in str(ei.value)


def test_materialize_with_bad_tenants_writes_nothing(
    synth_store_ro: SynthStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = synth_store_ro
    out = tmp_path / "out.parquet"
    good = tmp_path / "good.yaml"
    good.write_text(
        "tenants:\n  - {name: ok, columns: [item_id], max_len: 5}\n"
        "  - {name: odd, columns: [item_id, colour], max_len: 5}\n"
    )
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tenants: [\n")
    zero = tmp_path / "zero.yaml"
    zero.write_text("tenants:\n  - {name: z, columns: [item_id], max_len: 0}\n")
    cases = [
        (good, "odd", ("tenant 'odd'", "columns", "'colour'")),
        (good, "missing", ("--tenant", "'missing'")),
        (bad_yaml, "ok", ("bad.yaml", "YAML")),
        (zero, "z", ("tenant 'z'", "max_len")),
        (tmp_path / "absent.yaml", "ok", ("absent.yaml",)),
    ]
    for path, name, names in cases:
        code, stdout, err = run_main(
            capsys,
            [
                "materialize",
                s.store_path,
                s.thin_log,
                "--tenants",
                str(path),
                "--tenant",
                name,
                "--out",
                str(out),
            ],
        )
        assert code == 2 and stdout == ""
        line = one_line_error(err)
        for n in names:
            assert n in line, (name, line)
        assert not out.exists()
        assert not list(tmp_path.glob("out.parquet*"))


def _bytes_read(store, thin: str, tenant: Tenant) -> int:
    return sum(p.bytes_read for p in iter_reconstruct(store, thin, tenant))


def test_restrictions_are_pushed_into_the_read(synth_store: SynthStore) -> None:
    s = synth_store
    store = s.store
    compact_buckets(store)
    long_ = Tenant("long", ("item_id", "action", "event_ts", "dwell_ms", "surface"), 100_000)
    short = Tenant("short", ("item_id",), 1)
    few_cols = Tenant("few", ("item_id",), 100_000)
    windowed = Tenant(
        "win", ("item_id", "action", "event_ts", "dwell_ms", "surface"), 100_000, window_days=0.05
    )
    b_long = _bytes_read(store, s.thin_batch, long_)
    assert b_long > 0
    # Fewer columns: fewer bytes; shorter history (markers skip old row groups): fewer still.
    assert _bytes_read(store, s.thin_batch, few_cols) < b_long
    assert _bytes_read(store, s.thin_batch, short) < _bytes_read(store, s.thin_batch, few_cols)
    assert _bytes_read(store, s.thin_batch, windowed) < b_long
    # The same request rows are served either way.
    assert (
        sum(len(p) for p in iter_reconstruct(store, s.thin_batch, short))
        == pq.read_metadata(s.requests_all).num_rows
    )
