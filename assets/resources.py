"""The one resource every lmat asset uses: where the store, the landing folder and outputs live."""

import os
from pathlib import Path

import dagster as dg

import lmat_platform as lmat
from lmat_platform.engines import Engine, get_engine
from lmat_platform.store import Store

#: Tenants used when no tenants file is configured (the ones of the spec's example).
DEFAULT_TENANTS_FILE = str(Path(__file__).with_name("default_tenants.yaml"))


def default_home() -> str:
    """``$LMAT_HOME``, else ``~/.lmat/ui`` (where ``lmat ui`` keeps its data)."""
    return os.environ.get("LMAT_HOME") or os.path.join(os.path.expanduser("~"), ".lmat", "ui")


class LmatResource(dg.ConfigurableResource):
    """Locations of an lmat deployment. Defaults come from ``LMAT_*`` environment variables,
    read when the definitions are built (see ``jobs/definitions.py``)."""

    store: str
    """Store root: a local directory or an object-store URI (created on first use)."""
    landing: str
    """Landing folder: ``events/DATE*.parquet`` and ``requests/DATE*.parquet`` per day."""
    outputs: str
    """Where thin example tables, fat-row baselines, reports and models are written."""
    tenants_file: str = DEFAULT_TENANTS_FILE
    """Tenants YAML (spec section 6)."""
    actions: list[int] = [1, 2, 3, 4, 5]
    """Declared domain of action codes, checked by the GX events suite."""
    n_buckets: int = 16
    """User buckets of the UIH tier; used only when the store is created."""
    engine: str = "local"
    """Where ingest, publish, compaction and thin-row writing run: ``local`` (this process) or
    ``ray`` (Ray tasks per bucket or file, committed by the asset's process)."""
    ray_address: str = "auto"
    """With ``engine: ray``: the Ray cluster (``auto``: the running local one)."""

    @classmethod
    def from_env(cls) -> "LmatResource":
        home = default_home()
        return cls(
            store=os.environ.get("LMAT_STORE") or os.path.join(home, "store"),
            landing=os.environ.get("LMAT_LANDING") or os.path.join(home, "landing"),
            outputs=os.environ.get("LMAT_OUTPUTS") or os.path.join(home, "outputs"),
            tenants_file=os.environ.get("LMAT_TENANTS") or DEFAULT_TENANTS_FILE,
            engine=os.environ.get("LMAT_ENGINE") or "local",
            ray_address=os.environ.get("LMAT_RAY_ADDRESS") or "auto",
        )

    def open(self) -> Store:
        """The store, created on first use."""
        try:
            return lmat.open_store(self.store)
        except lmat.StoreNotFoundError:
            return lmat.init_store(self.store, n_buckets=self.n_buckets)

    def write_engine(self) -> Engine | None:
        """The engine of the write path (None: this process; lmat_platform.engines)."""
        if self.engine == "local":
            return None
        return get_engine(self.engine, address=self.ray_address)  # type: ignore[arg-type]

    def tenants(self) -> dict[str, lmat.Tenant]:
        return lmat.load_tenants(self.tenants_file)

    def thin_uri(self, kind: str) -> str:
        """The thin example table of a path: ``log`` (streaming) or ``examples`` (batch)."""
        return os.path.join(self.outputs, "thin", kind)

    def landed(self, kind: str, partition: str) -> list[str]:
        """Landed files of one day: ``LANDING/{kind}/{partition}*.parquet``, sorted."""
        folder = Path(self.landing) / kind
        if not folder.is_dir():
            return []
        return sorted(str(p) for p in folder.glob(f"{partition}*.parquet"))

    def output_path(self, *parts: str) -> str:
        path = os.path.join(self.outputs, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path
