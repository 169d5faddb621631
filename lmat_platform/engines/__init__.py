"""Where the write path runs: in this process, or as Ray tasks (issue 15, item 6).

The stages say *what* (write one bucket's tier file); an engine says *where*. The Ray engine
runs one task per bucket, each writing its Parquet file straight to the store and returning
its Delta ``AddAction``; the driver commits every task's actions in one Delta transaction
(the stage's own commit, with its app transaction), so a killed run commits nothing and a
re-run is the local engine's: same rows, same files per bucket, same commits.

Covered today: the tier files of ``publish`` and ``compact`` (the bulk of both). Ingest, the
head summaries and thin-row writing still run in the driver.

::

    driver:  split rows by bucket --> [task(bucket 0), task(bucket 1), ...] --> one commit
    task:    sort, write bucket=b/<prefix>-<uuid>.parquet, return AddAction
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
EngineName = Literal["local", "ray"]


class LocalEngine:
    """Runs every task in this process, in order."""

    name = "local"

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(x) for x in items]


class RayEngine:
    """Runs each task as a Ray task on the cluster at ``address`` (``"auto"``: the running
    local cluster; None: a Ray instance of this process), gathered in order."""

    name = "ray"

    def __init__(self, address: str | None = "auto", *, num_cpus: int | None = None):
        import ray

        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": address, "ignore_reinit_error": True,
                                  "log_to_driver": False}
            if address is None and num_cpus is not None:
                kw["num_cpus"] = num_cpus
            ray.init(**kw)
        self._ray = ray

        #: Ids of the nodes the last :meth:`map`'s tasks ran on.
        self.nodes: set[str] = set()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if not items:
            return []
        task: Any = self._ray.remote(num_cpus=1)(_on_node)
        got = self._ray.get([task.remote(fn, x) for x in items])
        self.nodes = {n for _, n in got}
        return [r for r, _ in got]


def _on_node(fn: Callable[[T], R], x: T) -> tuple[R, str]:
    import ray

    return fn(x), ray.get_runtime_context().get_node_id()


Engine = LocalEngine | RayEngine


def get_engine(name: EngineName | Engine | None, *, address: str | None = "auto") -> Engine:
    """The engine called ``name`` (None: local)."""
    if name is None or name == "local":
        return LocalEngine()
    if isinstance(name, (LocalEngine, RayEngine)):
        return name
    if name == "ray":
        return RayEngine(address)
    raise ValueError(f"--engine must be 'local' or 'ray', but got {name!r}")
