"""One asset per tenant: its projection of the shared histories and the bytes it reads.

Nothing is copied: the asset reconstructs the tenant's sequences from the thin tables (the
work a training job's reader does) and records what that cost.
"""

import time
from typing import Any

import dagster as dg

import lmat_platform as lmat
from assets.resources import LmatResource

THIN_KINDS = ("log", "examples")


def tenant_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(f"tenant_{name}")


def build_tenant_asset(tenant: lmat.Tenant) -> dg.AssetsDefinition:
    @dg.asset(
        key=tenant_key(tenant.name),
        deps=["thin_log", "thin_examples"],
        group_name="tenants",
        kinds={"python"},
        description=f"Tenant '{tenant.name}': columns {list(tenant.columns)}, last "
        f"{tenant.max_len} events"
        + (f", actions {list(tenant.actions)}" if tenant.actions else "")
        + (f", last {tenant.window_days:g} days" if tenant.window_days else "")
        + ". Records the requests served and the bytes read to rebuild them (no data copied).",
    )
    def _tenant(lmat_store: LmatResource) -> dg.MaterializeResult:
        spec = tenant
        store = lmat_store.open()
        meta: dict[str, Any] = {"projection": dg.MetadataValue.json(spec.as_dict())}
        total_bytes = total_requests = 0
        for kind in THIN_KINDS:
            t0 = time.perf_counter()
            parts = list(lmat.iter_reconstruct(store, lmat_store.thin_uri(kind), spec))
            requests = sum(len(p) for p in parts)
            read = sum(p.bytes_read for p in parts)
            meta[f"{kind}_requests"] = requests
            meta[f"{kind}_events"] = int(sum(int(p.lengths.sum()) for p in parts))
            meta[f"{kind}_bytes_read"] = dg.MetadataValue.int(read)
            meta[f"{kind}_seconds"] = round(time.perf_counter() - t0, 3)
            total_bytes += read
            total_requests += requests
        meta["bytes_read_per_request"] = round(total_bytes / max(total_requests, 1), 1)
        return dg.MaterializeResult(metadata=meta)

    return _tenant


def build_tenant_assets(tenants: dict[str, lmat.Tenant]) -> list[dg.AssetsDefinition]:
    return [build_tenant_asset(t) for t in tenants.values()]
