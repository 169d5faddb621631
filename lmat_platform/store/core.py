"""The store: a directory (or object-store prefix) holding lmat's Delta tables.

Layout::

    STORE/
      _lmat.json        identity and settings (store_id, n_buckets, row-group size, retention)
      _lock             local stores: the single-writer lock (fcntl)
      raw/              Delta: raw event log, every accepted event, append-only
      quarantine/       Delta: rejected rows with their reason
      ingests/          Delta: one row per ingested batch (the idempotency record)
      uih/              Delta: the immutable UIH tier, partitioned by user bucket
      heads/            Delta: per (user, snapshot) head length, checksum and length markers
      snapshots/        Delta: the snapshot registry
      publishing/       Delta: publish intents (snapshot id, watermark), written before a
                        publish's first step; ingest fences at an unfinished one's watermark
      heads_latest/     Delta: each user's newest head summary with its marker counts (what
                        publish extends)
      ids/              Delta: the accepted-id index (event_id sorted, user_id): the duplicate
                        check reads only the files and row groups a batch's ids can be in
      forgotten/        Delta: the tombstone registry, one row per forgotten user (pending
                        until the physical deletion completes; store/deletion.py)
      thin_tables/      Delta: thin example tables written by ``log`` and ``examples``
                        (``forget`` deletes its users' rows from each; store/thin_registry.py)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError

from lmat_platform.exceptions import ConcurrencyError, StoreExistsError, StoreNotFoundError

if TYPE_CHECKING:  # imported where a dataset is made: it costs as much as the rest (pandas)
    import pyarrow.dataset as pads

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "_lmat.json"
TABLES = (
    "raw",
    "quarantine",
    "ingests",
    "uih",
    "heads",
    "snapshots",
    "forgotten",
    "thin_tables",
    "publishing",
    "ids",
    "heads_latest",
)
#: A commit whose version is a multiple of this also writes a Delta checkpoint, so opening a
#: table replays at most this many JSON commits (opening the tier's table: 8 ms -> 3 ms).
CHECKPOINT_INTERVAL = 10
#: Small tables (the snapshot registry, forgotten users, ...) whose whole reads are remembered
#: per version by :meth:`Store.read_table`.
_MEMO_MAX_BYTES = 8 << 20
_COMMIT_FILE = re.compile(r"^(\d{20})\.json$")


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def uri_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path of ``uri`` (a local path, ``file://`` or an object
    store's URI) inside it."""
    if _is_uri(uri):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


#: Environment variables that hold the object-store settings (credentials, endpoint).
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL",
               "AWS_ALLOW_HTTP", "AWS_SESSION_TOKEN")


def storage_options() -> dict[str, str] | None:
    """Object-store credentials for delta-rs, read from the environment at run time."""
    opts = {k: v for k, v in os.environ.items() if k in STORAGE_ENV}
    return opts or None


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class StoreConfig:
    store_id: str
    n_buckets: int
    row_group_rows: int
    retention_hours: int


