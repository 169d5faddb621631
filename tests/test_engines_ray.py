"""The Ray write path (issue 15, item 6): publish and compaction with ``engine=RayEngine`` on a
local cluster of two nodes (loopback) write the same tier as the local engine."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray")


from lmat_platform.engines import RayEngine  # noqa: E402
from lmat_platform.store import compact_buckets, ingest_files, init_store, publish_snapshot  # noqa: E402
from lmat_platform.store.uih import list_files  # noqa: E402
from tests.helpers import read  # noqa: E402

HOUR = 3_600_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_node(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "1", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def two_node_cluster(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A head and a second node on 127.0.0.1, each with one CPU, in their own process groups
    (stopped by killing those groups: never ``ray stop``, which would stop other users' Ray)."""
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    base = _free_port() + 1000
    procs = [_ray_node(["--head", "--port", str(port), "--include-dashboard", "false",
                        "--temp-dir", tmp], env)]
    try:
        time.sleep(8)
        procs.append(_ray_node(["--address", f"127.0.0.1:{port}",
                                "--dashboard-agent-listen-port", str(_free_port()),
                                "--min-worker-port", str(base), "--max-worker-port",
                                str(base + 200)], env))
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.time() > deadline:
                raise RuntimeError("the second Ray node did not join")
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _events(path: Path, k: int) -> str:
    rng = np.random.default_rng(k)
    n = 3000
    ats = (10 + k) * HOUR + np.sort(rng.integers(0, HOUR, n))
    pq.write_table(pa.table({
        "user_id": rng.integers(1, 400, n).astype(np.int64),
        "event_id": np.arange(k * n, (k + 1) * n, dtype=np.int64),
        "event_ts": ats - rng.integers(0, 2 * HOUR, n), "arrival_ts": ats,
        "item_id": rng.integers(1, 999, n).astype(np.int64),
        "action": rng.integers(1, 4, n).astype(np.int16)}), path)
    return str(path)


def _tier(store) -> list[tuple]:  # type: ignore[no-untyped-def]
    t = read(store, "uih")
    return sorted(zip(*(t.column(c).to_pylist() for c in sorted(t.column_names)), strict=True))


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_writes_the_local_engines_tier(tmp_path: Path, two_node_cluster: str) -> None:
    engine = RayEngine(two_node_cluster)
    stores = {name: init_store(str(tmp_path / name), n_buckets=8, row_group_rows=256)
              for name in ("local", "ray")}
    nodes: set[str] = set()
    for k in range(3):
        f = _events(tmp_path / f"e{k}.parquet", k)
        for name, st in stores.items():
            ingest_files(st, [f])
            publish_snapshot(st, (11 + k) * HOUR, engine=engine if name == "ray" else None)
        nodes |= engine.nodes
    for name, st in stores.items():
        compact_buckets(st, engine=engine if name == "ray" else None)
    nodes |= engine.nodes
    assert len(nodes) == 2  # tasks ran on both nodes
    local, ray_ = stores["local"], stores["ray"]
    assert _tier(local) == _tier(ray_)
    for a, b in ((read(local, t), read(ray_, t)) for t in ("heads", "snapshots")):
        key = [c for c in ("user_id", "snapshot_id") if c in a.column_names]
        drop = [c for c in ("created_at",) if c in a.column_names]
        assert a.drop_columns(drop).sort_by([(c, "ascending") for c in key]).equals(
            b.drop_columns(drop).sort_by([(c, "ascending") for c in key]))
    shape = {name: sorted((f.bucket, f.rows) for f in list_files(st.open_table("uih")))
             for name, st in stores.items()}
    assert shape["local"] == shape["ray"]
    # One Delta commit per step in both: the same version history.
    assert local.open_table("uih").version() == ray_.open_table("uih").version()
