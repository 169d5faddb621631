"""A local Ray cluster of several nodes on loopback, for tests and benchmarks of the Ray engine.

Each node is a ``ray start --block`` in its own process group, bound to 127.0.0.1, with its own
temp dir and ports; leaving the context stops each group (SIGTERM, then SIGKILL) and waits until
no process of the cluster is left. It never runs ``ray stop``, which would stop every Ray
instance of the machine's user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(args: list[str], env: dict[str, str], num_cpus: int) -> subprocess.Popen[bytes]:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", str(num_cpus), *args], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class LoopbackCluster:
    #: The head's address (``127.0.0.1:PORT``).
    address: str
    #: The cluster's temp dir: every process of the cluster names it.
    temp_dir: str


@contextlib.contextmanager
def loopback_cluster(
    nodes: int = 2, *, num_cpus: int = 1, timeout_s: float = 120.0, connect: bool = True
) -> Iterator[LoopbackCluster]:
    """Start ``nodes`` Ray nodes on 127.0.0.1 (``num_cpus`` each; the first is the head) and
    yield the cluster, with this process connected to it when ``connect``. Token auth
    is off for the cluster (``RAY_AUTH_MODE=disabled``: an earlier run's token would refuse
    the second node)."""
    import ray

    auth_before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process's ray.init, until the cluster stops
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a limit
    procs = [_node(["--head", "--port", str(port), "--include-dashboard", "false",
                    "--temp-dir", tmp], env, num_cpus)]
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while not (Path(tmp) / "ray_current_cluster").exists() and time.time() < deadline:
            time.sleep(0.5)
        for _ in range(nodes - 1):
            base = free_port() + 1000
            procs.append(_node(["--address", address,
                                "--dashboard-agent-listen-port", str(free_port()),
                                "--min-worker-port", str(base), "--max-worker-port",
                                str(base + 200)], env, num_cpus))
        if connect:
            ray.init(address=address, log_to_driver=False)
            while len([n for n in ray.nodes() if n["Alive"]]) < nodes:
                if time.time() > deadline:
                    raise RuntimeError(f"only some of {nodes} Ray nodes joined in {timeout_s:.0f}s")
                time.sleep(0.5)
        yield LoopbackCluster(address, tmp)
    finally:
        if connect:
            ray.shutdown()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        left = stop_leftovers(tmp)
        if left:
            log.warning("killed %d Ray processes left by the cluster in %s", len(left), tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if auth_before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_before


def processes_of(temp_dir: str) -> list[int]:
    """Processes whose command line names ``temp_dir`` (a Ray instance's temp dir)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if temp_dir.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def stop_leftovers(temp_dir: str, *, wait_s: float = 30.0) -> list[int]:
    """Wait up to ``wait_s`` for the processes of the Ray instance in ``temp_dir`` to end, then
    SIGKILL any left; returns those that had to be killed."""
    deadline = time.time() + wait_s
    while (left := processes_of(temp_dir)) and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left