class Store:
    """An opened lmat store. Cheap to create and picklable (it holds only strings and ints)."""

    def __init__(self, root: str, config: StoreConfig):
        self.root = root.rstrip("/")
        self.config = config

    # ---------------------------------------------------------------- paths and filesystem
    def table_uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def is_local(self) -> bool:
        return not _is_uri(self.root)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the root path inside it."""
        return uri_filesystem(self.root)

    @property
    def n_buckets(self) -> int:
        return self.config.n_buckets

    @property
    def store_id(self) -> str:
        return self.config.store_id

    # ---------------------------------------------------------------- tables
    def open_table(self, name: str, *, version: int | None = None) -> DeltaTable | None:
        """The Delta table ``name`` at ``version`` (latest if None); None if never written.

        A fresh object the caller may write through; readers use :meth:`shared_table`.
        In a process that took this object store's lease and lost it, raises
        :class:`ConcurrencyError` (writers open the table they commit to just before)."""
        if not self.is_local:
            from lmat_platform.store.lease import check_lease

            check_lease(self.root)
        try:
            return DeltaTable(
                self.table_uri(name), version=version, storage_options=storage_options()
            )
        except TableNotFoundError:
            return None

    def shared_table(self, name: str, *, version: int | None = None) -> DeltaTable | None:
        """Read-only view of table ``name`` at ``version`` (latest if None), shared by the
        process; None if never written. See :func:`shared_delta_table`."""
        return shared_delta_table(self.table_uri(name), version)

    def derived(self, name: str, tag: str, fn: Callable[[DeltaTable], Any]) -> Any:
        """``fn(table)`` for table ``name``'s latest version, computed once per version and
        process; None if never written. See :func:`derived`."""
        return derived(self.table_uri(name), tag, fn)

    def derived_keyed(
        self, name: str, tag: str, fn: Callable[[DeltaTable], Any]
    ) -> tuple[Any, Hashable | None]:
        """:meth:`derived` and the key of the table version (see :func:`derived_keyed`)."""
        return derived_keyed(self.table_uri(name), tag, fn)

    def read_table(
        self, name: str, *, columns: list[str] | None = None, filters: Any = None
    ) -> pa.Table | None:
        """Rows of table ``name``'s latest version; whole small tables are remembered per
        version (Arrow tables are immutable), so re-reading an unchanged registry is free."""
        dt, shared = _shared(self.table_uri(name), None)
        if dt is None:
            return None
        key = (shared, tuple(columns) if columns is not None else None)
        if filters is None and shared is not None:
            hit = _READS.get(key)
            if hit is not None:
                return hit
        ds = delta_dataset(dt)
        if columns is not None:
            columns = [c for c in columns if c in ds.schema.names]
        t = ds.to_table(columns=columns, filter=filters)
        if filters is None and shared is not None and t.nbytes <= _MEMO_MAX_BYTES:
            _READS.put(key, t)
        return t

    def append(
        self,
        name: str,
        data: pa.Table,
        *,
        op: str,
        partition_by: list[str] | None = None,
        txn: tuple[str, int] | None = None,
        metadata: dict[str, Any] | None = None,
        mode: str = "append",
        predicate: str | None = None,
        writer_properties: WriterProperties | None = None,
    ) -> int:
        """Write ``data`` to table ``name`` in one commit; returns the new version.

        ``op`` and ``metadata`` are recorded in the commit; ``txn`` = (app_id, version) makes the
        commit idempotent and traceable (spec: nothing half-written, re-runs are no-ops).
        ``writer_properties``: the Parquet writer's options (row group size, compression).
        """
        custom = {"lmat.op": op, **{f"lmat.{k}": v for k, v in (metadata or {}).items()}}
        props = CommitProperties(
            custom_metadata={k: str(v) for k, v in custom.items()},
            app_transactions=[Transaction(app_id=txn[0], version=txn[1])] if txn else None,
        )
        existing = self.open_table(name)
        write_deltalake(  # type: ignore[call-overload, misc]
            existing if existing is not None else self.table_uri(name),
            data,
            mode=mode,
            partition_by=partition_by if existing is None else None,
            schema_mode="merge" if existing is not None and mode == "append" else None,
            predicate=predicate,
            writer_properties=writer_properties,
            commit_properties=props,
            storage_options=storage_options(),
        )
        dt = self.open_table(name)
        assert dt is not None
        checkpoint_if_due(dt)
        return dt.version()

    def txn_version(self, name: str, app_id: str) -> int | None:
        dt = self.open_table(name)
        if dt is None:
            return None
        return dt.transaction_version(app_id)

    # ---------------------------------------------------------------- write lock
    @contextlib.contextmanager
    def write_lock(self, *, timeout_s: float = 600.0) -> Iterator[None]:
        """Serialize writers of one store (ingest, snapshot, forget, compaction).

        Local stores use an fcntl lock, which the OS releases when a writer dies (even by SIGKILL).
        Object stores use a lease taken and renewed with conditional writes, which expires when
        its writer dies (see :mod:`lmat_platform.store.lease`; ``LMAT_LEASE_SECONDS``). Writers
        read the store's state only inside the lock. :class:`ConcurrencyError` names the holder
        if the lock is not free within ``timeout_s``, or if the lease was lost while writing.
        """
        if not self.is_local:
            from lmat_platform.store.lease import StoreLease

            with StoreLease(self.root, timeout_s=timeout_s) as lease:
                yield
                lease.check()
            return
        path = os.path.join(self.root, "_lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConcurrencyError(
                            f"{self.root}: another writer held the store lock for {timeout_s:.0f}s"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)


class _Memo:
    """A small thread-safe LRU of what the process derived once (by key)."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)


