"""Asset checks: each one calls a pure validator of ``lmat_platform`` and reports what it found.

| check                | on                                  | validator                               |
|----------------------|-------------------------------------|-----------------------------------------|
| gx_events            | raw_events                          | ``quality.validate_events`` (GX)        |
| gx_thin_rows         | thin_log, thin_examples             | ``quality.validate_thin_rows`` (GX)     |
| pointer_validity     | thin_log, thin_examples (blocking)  | snapshot registry + ``materialize`` with |
|                      |                                     | ``verify=True`` on sampled buckets      |
| uih_immutability     | uih_snapshot (blocking), uih_tier   | ``validate.check_uih_commits``          |
| no_future_leakage    | tenant_* (blocking)                 | ``validate.check_leakage``              |
| o2o_parity           | tenant_*                            | ``validate.reference_sequences`` +      |
|                      |                                     | ``validate.compare_outputs``            |
"""

import zlib
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

import lmat_platform as lmat
from assets.partitions import day_range_us
from assets.resources import LmatResource
from assets.tenants import THIN_KINDS, tenant_key
from lmat_platform import quality, validate
from lmat_platform.protocol import open_thin
from lmat_platform.reconstruct import concat_sequences
from lmat_platform.store import SnapshotInfo, Store
from lmat_platform.store.core import delta_dataset
from lmat_platform.store.retention import accepted_events

#: Buckets of a day's thin rows whose pointers are verified against the tier's checksums.
POINTER_SAMPLE_BUCKETS = 4
#: Requests per tenant compared against the naive reference (it is slow by design).
PARITY_SAMPLE_REQUESTS = 64

_ERROR = dg.AssetCheckSeverity.ERROR


def _result(rep: validate.Report, **extra: Any) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=rep.ok,
        severity=_ERROR,
        description=None if rep.ok else "; ".join(rep.problems[:3])[:1000],
        metadata={
            "checked": rep.checked,
            "counts": dg.MetadataValue.json(rep.counts),
            "problems": dg.MetadataValue.json(rep.problems[:5]),
            **extra,
        },
    )


def _gx_result(rep: quality.QualityReport) -> dg.AssetCheckResult:
    failed = rep.failed
    return dg.AssetCheckResult(
        passed=rep.success,
        severity=_ERROR,
        description=None
        if rep.success
        else "failed: "
        + ", ".join(
            f"{f['expectation']}({f['kwargs'].get('column', '')}) x{f['unexpected_count']}"
            for f in failed
        )[:1000],
        metadata={
            "rows": rep.rows,
            "expectations": len(rep.results),
            "results": dg.MetadataValue.json(rep.results),
        },
    )


def _partition(context: dg.AssetCheckExecutionContext) -> str | None:
    """The run's day, or None when the check runs on its own (then it checks every day)."""
    return context.partition_key if context.has_partition_key else None


def _day_rows(
    store: Store, uri: str, partition: str | None, columns: list[str] | None = None
) -> pa.Table:
    ds = delta_dataset(open_thin(store, uri))
    if partition is None:
        return ds.to_table(columns=columns)
    lo, hi = day_range_us(partition)
    return ds.to_table(
        columns=columns, filter=(pads.field("request_ts") >= lo) & (pads.field("request_ts") < hi)
    )


# ------------------------------------------------------------------------------ events


@dg.asset_check(
    asset="raw_events",
    description="GX suite 'events' on the day's accepted events: required columns not "
    "null, action in the declared domain, event_ts <= arrival_ts.",
)
def gx_events(
    context: dg.AssetCheckExecutionContext, lmat_store: LmatResource
) -> dg.AssetCheckResult:
    store = lmat_store.open()
    day = _partition(context)
    sources = [p.rsplit("/", 1)[-1] for p in lmat_store.landed("events", day)] if day else None
    events = store.read_table(
        "raw", filters=pads.field("source").isin(sources) if sources is not None else None
    )
    if events is None:
        return dg.AssetCheckResult(passed=False, severity=_ERROR, description="no raw log")
    return _gx_result(quality.validate_events(events, lmat_store.actions))


# ------------------------------------------------------------------------------ thin rows


