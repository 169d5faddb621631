"""Persistent reader worker processes and batches through reused shared memory.

With ``num_workers > 0`` a :class:`~lmat_platform.reader.SequenceLoader` starts its worker
processes once and keeps them for every later pass (as ``DataLoader(persistent_workers=True)``
does): each pass sends every worker its consumer's plan, so a worker's process, imports,
compiled kernels and decoded cache (``LMAT_DECODE_CACHE_MB``) outlive the pass. Every worker
is dealt whole buckets where rows allow (:func:`~lmat_platform.reader.loader.assign_units`),
so workers decode disjoint thin files and tier row groups.

Each pass also sends the pass expected next (the same plans, or the next epoch's after
``set_epoch``), which a worker starts as soon as it has put its last batch of this one: the next
pass's first batches are being made while the consumer still works through this pass's last
ones. A next pass that differs cancels it; what it made is dropped (a unit and ``prefetch``
batches per worker at most, also after the last pass of a run).

A batch travels as one buffer, not tensor by tensor. Each worker owns a few *slots*: shared
memory buffers that both processes map. The worker's copy kernel writes a batch's values
straight into a free slot and sends a small message (the slot's number, where each column
lies in it, and the per-request arrays, a few KB); the main process wraps the slot's bytes as
tensors without copying. A slot is reused once the consumer has dropped every tensor of its
batch, which the main process sees from CPython's reference counts (as
:mod:`~lmat_platform.reader.buffers` does) and tells the worker through a shared flag::

    worker w                                  main process
    flags[k] == 0 -> write batch into slot k
    flags[k] = 1, send (k, layout, ids) --->  tensors = views of slot k  --> training step
                                              batch dropped: refcount of slot k back to 1
    slot k free again  <---  flags[k] = 0

A slot is created (or grown) by the worker and its shared memory handle sent once, with the
first batch that uses it. When every slot is in use (a consumer that keeps many batches), the
batch is sent the ordinary way (tensors in shared memory of their own), so nothing waits for a
slot.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from lmat_platform.reader.batch import Batch
from lmat_platform.reader.errors import (
    ReaderPassCancelledError,
    ReaderTimeoutError,
    ReaderWorkerError,
)
from lmat_platform.reader.prefetch import POLL_S

log = logging.getLogger(__name__)

#: Shared-memory slots per worker (the queue holds ``prefetch`` batches, the consumer one or
#: two, and a released slot is noticed at the next batch).
MAX_SLOTS = 8
#: Smallest slot, and the head room a new slot gets (batches of a pass vary in size).
MIN_SLOT_BYTES = 1 << 20
_ALIGN = 64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ---------------------------------------------------------------------------------- worker side


class SlotWriter:
    """A worker's slots: hands out views of a free slot for a batch's columns."""

    def __init__(self, flags: torch.Tensor):
        self.flags = flags
        self.slots: list[torch.Tensor | None] = [None] * len(flags)
        self.bases: list[np.ndarray | None] = [None] * len(flags)
        #: Whether the main process has slot k's present buffer (its handle went out with a
        #: batch that was sent). A slot made for a batch that was then not sent (its pass was
        #: cancelled) is announced with the next batch that uses it.
        self.known = [False] * len(flags)
        #: The slot the last allocation used (None: ordinary memory), and whether it is new.
        self.last: tuple[int, bool] | None = None
        self.layout: list[tuple[int, int]] = []

    def alloc(self, sizes: list[tuple[int, np.dtype]]) -> list[np.ndarray]:
        """Arrays of ``sizes`` (values, dtype) for one batch, in one free slot when there is
        one (else ordinary memory)."""
        offs, need = [], 0
        for n, dt in sizes:
            offs.append(need)
            need += _aligned(n * np.dtype(dt).itemsize)
        free = [k for k in range(len(self.flags)) if int(self.flags[k]) == 0]
        fits = {k: s.numel() for k in free
                if (s := self.slots[k]) is not None and s.numel() >= need}
        self.layout = [(o, n * np.dtype(dt).itemsize) for o, (n, dt) in zip(offs, sizes,
                                                                             strict=True)]
        if fits:
            k = min(fits, key=fits.__getitem__)
            new = not self.known[k]
        elif free:
            # A slot never made, or too small: (re)made with head room.
            k = next((i for i in free if self.slots[i] is None), free[0])
            size = max(MIN_SLOT_BYTES, need + need // 4)
            t = torch.empty(size, dtype=torch.uint8).share_memory_()
            self.slots[k] = t
            self.bases[k] = t.numpy()
            self.known[k] = False
            new = True
        else:
            self.last = None
            return [np.empty(n, dtype=dt) for n, dt in sizes]
        self.flags[k] = 1
        self.last = (k, new)
        base = self.bases[k]
        assert base is not None
        return [base[o:o + nb].view(dt) for (o, nb), (_, dt) in zip(self.layout, sizes,
                                                                     strict=True)]

    def sent(self) -> None:
        """The last batch was sent: the main process has its slot now and frees it."""
        if self.last is not None:
            self.known[self.last[0]] = True
            self.last = None

    def release_last(self) -> None:
        """The last slot handed out will not be sent (the pass was cancelled): free again."""
        if self.last is not None:
            self.flags[self.last[0]] = 0
            self.last = None

    def pack(self, batch: Batch) -> dict[str, Any]:
        """The message for a batch made by the last :meth:`alloc`: slot, layout and small
        arrays, or the batch itself when it is in ordinary memory."""
        if self.last is None:
            return {"batch": batch}
        small = {
            "request_id": batch.request_id.numpy(), "lengths": batch.lengths.numpy(),
            "user_id": None if batch.user_id is None else batch.user_id.numpy(),
            "request_ts": None if batch.request_ts is None else batch.request_ts.numpy(),
            "context": {c: v.numpy() for c, v in batch.context.items()},
            "bytes_read": batch.bytes_read, "thin_bytes_read": batch.thin_bytes_read,
            "inverse_indices": None if batch.inverse_indices is None
            else batch.inverse_indices.numpy(),
        }
        k, new = self.last
        cols = [(c, str(v.numpy().dtype), o, nb)
                for (c, v), (o, nb) in zip(batch.values.items(), self.layout, strict=True)]
        return {"slot": k, "new": self.slots[k] if new else None, "columns": cols, **small}


def worker_loop(w: int, tasks: Any, out: Any, stop: Any, current: Any, flags: torch.Tensor,
                run: Callable[[Any, Callable[..., list[np.ndarray]]],
                              Iterator[tuple[int, Batch]]]) -> None:
    """Body of a persistent worker: runs each pass it is sent (``(pass id, spec)``) while
    ``current`` names that pass, and puts its batches on ``out``."""
    torch.set_num_threads(1)
    writer = SlotWriter(flags)
    while not stop.is_set():
        try:
            task = tasks.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if task is None:
            break
        pass_id, spec = task

        def live(pass_id: int = pass_id) -> bool:
            # The pass in progress, or the next one sent ahead of it (WorkerPool.run).
            return current.value in (pass_id, pass_id - 1) and not stop.is_set()

        def put(msg: tuple[Any, ...], live: Callable[[], bool] = live) -> bool:
            while live():
                try:
                    out.put(msg, timeout=POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        if not live():
            continue  # a pass cancelled (or sent ahead and not wanted) before it began

        try:
            with contextlib.closing(run(spec, writer.alloc)) as batches:  # type: ignore[type-var]
                for end, batch in batches:
                    msg = ("batch", pass_id, end, writer.pack(batch))
                    del batch
                    if not put(msg):
                        writer.release_last()
                        break
                    writer.sent()  # the consumer frees it (release_last must not)
                else:
                    put(("done", pass_id, None, None))
        except BaseException as e:
            writer.release_last()
            tb = traceback.format_exc()
            try:
                payload: Any = pickle.dumps(e)
            except Exception:  # the exception itself may not pickle; its text always does
                payload = None
            put(("error", pass_id, (payload, type(e).__name__, str(e), tb), None))


# ---------------------------------------------------------------------------------- main side


class SlotReader:
    """The main process's view of one worker's slots: batches as views of them, and the
    flags that free them once their tensors are gone."""

    def __init__(self, flags: torch.Tensor):
        self.flags = flags
        #: Each slot's bytes (the array keeps the shared tensor's storage alive).
        self.bases: list[np.ndarray | None] = [None] * len(flags)
        self.out: set[int] = set()

    def _adopt(self, meta: dict[str, Any]) -> int:
        k = int(meta["slot"])
        if meta["new"] is not None:
            self.bases[k] = meta["new"].numpy()
        return k

    def discard(self, meta: dict[str, Any]) -> None:
        """A message of a cancelled pass: its slot is free at once."""
        if "slot" in meta:
            self.flags[self._adopt(meta)] = 0

    def reclaim(self) -> None:
        """Free the slots whose batches the consumer has dropped."""
        for k in list(self.out):
            # The only references left: the list's and getrefcount's own argument.
            if sys.getrefcount(self.bases[k]) <= 2:
                self.out.discard(k)
                self.flags[k] = 0

    def unpack(self, meta: dict[str, Any]) -> Batch:
        self.reclaim()
        if "slot" not in meta:
            b: Batch = meta["batch"]
            return b
        k = self._adopt(meta)
        base = self.bases[k]
        assert base is not None
        self.out.add(k)
        values = {c: torch.from_numpy(base[o:o + nb].view(np.dtype(dt)))
                  for c, dt, o, nb in meta["columns"]}
        return Batch(
            request_id=torch.from_numpy(meta["request_id"]),
            lengths=torch.from_numpy(meta["lengths"]),
            values=values,
            context={c: torch.from_numpy(v) for c, v in meta["context"].items()},
            user_id=None if meta["user_id"] is None else torch.from_numpy(meta["user_id"]),
            request_ts=None if meta["request_ts"] is None else torch.from_numpy(meta["request_ts"]),
            bytes_read=int(meta["bytes_read"]),
            thin_bytes_read=int(meta["thin_bytes_read"]),
            inverse_indices=None if meta["inverse_indices"] is None
            else torch.from_numpy(meta["inverse_indices"]),
        )


class WorkerPool:
    """``n`` worker processes kept across passes; :meth:`run` is one pass over them."""

    def __init__(self, n: int, *, prefetch: int, timeout_s: float | None, ctx: Any,
                 target: Callable[..., None]):
        self.n = n
        self.timeout_s = timeout_s
        self.ctx = ctx
        self.stop = ctx.Event()
        self.current = ctx.Value("q", 0)
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.queues = [ctx.Queue(maxsize=prefetch) for _ in range(n)]
        flags = [torch.zeros(MAX_SLOTS, dtype=torch.int8).share_memory_() for _ in range(n)]
        self.readers = [SlotReader(f) for f in flags]
        self.procs = [
            ctx.Process(target=target, args=(w, self.tasks[w], self.queues[w], self.stop,
                                              self.current, flags[w]),
                        daemon=True, name=f"lmat-reader-{w}")
            for w in range(n)
        ]
        for p in self.procs:
            p.start()
        #: Whether worker w has sent anything (else it died starting up).
        self.heard = [False] * n
        self.pass_id = 0
        #: The pass sent ahead (its key and id), which workers start once done with theirs.
        self.ahead: tuple[Any, int] | None = None
        #: The pass whose iterator is open and not cancelled by a newer one (None: none).
        self.open_pass: int | None = None
        self._lock = threading.Lock()
        self.closed = False

    def alive(self) -> bool:
        return not self.closed and all(p.is_alive() for p in self.procs)

    def run(self, specs: list[Any], first: int,
            on_error: Callable[[int, ReaderWorkerError], BaseException],
            key: Any = None, ahead: tuple[Any, list[Any]] | None = None,
            ) -> Iterator[tuple[int, int, Batch]]:
        """One pass: worker w runs ``specs[w]``; batches come round-robin from worker
        ``first`` on, as (worker, stream end row, batch).

        ``key`` names the pass's plans (equal keys: equal plans). ``ahead``: the key and plans
        of the pass expected next, sent now so that each worker starts it as soon as it is
        done with this one (its first batches are ready when the next pass begins, instead
        of each pass starting with every worker's first unit to read); a next pass whose key
        differs cancels it (what it made is dropped), so it costs at most a unit and
        ``prefetch`` batches per worker when the guess is wrong.

        One pass at a time: a call while an earlier pass's iterator is still open cancels that
        pass (as a new iterator of a ``DataLoader`` with persistent workers does); the earlier
        iterator then raises :class:`ReaderPassCancelledError` and reads nothing more, so the
        new pass gets every one of its batches. Batches the consumer already holds keep their
        slots until dropped."""
        if len(specs) != self.n:
            raise ValueError(f"{len(specs)} consumer plans for {self.n} workers")
        with self._lock:
            sent, self.ahead = self.ahead, None
            if sent is not None and key is not None and sent[0] == key:
                pid = sent[1]  # already under way
                self.current.value = pid
            else:
                # A pass sent ahead and not wanted is no longer live from here on.
                self.pass_id += 1
                pid = self.pass_id
                self.current.value = pid
                for w, s in enumerate(specs):
                    self.tasks[w].put((pid, s))
            self.open_pass = pid
            if ahead is not None:
                self.pass_id += 1
                self.ahead = (ahead[0], self.pass_id)
                for w, s in enumerate(ahead[1]):
                    self.tasks[w].put((self.pass_id, s))
        done = False
        try:
            active = [True] * self.n
            w = first % self.n
            while any(active):
                if self.open_pass != pid:
                    raise ReaderPassCancelledError()
                if not active[w]:
                    w = (w + 1) % self.n
                    continue
                try:
                    kind, tag, a, b = self._get(w, pid)
                except ReaderWorkerError as e:
                    raise on_error(w, e) from e
                self.heard[w] = True
                if kind == "batch":
                    yield w, a, self.readers[w].unpack(b)
                elif kind == "done":
                    active[w] = False
                else:
                    _raise_remote(a, w)
                w = (w + 1) % self.n
            done = True
        finally:
            with self._lock:
                if self.open_pass == pid:
                    self.open_pass = None
                if not done and self.current.value == pid:
                    # Workers abandon the pass (and the one sent ahead) at their next batch;
                    # what they queued is dropped when the next pass meets it. A pass that a
                    # newer one cancelled leaves alone that pass and what it sent ahead.
                    self.ahead = None
                    self.current.value = -pid

    def _get(self, w: int, pid: int) -> tuple[str, int, Any, Any]:
        q, proc = self.queues[w], self.procs[w]
        t0 = time.monotonic()
        while True:
            try:
                msg = q.get(timeout=POLL_S)
            except (EOFError, ConnectionError) as e:
                proc.join(timeout=POLL_S)
                raise ReaderWorkerError(
                    f"reader worker {w} (pid {proc.pid}) stopped mid-message "
                    f"(exit code {proc.exitcode}): {type(e).__name__}: {e}"
                ) from e
            except queue.Empty:
                if not proc.is_alive():
                    try:
                        msg = q.get(timeout=POLL_S)
                    except queue.Empty:
                        raise ReaderWorkerError(
                            f"reader worker {w} (pid {proc.pid}) exited with code "
                            f"{proc.exitcode} without reporting an error"
                        ) from None
                else:
                    waited = time.monotonic() - t0
                    if self.timeout_s is not None and waited > self.timeout_s:
                        raise ReaderTimeoutError(
                            f"no batch from reader worker {w} in {waited:.0f} s "
                            f"(timeout_s={self.timeout_s})"
                        ) from None
                    continue
            if msg[1] == pid:
                return msg
            # From a pass that was cancelled: its slot is free again.
            self.heard[w] = True
            if msg[0] == "batch":
                self.readers[w].discard(msg[3])

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        for t in self.tasks:
            with contextlib.suppress(Exception):
                t.put(None)
        for q in self.queues:
            # Drop what is queued so the workers' feeder threads can exit.
            for _ in range(64):
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
                except Exception:  # noqa: BLE001 - a discarded message may not unpickle
                    continue
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in (*self.queues, *self.tasks):
            q.close()
            q.join_thread()


class _RemoteTraceback(Exception):
    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\nTraceback in the reader worker:\n{self.tb}"


def _raise_remote(info: tuple[bytes | None, str, str, str], worker: int) -> None:
    payload, name, msg, tb = info
    exc: BaseException | None = None
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if exc is None:
        exc = ReaderWorkerError(f"reader worker {worker} failed: {name}: {msg}")
    raise exc from _RemoteTraceback(tb)