_SHARED_MAX = 64
#: Opened table versions, whole reads of small tables, what readers derive from a log.
_SHARED = _Memo(_SHARED_MAX)
_READS = _Memo(_SHARED_MAX)
_DERIVED = _Memo(4 * _SHARED_MAX)


def _commit_stamp(uri: str, version: int | None) -> tuple[int | None, tuple[int, int] | None]:
    """The table's latest commit version (or ``version``) and its commit file's (modification
    time in ns, size), from one listing of its log: (None, None) for no log, (version, None)
    when that commit file is gone. A commit file appears whole, or not at all."""
    if not _is_uri(uri):
        # Local logs: one scandir for the names and one stat, of the file that matters (every
        # reader lists the logs it reads to find their latest versions); a given version needs
        # the stat alone.
        log_dir = os.path.join(os.path.abspath(uri.removeprefix("file://")), "_delta_log")
        if version is not None:
            try:
                st = os.stat(os.path.join(log_dir, f"{int(version):020d}.json"))
            except FileNotFoundError:
                return int(version), None
            return int(version), (st.st_mtime_ns, st.st_size)
        try:
            with os.scandir(log_dir) as it:
                versions = [int(n[:20]) for e in it if len(n := e.name) == 25
                            and n.endswith(".json") and n[:20].isdigit()]
        except FileNotFoundError:
            return None, None
        if not versions:
            return None, None
        version = max(versions)
        try:
            st = os.stat(os.path.join(log_dir, f"{version:020d}.json"))
        except FileNotFoundError:  # cleaned up since the listing
            return version, None
        return version, (st.st_mtime_ns, st.st_size)
    fs, path = pafs.FileSystem.from_uri(uri)
    sel = pafs.FileSelector(f"{path.rstrip('/')}/_delta_log", allow_not_found=True)
    commits = {int(m.group(1)): (i.mtime_ns or 0, i.size or 0) for i in fs.get_file_info(sel)
               if (m := _COMMIT_FILE.match(i.base_name))}
    if version is None:
        if not commits:
            return None, None
        version = max(commits)
    return version, commits.get(int(version))


def _shared(uri: str, version: int | None) -> tuple[DeltaTable | None, Hashable | None]:
    """:func:`shared_delta_table` and the key its reads are remembered under (None: not
    shared). The key holds the commit file's time and size, so a table deleted and written
    again at the same path (version 0 again) is not mistaken for the old one."""
    version, stamp = _commit_stamp(uri, version)
    if version is None:
        return None, None
    if stamp is None:  # the commit file was cleaned up after a checkpoint: open, do not share
        try:
            return DeltaTable(uri, version=version, storage_options=storage_options()), None
        except TableNotFoundError:
            return None, None
    key = (uri.rstrip("/"), int(version), stamp)
    dt = _SHARED.get(key)
    if dt is not None:
        return dt, key
    try:
        dt = DeltaTable(uri, version=version, storage_options=storage_options())
    except TableNotFoundError:
        return None, None
    _SHARED.put(key, dt)
    return dt, key


def derived(uri: str, tag: str, fn: Callable[[DeltaTable], Any]) -> Any:
    """``fn(table)`` for the latest version of the Delta table at ``uri``, computed once per
    version and process (None if the table has no log): what readers derive from a table's log
    (file lists, registries) is rebuilt only when a commit lands. ``fn``'s result is shared:
    treat it as read-only."""
    return derived_keyed(uri, tag, fn)[0]