def build_thin_checks(kind: str) -> list[dg.AssetChecksDefinition]:
    asset = f"thin_{kind}"

    @dg.asset_check(
        asset=asset,
        name="gx_thin_rows",
        description="GX suite 'thin_rows' on the day's thin rows: request and pointer "
        "columns not null, request_id unique, head_len >= 0.",
    )
    def _gx(
        context: dg.AssetCheckExecutionContext, lmat_store: LmatResource
    ) -> dg.AssetCheckResult:
        rows = _day_rows(lmat_store.open(), lmat_store.thin_uri(kind), _partition(context))
        return _gx_result(quality.validate_thin_rows(rows))

    @dg.asset_check(
        asset=asset,
        name="pointer_validity",
        blocking=True,
        description="Every pointer names a published snapshot no newer than its "
        "request, and a sample of buckets rebuilds with checksum verification "
        "(an O2O consistency error fails the check and stops downstream assets).",
    )
    def _pointers(
        context: dg.AssetCheckExecutionContext, lmat_store: LmatResource
    ) -> dg.AssetCheckResult:
        store = lmat_store.open()
        uri = lmat_store.thin_uri(kind)
        day = _partition(context)
        rows = _day_rows(
            store, uri, day, ["request_id", "request_ts", "bucket", "snapshot_id", "head_len"]
        )
        snaps = lmat.list_snapshots(store)
        rep = pointer_report(rows, snaps)
        buckets = np.unique(rows.column("bucket").to_numpy())
        rng = np.random.default_rng(zlib.crc32((day or "").encode()))
        sample = sorted(
            rng.choice(
                buckets, size=min(POINTER_SAMPLE_BUCKETS, len(buckets)), replace=False
            ).tolist()
        )
        probe = lmat.Tenant("pointer_probe", ("event_id",), max_len=1)
        verified = 0
        try:
            for seqs in lmat.iter_reconstruct(store, uri, probe, verify=True, buckets=sample):
                verified += len(seqs)
        except (lmat.O2OConsistencyError, lmat.ThinTableError) as e:
            rep.add("o2o_consistency", 1, str(e))
        return _result(
            rep, sampled_buckets=dg.MetadataValue.json(sample), verified_requests=verified
        )

    return [_gx, _pointers]


def pointer_report(rows: pa.Table, snaps: list[SnapshotInfo]) -> validate.Report:
    """Pointer fields against the snapshot registry (no data read)."""
    rep = validate.Report("pointer_validity")
    rep.checked = rows.num_rows
    s = rows.column("snapshot_id").to_numpy().astype(np.int64)
    hl = rows.column("head_len").to_numpy()
    rid = rows.column("request_id").to_numpy()
    missing = (s < -1) | (s >= len(snaps))
    rep.add(
        "missing_snapshot",
        int(missing.sum()),
        f"request {rid[missing][:1].tolist()}: snapshot {s[missing][:1].tolist()} "
        f"is not published ({len(snaps)} snapshots)",
    )
    pub = np.array([x.published_at for x in snaps], dtype=np.int64)
    ok = ~missing & (s >= 0)
    late = np.zeros(len(s), bool)
    late[ok] = pub[s[ok]] > rows.column("request_ts").to_numpy()[ok]
    rep.add(
        "snapshot_after_request",
        int(late.sum()),
        f"request {rid[late][:1].tolist()}: snapshot published after the request",
    )
    bad_len = (hl < 0) | ((s == -1) & (hl != 0))
    rep.add("head_len", int(bad_len.sum()), f"request {rid[bad_len][:1].tolist()}: bad head_len")
    return rep


# ------------------------------------------------------------------------------ UIH tier


def _uih_report(lmat_store: LmatResource) -> dg.AssetCheckResult:
    store = lmat_store.open()
    commits = validate.read_commits(validate.delta_log_entries(store.table_uri("uih")))
    return _result(validate.check_uih_commits(commits), versions=len(commits))


@dg.asset_check(
    asset="uih_snapshot",
    name="uih_immutability",
    blocking=True,
    description="The UIH tier's Delta log holds only appends, layout-only rewrites "
    "and tagged deletions: no published snapshot was changed.",
)
def uih_snapshot_immutability(lmat_store: LmatResource) -> dg.AssetCheckResult:
    return _uih_report(lmat_store)


