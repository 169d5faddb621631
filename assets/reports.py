"""The storage report: what the thin protocol costs on disk against fat rows, per tenant."""

import base64
import io
import json
import os

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

import lmat_platform as lmat
from assets.resources import LmatResource
from assets.tenants import tenant_key
from lmat_platform.protocol import open_thin
from lmat_platform.store import live_bytes
from lmat_platform.store.core import delta_dataset

_REQUEST_COLUMNS_DROPPED = ("bucket", "snapshot_id", "head_len", "head_checksum", "tail_len")


def _live_bytes(uri: str) -> int:
    """Bytes of the files a Delta table's latest version references (not unvacuumed ones)."""
    t = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    return int(pc.sum(t.column("size_bytes")).as_py() or 0) if t.num_rows else 0


def _plot_png(rows: list[dict[str, object]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["tenant"]) for r in rows]
    fat = [int(r["fat_bytes"]) / 1e6 for r in rows]  # type: ignore[call-overload]
    thin = [int(r["thin_plus_uih_bytes"]) / 1e6 for r in rows]  # type: ignore[call-overload]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], fat, width=0.4, label="fat rows", color="#c44e52")
    ax.bar([i + 0.2 for i in x], thin, width=0.4, label="thin rows + UIH tier", color="#4c72b0")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MB on disk")
    ax.set_title("Storage: fat rows vs thin rows + shared UIH tier")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def build_storage_report(tenants: dict[str, lmat.Tenant]) -> dg.AssetsDefinition:
    @dg.asset(
        name="storage_report",
        deps=[tenant_key(n) for n in tenants],
        group_name="reports",
        kinds={"python"},
        description="Bytes on disk per tenant: thin example rows plus the shared UIH tier, against "
        "fat rows (the whole projected history copied into every example), with a plot. The "
        "'all tenants' bar is one fat dataset at the union projection. Live bytes (files the "
        "tables' latest versions reference), so compaction leftovers awaiting vacuum are not counted.",
    )
    def _report(lmat_store: LmatResource) -> dg.MaterializeResult:
        store = lmat_store.open()
        thin_uri = lmat_store.thin_uri("examples")
        requests = delta_dataset(open_thin(store, thin_uri)).to_table()
        requests = requests.drop_columns(
            [c for c in requests.column_names
             if c in _REQUEST_COLUMNS_DROPPED or c.startswith("tail_")]
        )
        sizes = live_bytes(store)
        uih_bytes = sizes["uih"] + sizes["heads"] + sizes["snapshots"]
        thin_bytes = _live_bytes(thin_uri)
        rows: list[dict[str, object]] = []
        targets: list[tuple[str, lmat.Tenant | list[lmat.Tenant]]] = list(tenants.items())
        if len(tenants) > 1:
            targets.append(("all tenants", list(tenants.values())))
        for name, t in targets:
            out = lmat_store.output_path("fat_rows", f"{name.replace(' ', '_')}.parquet")
            fat = lmat.write_fat_rows(store, requests, t, out)
            rows.append(
                {
                    "tenant": name,
                    "requests": requests.num_rows,
                    "fat_bytes": int(fat["bytes"]),  # type: ignore[call-overload]
                    "thin_bytes": thin_bytes,
                    "uih_bytes": uih_bytes,
                    "thin_plus_uih_bytes": thin_bytes + uih_bytes,
                    "fat_over_thin": round(int(fat["bytes"]) / max(thin_bytes + uih_bytes, 1), 3),  # type: ignore[call-overload]
                }
            )
        png = _plot_png(rows)
        png_path = lmat_store.output_path("reports", "storage.png")
        with open(png_path, "wb") as f:
            f.write(png)
        with open(os.path.splitext(png_path)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)
        header = "| tenant | fat rows | thin + UIH | fat / (thin + UIH) |\n|---|---:|---:|---:|\n"
        table = "".join(
            f"| {r['tenant']} | {r['fat_bytes']:,} | {r['thin_plus_uih_bytes']:,} | "
            f"{r['fat_over_thin']} |\n"
            for r in rows
        )
        image = f"![storage](data:image/png;base64,{base64.b64encode(png).decode()})"
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(header + table + "\n" + image),
                "rows": dg.MetadataValue.json(rows),
                "plot": dg.MetadataValue.path(png_path),
                "thin_bytes": thin_bytes,
                "uih_bytes": uih_bytes,
            }
        )

    return _report