def derived_keyed(
    uri: str, tag: str, fn: Callable[[DeltaTable], Any], *, version: int | None = None
) -> tuple[Any, Hashable | None]:
    """:func:`derived` (of ``version``, the latest if None), and the key of the table version
    it comes from (None: no table, or a version not shared): equal keys, equal versions of the
    same table."""
    dt, key = _shared(uri, version)
    if dt is None:
        return None, None
    if key is None:
        return fn(dt), None
    out = _DERIVED.get((key, tag))
    if out is None:
        out = fn(dt)
        _DERIVED.put((key, tag), out)
    return out, key


def shared_delta_table(uri: str, version: int | None = None) -> DeltaTable | None:
    """A Delta table version opened once per process and shared: never write through it, nor
    move it to another version (writers use :meth:`Store.open_table`). The latest version is
    found by listing the log, so a new commit is seen at once. None if the table has no log."""
    return _shared(uri, version)[0]


def checkpoint_if_due(dt: DeltaTable) -> None:
    """Write a checkpoint after every :data:`CHECKPOINT_INTERVAL`-th commit (a failure is only
    logged: the commit is in, and a checkpoint only speeds up later opens)."""
    v = dt.version()
    if v > 0 and v % CHECKPOINT_INTERVAL == 0:
        try:
            dt.create_checkpoint()
        except Exception as e:  # noqa: BLE001 - see docstring
            log.warning("checkpoint of %s at version %d failed: %s", dt.table_uri, v, e)


def delta_dataset(dt: DeltaTable) -> pads.Dataset:
    """A pyarrow dataset over the live files of a Delta table version.

    Built on pyarrow's own filesystems rather than ``DeltaTable.to_pyarrow_dataset()``: reading
    through delta-rs's filesystem handler (deltalake 1.6 with pyarrow 26) makes the interpreter
    abort at exit about half the time ("terminate called without an active exception").
    The table's schema is applied so files written before an additive schema change read with
    nulls in the new columns. Tables with deletion vectors are not supported (lmat writes none).
    """
    import pyarrow.dataset as pads

    schema = pa.schema(dt.schema().to_arrow())
    parts = list(dt.metadata().partition_columns)
    uri = dt.table_uri.rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        fs, base = pafs.FileSystem.from_uri(uri)
        files = [pafs.FileSystem.from_uri(f)[1] for f in dt.file_uris()]
    else:
        fs, base = pafs.LocalFileSystem(), uri.removeprefix("file://")
        files = [f.removeprefix("file://") for f in dt.file_uris()]
    partitioning = None
    if parts:
        partitioning = pads.partitioning(
            pa.schema([schema.field(p) for p in parts]), flavor="hive"
        )
    return pads.dataset(
        files,
        schema=schema,
        format="parquet",
        filesystem=fs,
        partitioning=partitioning,
        partition_base_dir=base,
    )