@dg.asset_check(
    asset="uih_tier",
    name="uih_immutability",
    description="After compaction: every rewrite of the tier kept its rows "
    "(dataChange = false, rows in == rows out).",
)
def uih_tier_immutability(lmat_store: LmatResource) -> dg.AssetCheckResult:
    return _uih_report(lmat_store)


# ------------------------------------------------------------------------------ tenants


def _with_event_id(t: lmat.Tenant) -> lmat.Tenant:
    cols = t.columns if "event_id" in t.columns else (*t.columns, "event_id")
    return lmat.Tenant(t.name, cols, t.max_len, t.actions, t.window_days)


def build_tenant_checks(tenant: lmat.Tenant) -> list[dg.AssetChecksDefinition]:
    key = tenant_key(tenant.name)
    probe = _with_event_id(tenant)

    @dg.asset_check(
        asset=key,
        name="no_future_leakage",
        blocking=True,
        description="Every rebuilt event (both thin tables) had arrived before its "
        "request, and sequences respect the tenant's order, length, actions and "
        "window. Blocking: downstream assets do not run on leaked data.",
    )
    def _leakage(lmat_store: LmatResource) -> dg.AssetCheckResult:
        store = lmat_store.open()
        # Every accepted event: the raw log's and, where it has retired them, the tier's.
        events = accepted_events(store, columns=["event_id", "arrival_ts", "event_ts", "action"])
        reports = {}
        for kind in THIN_KINDS:
            parts = list(lmat.iter_reconstruct(store, lmat_store.thin_uri(kind), probe))
            out = concat_sequences(parts, probe.columns).to_table()
            reports[kind] = validate.check_leakage(out, events, probe)
        rep = validate.Report("leakage")
        for kind, r in reports.items():
            rep.checked += r.checked
            for k, n in r.counts.items():
                rep.add(f"{kind}:{k}", n, f"{kind}: {r.problems[0] if r.problems else k}")
        return _result(rep)

    @dg.asset_check(
        asset=key,
        name="o2o_parity",
        description=f"{PARITY_SAMPLE_REQUESTS} sampled requests per thin table "
        "rebuilt by the platform equal, element for element, the naive reference "
        "computed from the raw log (spec sections 4 and 6).",
    )
    def _parity(lmat_store: LmatResource) -> dg.AssetCheckResult:
        store = lmat_store.open()
        rep = validate.Report("o2o_parity")
        for kind in THIN_KINDS:
            uri = lmat_store.thin_uri(kind)
            keys = (
                delta_dataset(open_thin(store, uri))
                .to_table(columns=["request_id", "user_id", "request_ts", "bucket"])
            )
            rng = np.random.default_rng(0)
            take = rng.choice(
                keys.num_rows, size=min(PARITY_SAMPLE_REQUESTS, keys.num_rows), replace=False
            )
            sample = keys.take(pa.array(np.sort(take)))
            buckets = sorted(set(sample.column("bucket").to_pylist()))
            parts = list(lmat.iter_reconstruct(store, uri, tenant, buckets=buckets))
            got = concat_sequences(parts, tenant.columns).to_table()
            got = got.filter(pc.is_in(got.column("request_id"), sample.column("request_id")))
            users = pc.unique(sample.column("user_id"))
            events = accepted_events(store, users=users.to_numpy(zero_copy_only=False))
            want = validate.reference_sequences(events, sample, tenant)
            r = validate.compare_outputs(got, want, name=kind)
            rep.checked += r.checked
            for k, n in r.counts.items():
                rep.add(f"{kind}:{k}", n, r.problems[0] if r.problems else k)
        return _result(rep)

    return [_leakage, _parity]


def build_checks(tenants: dict[str, lmat.Tenant]) -> list[dg.AssetChecksDefinition]:
    checks: list[dg.AssetChecksDefinition] = [
        gx_events,
        uih_snapshot_immutability,
        uih_tier_immutability,
    ]
    for kind in THIN_KINDS:
        checks += build_thin_checks(kind)
    for t in tenants.values():
        checks += build_tenant_checks(t)
    return checks
