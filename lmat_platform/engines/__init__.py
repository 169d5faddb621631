"""Where the write path runs: in this process, or as Ray tasks (issue 15, item 5).

The stages say *what* (write one bucket's tier file, one bucket's head summaries, one file's
raw rows, one bucket's thin rows); an engine says *where*. The Ray engine runs one task per
bucket (per file for ingest), each writing its Parquet file straight to the table and returning
its Delta ``AddAction``; the driver commits every task's actions of a step in one Delta
transaction (the step's own commit, with its app transaction: :mod:`lmat_platform.engines.files`),
so a killed run commits nothing more than the local engine's would, and a re-run finishes it
the same way: same rows, same commits, same app transactions.

::

    driver:  split rows by bucket --> [task(bucket 0), task(bucket 1), ...] --> one commit
    task:    compute, write <table>/bucket=b/<prefix>-<uuid>.parquet, return AddAction

=================  ===========================================  =========================
step               a Ray task does                              the driver does
=================  ===========================================  =========================
ingest             read + check one event file (and hash it);   duplicate check, quarantine,
                   write the file's accepted rows               raw commit, id index, record
publish (tier)     sort + write one bucket's tier file          raw range read, commit
publish (heads)    extend one bucket's head summaries, write    commit ``heads``, then
                   its ``heads`` and ``heads_latest`` files     ``heads_latest`` (+ fold)
compact            read, merge and stripe one bucket's files    one commit (adds + removes)
log / examples     build one bucket's thin rows, write them     register, one commit
=================  ===========================================  =========================

The driver holds the store's write lock (or lease) for the whole step, so tasks read a store
no other writer changes. Tasks get the driver's object-store settings (``AWS_*`` variables)
with each call; event files and local stores must be reachable from every node at the same
path (one machine, or shared storage).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
EngineName = Literal["local", "ray"]
#: Environment variables that choose the engine of the CLI and the Dagster assets.
ENGINE_ENV = "LMAT_ENGINE"
RAY_ADDRESS_ENV = "LMAT_RAY_ADDRESS"


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
        #: Ids of the nodes of every task since this engine was made.
        self.all_nodes: set[str] = set()

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if not items:
            return []
        from lmat_platform.store.core import STORAGE_ENV

        # What a task needs to reach the store as the driver does (object-store settings).
        env = {k: v for k in STORAGE_ENV if (v := os.environ.get(k)) is not None}
        # SPREAD: a step's tasks are alike and short; packed, they would queue on the
        # driver's node while the others idle.
        task: Any = self._ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_on_node)
        refs = [task.remote(fn, x, env) for x in items]
        try:
            got = self._gather(refs)
        except self._ray.exceptions.RayTaskError as e:
            # The task's own error (a bad input file's one line), not Ray's wrapper of it.
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        self.nodes = {n for _, n in got}
        self.all_nodes |= self.nodes
        return [r for r, _ in got]

    def _gather(self, refs: list[Any]) -> list[Any]:
        """The results of ``refs`` in order, raising the first task error as soon as it
        happens; the step's other tasks are then cancelled, so a failed step does not keep
        the cluster busy writing files that no commit will name."""
        ray = self._ray
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # raises the task's error
        except BaseException:
            for ref in pending:
                try:
                    # force: a task inside a long C call (a Parquet write) would otherwise
                    # notice the cancel only when the call returns; its files are never named
                    # by a commit, and vacuum removes them.
                    ray.cancel(ref, force=True)
                except Exception:  # already finished, or its worker is gone
                    log.debug("could not cancel a Ray task", exc_info=True)
            raise
        return list(ray.get(refs))


def _on_node(fn: Callable[[T], R], x: T, env: dict[str, str]) -> tuple[R, str]:
    import ray

    _task_env(env)
    return fn(x), ray.get_runtime_context().get_node_id()


def _task_env(env: dict[str, str]) -> None:
    """Set a task's object-store settings to the driver's ``env``: a Ray worker runs many
    tasks, so a setting the driver no longer has (an expired session token) is removed, not
    kept from an earlier task."""
    from lmat_platform.store.core import STORAGE_ENV

    for k in STORAGE_ENV:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)


Engine = LocalEngine | RayEngine


def is_local(engine: Engine | None) -> bool:
    """Whether ``engine`` runs in this process (the stages' own single-process code)."""
    return engine is None or isinstance(engine, LocalEngine)


def get_engine(name: EngineName | Engine | None, *, address: str | None = "auto") -> Engine:
    """The engine called ``name`` (None: local)."""
    if name is None or name == "local":
        return LocalEngine()
    if isinstance(name, (LocalEngine, RayEngine)):
        return name
    if name == "ray":
        return RayEngine(address)
    raise ValueError(f"--engine must be 'local' or 'ray', but got {name!r}")


def engine_from_env() -> Engine | None:
    """The engine ``LMAT_ENGINE`` names (``local`` or unset: None, this process; ``ray``: the
    cluster at ``LMAT_RAY_ADDRESS``, default the running local one)."""
    name = os.environ.get(ENGINE_ENV) or "local"
    if name not in ("local", "ray"):
        raise ValueError(f"{ENGINE_ENV} must be 'local' or 'ray', but got {name!r}")
    if name == "local":
        return None
    return get_engine("ray", address=os.environ.get(RAY_ADDRESS_ENV) or "auto")