def _read_meta(root: str) -> dict[str, Any] | None:
    if _is_uri(root):
        fs, path = pafs.FileSystem.from_uri(root)
        try:
            with fs.open_input_stream(f"{path}/{META_FILE}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None
    p = os.path.join(root.removeprefix("file://"), META_FILE)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    # Read once per version of the file (a store is opened by every loader and pass).
    key = ("meta", os.path.abspath(p), st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _READS.get(key)
    if hit is not None:
        return dict(hit)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        meta: dict[str, Any] = json.load(f)
    _READS.put(key, dict(meta))
    return meta


def init_store(
    root: str,
    *,
    n_buckets: int = 16,
    row_group_rows: int = 8192,
    retention_hours: int = 168,
) -> Store:
    """Create an empty store at ``root`` (a directory or object-store URI)."""
    if n_buckets < 1 or n_buckets > 65536:
        raise ValueError(f"n_buckets must be in 1..65536, but got {n_buckets}")
    if row_group_rows < 64:
        raise ValueError(f"row_group_rows must be at least 64, but got {row_group_rows}")
    if retention_hours < 0:
        raise ValueError(f"retention_hours must be >= 0, but got {retention_hours}")
    if _read_meta(root) is not None:
        raise StoreExistsError(f"{root}: a store already exists here")
    meta = {
        "format": FORMAT_VERSION,
        "store_id": uuid.uuid4().hex,
        "n_buckets": n_buckets,
        "row_group_rows": row_group_rows,
        "retention_hours": retention_hours,
        "created_at": now_us(),
    }
    payload = json.dumps(meta, indent=2).encode()
    if _is_uri(root):
        from lmat_platform.store.lease import create_if_absent

        # A conditional create: of two concurrent inits, one creates the store, one is refused.
        if not create_if_absent(root, META_FILE, payload):
            raise StoreExistsError(f"{root}: a store already exists here")
    else:
        local = root.removeprefix("file://")
        if os.path.exists(local) and not os.path.isdir(local):
            raise StoreExistsError(f"{root}: exists and is not a directory")
        if os.path.isdir(local) and os.listdir(local):
            raise StoreExistsError(f"{root}: directory is not empty and holds no lmat store")
        os.makedirs(local, exist_ok=True)
        tmp = os.path.join(local, f".{META_FILE}.{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(local, META_FILE))
    log.info("initialized store %s (%s buckets)", root, n_buckets)
    return open_store(root)


def open_store(root: str) -> Store:
    """Open an existing store; :class:`StoreNotFoundError` if there is none at ``root``."""
    meta = _read_meta(root)
    if meta is None:
        raise StoreNotFoundError(f"{root}: no lmat store here (run 'lmat init {root}' first)")
    if meta.get("format") != FORMAT_VERSION:
        raise StoreNotFoundError(
            f"{root}: store format {meta.get('format')} is not supported (want {FORMAT_VERSION})"
        )
    cfg = StoreConfig(
        store_id=meta["store_id"],
        n_buckets=int(meta["n_buckets"]),
        row_group_rows=int(meta["row_group_rows"]),
        retention_hours=int(meta["retention_hours"]),
    )
    return Store(root.removeprefix("file://") if root.startswith("file://") else root, cfg)


def as_store(store: Store | str) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def delta_folders(store: Store) -> list[str]:
    """Names of the store's folders that hold a Delta log (every table written, whatever stage
    wrote it), sorted."""
    fs, root = store.filesystem()
    sel = pafs.FileSelector(root, allow_not_found=True)
    return sorted(
        os.path.basename(i.path.rstrip("/")) for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.Directory
        and fs.get_file_info(f"{i.path}/_delta_log").type == pafs.FileType.Directory
    )


def table_names(store: Store) -> list[str]:
    """The store's tables: :data:`TABLES` (whether written yet or not), then every other
    folder of the store that holds a Delta log (the summary tier's tables, ...), by name."""
    return [*TABLES, *(n for n in delta_folders(store) if n not in TABLES)]


def disk_bytes(store: Store) -> dict[str, int]:
    """Bytes on disk per table (every file under the table, including unvacuumed ones), for
    every table of :func:`table_names`."""
    fs, root = store.filesystem()
    out: dict[str, int] = {}
    for name in table_names(store):
        sel = pafs.FileSelector(f"{root}/{name}", recursive=True, allow_not_found=True)
        out[name] = sum(i.size or 0 for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)
    return out


def live_bytes(store: Store) -> dict[str, int]:
    """Bytes of the files each table's latest version references (what a reader can touch),
    for every table of :func:`table_names`."""
    out: dict[str, int] = {}
    for name in table_names(store):
        dt = store.open_table(name)
        if dt is None:
            out[name] = 0
            continue
        t = pa.table(dt.get_add_actions(flatten=True))
        out[name] = int(pa.compute.sum(t.column("size_bytes")).as_py() or 0) if t.num_rows else 0
    return out


# ---------------------------------------------------------------- the commit hook (fault injection)
#: Test-only switches, read at every commit: SIGKILL this process right after its N-th Delta
#: commit, or right before it; append one line ``N<TAB>kind<TAB>table`` per commit to a file.
FAULT_KILL_AFTER = "LMAT_FAULT_KILL_AFTER_COMMIT"
FAULT_KILL_BEFORE = "LMAT_FAULT_KILL_BEFORE_COMMIT"
FAULT_COMMIT_LOG = "LMAT_FAULT_COMMIT_LOG"
_FAULT_VARS = (FAULT_KILL_AFTER, FAULT_KILL_BEFORE, FAULT_COMMIT_LOG)
_hook_depth = threading.local()
_commits_made = 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def commit_hook(stage: str, kind: str, table: str) -> None:
    """The one place every Delta commit of the process passes, just ``"before"`` and just
    ``"after"`` it lands (``kind``: the delta-rs call, ``table``: its URI).

    It does nothing unless a fault switch is set (:data:`FAULT_KILL_AFTER`,
    :data:`FAULT_KILL_BEFORE`, :data:`FAULT_COMMIT_LOG`): the crash harness
    (``tests/crash_harness.py``) uses them to kill a writer at every commit boundary with a real
    SIGKILL, which no ``finally`` or ``atexit`` can soften.
    """
    global _commits_made
    if stage == "before":
        if _env_int(FAULT_KILL_BEFORE) == _commits_made + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    _commits_made += 1
    path = os.environ.get(FAULT_COMMIT_LOG)
    if path:
        with open(path, "a") as f:
            f.write(f"{_commits_made}\t{kind}\t{table.rstrip('/')}\n")
    if _env_int(FAULT_KILL_AFTER) == _commits_made:
        os.kill(os.getpid(), signal.SIGKILL)


def _table_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    first = args[0] if args else kwargs.get("table_or_uri", kwargs.get("table_uri", ""))
    for obj in (first, getattr(first, "table", None)):
        uri = getattr(obj, "table_uri", None)
        if isinstance(uri, str):
            return uri
    return str(first)


def _hooked(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(fn, "__lmat_hooked__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_hook_depth, "n", 0):  # a commit call made inside another: counted once
            return fn(*args, **kwargs)
        table = _table_of(args, kwargs)
        commit_hook("before", kind, table)
        _hook_depth.n = 1
        try:
            out = fn(*args, **kwargs)
        finally:
            _hook_depth.n = 0
        commit_hook("after", kind, table)
        return out

    wrapper.__lmat_hooked__ = True  # type: ignore[attr-defined]
    return wrapper


def install_commit_hooks() -> None:
    """Route every committing call of delta-rs's Python API through :func:`commit_hook`
    (idempotent). Installed at import when a fault switch is set; the harness's forked writers
    call it themselves. Never needed in production."""
    import sys

    import deltalake
    import deltalake.table as dtable
    import deltalake.transaction as dtxn
    import deltalake.writer as dwriter
    import deltalake.writer.writer as dwriter_mod

    orig_write = dwriter_mod.write_deltalake
    write = _hooked("write", orig_write)
    for mod in (deltalake, dwriter, dwriter_mod):
        mod.write_deltalake = write  # type: ignore[attr-defined]
    dtxn.create_table_with_add_actions = _hooked("create", dtxn.create_table_with_add_actions)
    for cls, names in (
        (dtable.DeltaTable, ("delete", "update", "restore", "repair", "vacuum",
                             "create_write_transaction", "create_checkpoint",
                             "cleanup_metadata")),
        (dtable.TableOptimizer, ("compact", "z_order")),
        (dtable.TableMerger, ("execute",)),
        (dtable.TableAlterer, tuple(n for n in vars(dtable.TableAlterer) if not n.startswith("_"))),
    ):
        for name in names:
            setattr(cls, name, _hooked(name, getattr(cls, name)))
    # Modules that imported ``write_deltalake`` by name before now get the hooked one too.
    for name, mod in list(sys.modules.items()):
        if name.startswith("lmat_platform") and getattr(mod, "write_deltalake", None) is orig_write:
            mod.write_deltalake = write  # type: ignore[attr-defined]


if any(os.environ.get(v) for v in _FAULT_VARS):
    install_commit_hooks()
