"""Pure validators, off the hot path: leakage, ordering, projection, immutability, reference.

The same functions back the Dagster asset checks, the CLI and the tests. Each takes data (Arrow
tables, commit lists) and returns a report; none writes anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmat_platform.tenants import Tenant


@dataclass
class Report:
    """Result of a validator: ``ok`` and the problems found (first few kept verbatim)."""

    name: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not any(self.counts.values())

    def add(self, kind: str, n: int, example: str) -> None:
        if n:
            self.counts[kind] = self.counts.get(kind, 0) + n
            if len(self.problems) < 20:
                self.problems.append(example)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "checked": self.checked,
                "counts": self.counts, "problems": self.problems[:5]}


def reference_sequences(events: pa.Table, requests: pa.Table, tenant: Tenant) -> pa.Table:
    """The naive reference: H(u, T) straight from accepted events, then the tenant projection.

    One request at a time, no snapshots, no pointers: the definition of spec sections 4 and 6
    written as plainly as possible. For tests and sampled O2O checks; not fast.
    """
    ev = events.sort_by([("user_id", "ascending"), ("event_ts", "ascending"),
                         ("event_id", "ascending")])
    eu = ev.column("user_id").to_numpy()
    ea = ev.column("arrival_ts").to_numpy()
    ets = ev.column("event_ts").to_numpy()
    act = ev.column("action").to_numpy()
    out_cols: dict[str, list[Any]] = {c: [] for c in tenant.columns}
    lengths = []
    w = tenant.window_us
    for u, T in zip(requests.column("user_id").to_pylist(),
                    requests.column("request_ts").to_pylist(), strict=True):
        s, e = np.searchsorted(eu, u, "left"), np.searchsorted(eu, u, "right")
        idx = np.arange(s, e)
        idx = idx[ea[idx] < T]
        if tenant.actions is not None:
            idx = idx[np.isin(act[idx], tenant.action_array)]  # type: ignore[arg-type]
        if w is not None:
            idx = idx[ets[idx] >= T - w]
        idx = idx[max(0, len(idx) - tenant.max_len):]
        lengths.append(len(idx))
        for c in tenant.columns:
            out_cols[c].append(ev.column(c).take(pa.array(idx, pa.int64())).to_pylist())
    return pa.table({
        "request_id": requests.column("request_id"),
        "user_id": requests.column("user_id"),
        "request_ts": requests.column("request_ts"),
        "length": pa.array(lengths, pa.int32()),
        **{c: pa.array(v, pa.list_(ev.schema.field(c).type)) for c, v in out_cols.items()},
    })


def compare_outputs(got: pa.Table, want: pa.Table, *, name: str = "parity") -> Report:
    """Element-for-element comparison of two materialized outputs, matched by request_id."""
    rep = Report(name)
    g = got.sort_by("request_id")
    w = want.sort_by("request_id")
    rep.checked = w.num_rows
    gi, wi = g.column("request_id").to_numpy(), w.column("request_id").to_numpy()
    if len(gi) != len(wi) or not np.array_equal(gi, wi):
        missing = np.setdiff1d(wi, gi)
        extra = np.setdiff1d(gi, wi)
        rep.add("missing_requests", len(missing), f"requests missing: {missing[:5].tolist()}")
        rep.add("extra_requests", len(extra), f"unexpected requests: {extra[:5].tolist()}")
        return rep
    for c in w.column_names:
        if c not in g.column_names:
            rep.add("missing_columns", 1, f"column '{c}' missing")
            continue
        gc, wc = g.column(c), w.column(c)
        if gc.equals(wc):
            continue
        gl, wl = gc.to_pylist(), wc.to_pylist()
        bad = [i for i, (a, b) in enumerate(zip(gl, wl, strict=True)) if a != b]
        rep.add(f"mismatch:{c}", len(bad),
                f"request {wi[bad[0]]}: column '{c}' got {str(gl[bad[0]])[:80]} "
                f"want {str(wl[bad[0]])[:80]}" if bad else "")
    return rep


def check_leakage(
    output: pa.Table, events: pa.Table, tenant: Tenant, *, requests: pa.Table | None = None
) -> Report:
    """Count materialized events that had not arrived at request time, and check ordering,
    lengths and projection of ``output`` (``lmat materialize`` format).

    ``events`` must hold at least ``event_id``, ``arrival_ts``, ``event_ts``, ``action`` of every
    accepted event; ``output`` must include ``event_id`` among its columns for the arrival check
    (otherwise only ordering, lengths and projection are checked).
    """
    rep = Report("leakage")
    rep.checked = output.num_rows
    lengths = output.column("length").to_numpy()
    rep.add("over_max_len", int((lengths > tenant.max_len).sum()),
            f"a sequence is longer than max_len {tenant.max_len}")
    extra = [c for c in output.column_names
             if c not in ("request_id", "user_id", "request_ts", "length", *tenant.columns)]
    rep.add("unexpected_columns", len(extra), f"columns not in the tenant: {extra}")
    for c in tenant.columns:
        if c not in output.column_names:
            rep.add("missing_columns", 1, f"tenant column '{c}' missing")
            continue
        vl = pc.list_value_length(output.column(c)).to_numpy(zero_copy_only=False)
        rep.add("length_mismatch", int((vl != lengths).sum()),
                f"column '{c}' lengths differ from 'length'")
    if "event_id" not in output.column_names:
        return rep
    # Owners from the event_id lists themselves: a length mismatch is reported above, not a crash.
    id_lens = pc.fill_null(pc.list_value_length(output.column("event_id")), 0)
    owner = np.repeat(np.arange(output.num_rows), id_lens.to_numpy(zero_copy_only=False))
    ids = pc.list_flatten(output.column("event_id")).to_numpy()
    T = output.column("request_ts").to_numpy()[owner]
    ev_ids = events.column("event_id").to_numpy()
    order = np.argsort(ev_ids)
    sid = ev_ids[order]
    pos = np.minimum(np.searchsorted(sid, ids), max(len(sid) - 1, 0))
    known = (sid[pos] == ids) if len(sid) else np.zeros(len(ids), bool)
    rep.add("unknown_events", int((~known).sum()),
            f"event_id {ids[~known][:1].tolist()} is not an accepted event")
    row = order[pos]
    arr = events.column("arrival_ts").to_numpy()[row]
    ets = events.column("event_ts").to_numpy()[row]
    leak = known & (arr >= T)
    rep.add("future_leakage", int(leak.sum()),
            f"request {output.column('request_id').to_numpy()[owner[leak][:1]].tolist()}: "
            f"event {ids[leak][:1].tolist()} arrived at or after request time")
    if tenant.actions is not None:
        act = events.column("action").to_numpy()[row]
        bad = known & ~np.isin(act, tenant.action_array)  # type: ignore[arg-type]
        rep.add("action_filter", int(bad.sum()), "an event's action is outside the tenant's actions")
    if tenant.window_us is not None:
        bad = known & (ets < T - tenant.window_us)
        rep.add("window", int(bad.sum()), "an event is older than the tenant's window")
    same = owner[1:] == owner[:-1]
    bad = same & ((ets[1:] < ets[:-1]) | ((ets[1:] == ets[:-1]) & (ids[1:] <= ids[:-1])))
    rep.add("ordering", int(bad.sum()), "a sequence is not ascending by (event_ts, event_id)")
    return rep


# ----------------------------------------------------------------------------- immutability


def read_commits(log_entries: Iterable[tuple[int, str]]) -> list[dict[str, Any]]:
    """Parse Delta log JSON commits ``(version, text)`` into dicts of actions (pure)."""
    out = []
    for version, text in log_entries:
        acts: dict[str, Any] = {"version": version, "add": [], "remove": [], "commitInfo": {},
                                "metaData": None}
        for line in text.splitlines():
            if not line.strip():
                continue
            a = json.loads(line)
            if "add" in a:
                acts["add"].append(a["add"])
            elif "remove" in a:
                acts["remove"].append(a["remove"])
            elif "commitInfo" in a:
                acts["commitInfo"] = a["commitInfo"]
            elif "metaData" in a:
                acts["metaData"] = a["metaData"]
        out.append(acts)
    return sorted(out, key=lambda c: c["version"])


def check_uih_commits(commits: Sequence[dict[str, Any]]) -> Report:
    """Detect any commit to the UIH tier that is not an append or a layout-only rewrite.

    Allowed: appends (adds only, all ``dataChange = true``); layout rewrites (every add and
    remove ``dataChange = false`` and as many rows added as removed); deletions tagged
    ``lmat.op = forget``; additive schema changes.
    """
    rep = Report("uih_immutability")
    rows_of: dict[str, int] = {}
    cols: set[str] | None = None
    for c in commits:
        rep.checked += 1
        v = c["version"]
        info = c.get("commitInfo") or {}
        op = info.get("lmat.op")
        for a in c["add"]:
            st = json.loads(a["stats"]) if a.get("stats") else {}
            rows_of[a["path"]] = int(st.get("numRecords", -1))
        if c.get("metaData") is not None:
            fields = {f["name"] for f in json.loads(c["metaData"]["schemaString"])["fields"]}
            if cols is not None and not cols <= fields:
                rep.add("schema", 1, f"version {v}: columns dropped: {sorted(cols - fields)}")
            cols = fields
        adds, removes = c["add"], c["remove"]
        if not removes:
            if any(not a.get("dataChange", True) for a in adds) and op != "compact":
                rep.add("bad_append", 1, f"version {v}: add without data change outside compaction")
            continue
        if op == "forget":
            continue
        if any(r.get("dataChange", True) for r in removes) or any(a.get("dataChange", True) for a in adds):
            rep.add("rewrite", 1, f"version {v}: files removed with dataChange=true (op {op!r})")
            continue
        if any(r["path"] not in rows_of for r in removes):
            # The files' add commits were expired from the log (vacuum): their row counts are
            # no longer known; the dataChange flags above are all that can be checked.
            continue
        n_in = sum(rows_of[r["path"]] for r in removes)
        n_out = sum(int(json.loads(a["stats"]).get("numRecords", -1)) for a in adds if a.get("stats"))
        if n_in != n_out:
            rep.add("layout_rows", 1, f"version {v}: layout rewrite changed rows {n_in} -> {n_out}")
    return rep


def delta_log_entries(table_uri: str) -> list[tuple[int, str]]:
    """The JSON commits of a Delta table's log (I/O helper for :func:`check_uih_commits`)."""
    import pyarrow.fs as pafs

    if "://" in table_uri:
        fs, path = pafs.FileSystem.from_uri(table_uri)
    else:
        fs, path = pafs.LocalFileSystem(), table_uri
    sel = pafs.FileSelector(f"{path}/_delta_log", allow_not_found=True)
    out = []
    for info in fs.get_file_info(sel):
        name = info.base_name
        if name.endswith(".json") and name[:-5].isdigit():
            with fs.open_input_stream(info.path) as f:
                out.append((int(name[:-5]), f.read().decode()))
    return out
