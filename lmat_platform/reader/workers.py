"""Persistent reader worker processes and batches through reused shared memory.

With ``num_workers > 0`` a :class:`~lmat_platform.reader.SequenceLoader` starts its worker
processes once and keeps them for every later pass (as ``DataLoader(persistent_workers=True)``
does): each pass sends every worker its consumer's plan, so a worker's process, imports,
compiled kernels and decoded cache (``LMAT_DECODE_CACHE_MB``) outlive the pass. Every worker
is dealt whole buckets where rows allow (:func:`~lmat_platform.reader.loader.assign_units`),
so workers decode disjoint thin files and tier row groups.

Each pass also sends the pass expected next (the same plans, or the next epoch's after
``set_epoch``), which a worker starts as soon as it has sent its last batch of this one: the
next pass's first batches are being made while the consumer still works through this pass's
last ones. A next pass that differs cancels it; what it made is dropped (a unit and
``prefetch`` batches per worker at most, also after the last pass of a run). One pass runs at
a time: a new iterator over the loader cancels the pass of an older one, which then raises
:class:`~lmat_platform.reader.errors.ReaderPassCancelledError`.

A batch travels as one buffer, not tensor by tensor. Each worker owns a few *slots*: shared
memory buffers that both processes map. The worker's copy kernel writes a batch's values
straight into a free slot, the worker copies the per-request arrays (ids, lengths, context)
behind them, and sends a fixed 72-byte header down its own pipe (slot, pass, stream end row,
values and requests in the batch, bytes read); the main process wraps the slot's bytes as
tensors without copying and without unpickling anything. Which columns a slot holds, and in
which dtypes (the *layout*), is pickled once, with the first batch that needs it, as is a slot's
shared-memory handle. A slot is reused once the consumer has dropped every tensor of its batch,
which the main process sees from CPython's reference counts (as
:mod:`~lmat_platform.reader.buffers` does) and tells the worker through a shared flag::

    worker w                                  main process
    flags[k] == 0 -> write batch into slot k
    flags[k] = 1, send header (k, counts) --> tensors = views of slot k  --> training step
                                              batch dropped: refcount of slot k back to 1
    slot k free again  <---  flags[k] = 0

Back-pressure: a semaphore of permits per worker; the worker takes one per message. The main
process gives them back in groups of ``g`` messages read, not one by one: giving a permit back
to a worker that waits for it wakes that worker, and on a machine whose cores are all busy the
woken worker often takes the core of the main process there and then (0.1-0.4 ms in the
middle of the consumer's ``next()``, a batch's whole hand-over costing 0.3-0.5 ms of a short
tenant's 7 ms step). So a worker starts with ``prefetch`` permits, and ``g - 1`` more once its
first batch shows the slots' size: at most ``prefetch + g - 1`` messages not given back, of
which the main process holds back at most ``g - 1``, so at least ``prefetch`` are in the pipe
whenever the worker is ahead, as before, and the worker is woken once per ``g`` batches.
``g`` is up to ``MAX_GROUP``, as many as ``GROUP_BYTES`` of extra slots allow (short and
medium tenants' batches: 4 and 3; a long tenant's 70 MB batches: 1, its step being long
enough that a wake-up a batch is 1-2% of it). Each worker has :func:`slots_for` slots for
it. When every slot is in use all the same (a consumer that keeps many batches), the batch is
sent the ordinary way (pickled, tensors in shared memory of their own), so nothing waits for a
slot. A worker whose main process has gone stops by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import select
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
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

#: The most messages a worker's permits are given back in at once (:class:`WorkerPool`).
MAX_GROUP = 4
#: Shared memory a worker's grouped permits may keep in use beyond ``prefetch`` batches.
GROUP_BYTES = 64 << 20
#: Smallest slot, and the head room a new slot gets (batches of a pass vary in size).
MIN_SLOT_BYTES = 1 << 20
_ALIGN = 64

#: A message's fixed header: kind, pass id, stream end row, slot, then the batch's values per
#: column, requests, sequences (lengths), bytes read and thin bytes read.
_HEAD = struct.Struct("<B7xqqi4xqqqqq")
#: Kinds: a batch in a slot whose handle and layout the main process has (header only); the
#: same with a pickled dict after the header (a new slot handle, a new layout, or per-request
#: arrays that did not fit in the slot); a pickled Batch (no slot free); the pass is done; it
#: failed (pickled error).
SLOT, SLOT_PICKLED, BATCH, DONE, ERROR = 1, 2, 3, 4, 5
#: Per-request arrays of a batch, in the order they lie in a slot behind the values; context
#: columns follow them. ``True``: one value per sequence (``lengths``), else per request.
_SMALL = (("request_id", False), ("lengths", True), ("user_id", False), ("request_ts", False),
          ("inverse_indices", False))


def slots_for(prefetch: int) -> int:
    """Slots a worker may need: ``prefetch`` batches in the pipe and up to ``MAX_GROUP - 1``
    more whose permits the main process holds back, one being made, the consumer's one or
    two, and one released but noticed only at the next batch."""
    return prefetch + MAX_GROUP + 2


#: Shared-memory slots per worker at the default ``prefetch`` 2.
MAX_SLOTS = slots_for(2)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def header(msg: bytes) -> tuple[int, int, int, int, int, int, int, int, int]:
    """A message's header: (kind, pass id, end row, slot, values, requests, sequences,
    bytes read, thin bytes read)."""
    return _HEAD.unpack_from(msg)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Channel:
    """One worker's way to the main process: the write end of a pipe and the semaphore of
    permits (``prefetch`` messages not yet taken). Sent to the worker at its start."""

    def __init__(self, conn: Any, permits: Any, owner: int):
        self.conn = conn
        self.permits = permits
        #: The main process's pid: a worker whose main process is gone stops.
        self.owner = owner

    def owner_alive(self) -> bool:
        return _alive(self.owner)

    def send(self, msg: bytes, live: Callable[[], bool]) -> bool:
        """Send ``msg`` once a permit is free, unless ``live()`` turns False first."""
        while live():
            if self.permits.acquire(timeout=POLL_S):
                self.conn.send_bytes(msg)
                return True
            if not self.owner_alive():
                return False
        return False


# ---------------------------------------------------------------------------------- worker side


class SlotWriter:
    """A worker's slots: hands out views of a free slot for a batch's columns, and packs the
    batch made in them into a message."""

    def __init__(self, flags: torch.Tensor):
        self.flags_t = flags
        self.flags = flags.numpy()
        self.slots: list[torch.Tensor | None] = [None] * len(flags)
        self.bases: list[np.ndarray | None] = [None] * len(flags)
        #: Whether the main process has slot k's present buffer (its handle went out with a
        #: batch that was sent). A slot made for a batch that was then not sent (its pass was
        #: cancelled) is announced with the next batch that uses it.
        self.known = [False] * len(flags)
        #: The layout the main process has (that of the last batch sent in a slot).
        self.layout: tuple[Any, ...] | None = None
        #: The slot the last allocation used (None: ordinary memory), whether it is new, and
        #: the layout of the message packed for it (sent: what the main process has).
        self.last: tuple[int, bool] | None = None
        self._packed_layout: tuple[Any, ...] | None = None
        self.values_end = 0
        #: Room kept behind a batch's values for its per-request arrays (learnt per batch).
        self.reserve = 1 << 16

    def alloc(self, sizes: list[tuple[int, np.dtype]]) -> list[np.ndarray]:
        """Arrays of ``sizes`` (values, dtype) for one batch, in one free slot when there is
        one (else ordinary memory)."""
        offs, need = [], 0
        for n, dt in sizes:
            offs.append(need)
            need += _aligned(n * np.dtype(dt).itemsize)
        self.values_end = need
        need += self.reserve
        flags = self.flags
        free = [k for k in range(len(flags)) if flags[k] == 0]
        fits = {k: s.numel() for k in free
                if (s := self.slots[k]) is not None and s.numel() >= need}
        if fits:
            k = min(fits, key=fits.__getitem__)
        elif free:
            # A slot never made, or too small: (re)made with head room, and at least as large
            # as the largest slot (each new slot is a handle the main process must open).
            k = next((i for i in free if self.slots[i] is None), free[0])
            size = max(MIN_SLOT_BYTES, need + need // 4,
                       max((s.numel() for s in self.slots if s is not None), default=0))
            self._make(k, size)
            if all(s is None for i, s in enumerate(self.slots) if i != k):
                # The first slot: the others the worker's window needs, made now and announced
                # with this batch (a pass whose consumer is slow would otherwise make them,
                # and the main process open their handles, in the middle of its batches).
                g = max(1, min(MAX_GROUP, GROUP_BYTES // size))
                for i in range(len(flags) - (MAX_GROUP - g)):
                    if self.slots[i] is None:
                        self._make(i, size)
        else:
            self.last = None
            return [np.empty(n, dtype=dt) for n, dt in sizes]
        flags[k] = 1
        self.last = (k, not all(self.known[i] for i, s in enumerate(self.slots)
                                if s is not None))
        base = self.bases[k]
        assert base is not None
        return [base[o:o + n * np.dtype(dt).itemsize].view(dt)
                for o, (n, dt) in zip(offs, sizes, strict=True)]

    def _make(self, k: int, size: int) -> None:
        t = torch.empty(size, dtype=torch.uint8).share_memory_()
        self.slots[k] = t
        self.bases[k] = t.numpy()
        self.known[k] = False

    def sent(self) -> None:
        """The last batch was sent: the main process has its slot (and layout) now and frees
        the slot."""
        if self.last is not None:
            for i, s in enumerate(self.slots):
                self.known[i] = s is not None
            self.layout = self._packed_layout
            self.last = None

    def release_last(self) -> None:
        """The last slot handed out will not be sent (the pass was cancelled): free again."""
        if self.last is not None:
            self.flags[self.last[0]] = 0
            self.last = None

    def pack(self, pass_id: int, end: int, batch: Batch) -> bytes:
        """The message for ``batch``, made by the last :meth:`alloc`: its header, with what
        the main process does not have yet pickled behind it; the whole batch pickled when it
        is in ordinary memory."""
        B, U = len(batch), batch.num_sequences
        nvals = int(next(iter(batch.values.values())).shape[0]) if batch.values else 0
        head = (pass_id, end, -1 if self.last is None else self.last[0], nvals, B, U,
                batch.bytes_read, batch.thin_bytes_read)
        if self.last is None:
            return _pickled(BATCH, head, batch)
        k, new = self.last
        small: list[tuple[str, str | None, np.ndarray]] = [
            (f, None, t.numpy()) for f, _ in _SMALL
                 if (t := getattr(batch, f)) is not None]
        small += [("context", c, v.numpy()) for c, v in batch.context.items()]
        layout = (tuple((c, v.numpy().dtype.str) for c, v in batch.values.items()),
                  tuple((f, c, a.dtype.str) for f, c, a in small))
        base = self.bases[k]
        assert base is not None
        o, spans = self.values_end, []
        for _, _, a in small:
            spans.append((o, a))
            o += _aligned(a.nbytes)
        self.reserve = max(self.reserve, o - self.values_end + (o - self.values_end) // 4)
        extra: dict[str, Any] = {}
        if o <= len(base):
            for at, a in spans:
                base[at:at + a.nbytes] = a.reshape(-1).view(np.uint8)
        else:  # did not fit (the first batch of an unusual size): pickled behind the header
            extra["small"] = [a for _, _, a in small]
        if new:  # every slot made since the last batch sent (their handles)
            extra["new"] = {i: s for i, s in enumerate(self.slots)
                            if s is not None and not self.known[i]}
        if layout != self.layout:
            extra["layout"] = layout
        self._packed_layout = layout
        if not extra:
            return _HEAD.pack(SLOT, *head)
        return _pickled(SLOT_PICKLED, head, extra)


def _pickled(kind: int, head: tuple[int, ...], obj: Any) -> bytes:
    return _HEAD.pack(kind, *head) + bytes(ForkingPickler.dumps(obj))


def worker_loop(w: int, tasks: Any, out: Channel, stop: Any, current: Any, flags: torch.Tensor,
                run: Callable[[Any, Callable[..., list[np.ndarray]]],
                              Iterator[tuple[int, Batch]]]) -> None:
    """Body of a persistent worker: runs each pass it is sent (``(pass id, spec)``) while
    ``current`` names that pass, and sends its batches through ``out``."""
    torch.set_num_threads(1)
    writer = SlotWriter(flags)
    while not stop.is_set():
        try:
            task = tasks.get(timeout=POLL_S)
        except queue.Empty:
            if not out.owner_alive():
                break
            continue
        if task is None:
            break
        pass_id, spec = task

        def live(pass_id: int = pass_id) -> bool:
            # The pass in progress, or the next one sent ahead of it (WorkerPool.run).
            return current.value in (pass_id, pass_id - 1) and not stop.is_set()

        if not live():
            continue  # a pass cancelled (or sent ahead and not wanted) before it began

        none = (pass_id, 0, -1, 0, 0, 0, 0, 0)
        try:
            with contextlib.closing(run(spec, writer.alloc)) as batches:  # type: ignore[type-var]
                for end, batch in batches:
                    msg = writer.pack(pass_id, end, batch)
                    del batch
                    if not out.send(msg, live):
                        writer.release_last()
                        break
                    writer.sent()  # the consumer frees it (release_last must not)
                else:
                    out.send(_HEAD.pack(DONE, *none), live)
        except BaseException as e:
            writer.release_last()
            tb = traceback.format_exc()
            try:
                payload: Any = pickle.dumps(e)
            except Exception:  # the exception itself may not pickle; its text always does
                payload = None
            out.send(_pickled(ERROR, none, (payload, type(e).__name__, str(e), tb)), live)


# ---------------------------------------------------------------------------------- main side


class SlotReader:
    """The main process's view of one worker's slots: batches as views of them, and the
    flags that free them once their tensors are gone."""

    def __init__(self, flags: torch.Tensor):
        self.flags_t = flags
        self.flags = flags.numpy()
        #: Each slot's bytes (the array keeps the shared tensor's storage alive).
        self.bases: list[np.ndarray | None] = [None] * len(flags)
        self.out: set[int] = set()
        #: The largest slot's size so far (0: no slot yet).
        self.slot_bytes = 0
        #: The worker's last layout: value columns (name, dtype, itemsize) and per-request
        #: arrays (field, context column, dtype, itemsize, one per sequence).
        self.values: list[tuple[str, np.dtype, int]] = []
        self.small: list[tuple[str, str | None, np.dtype, int, bool]] = []

    def _adopt(self, msg: bytes) -> tuple[Any, ...]:
        """The header of a slot message, after taking in what was pickled behind it."""
        head = _HEAD.unpack_from(msg)
        extra: dict[str, Any] = {}
        if head[0] == SLOT_PICKLED:
            extra = pickle.loads(memoryview(msg)[_HEAD.size:])
            for i, t in extra.get("new", {}).items():
                self.bases[i] = base = t.numpy()
                self.slot_bytes = max(self.slot_bytes, base.nbytes)
            if "layout" in extra:
                vals, small = extra["layout"]
                self.values = [(c, np.dtype(d), np.dtype(d).itemsize) for c, d in vals]
                per_seq = dict(_SMALL)
                self.small = [(f, c, np.dtype(d), np.dtype(d).itemsize, per_seq.get(f, False))
                              for f, c, d in small]
        return head + (extra.get("small"),)

    def discard(self, msg: bytes) -> None:
        """A message of a cancelled pass: its slot is free at once (a batch in ordinary
        memory is taken in and dropped, so the worker lets go of its shared memory)."""
        kind = msg[0]
        if kind in (SLOT, SLOT_PICKLED):
            self.flags[self._adopt(msg)[3]] = 0
        elif kind == BATCH:
            with contextlib.suppress(Exception):
                pickle.loads(memoryview(msg)[_HEAD.size:])

    def reclaim(self) -> None:
        """Free the slots whose batches the consumer has dropped."""
        for k in list(self.out):
            # The only references left: the list's and getrefcount's own argument.
            if sys.getrefcount(self.bases[k]) <= 2:
                self.out.discard(k)
                self.flags[k] = 0

    def unpack(self, msg: bytes) -> Batch:
        self.reclaim()
        if msg[0] == BATCH:
            b: Batch = pickle.loads(memoryview(msg)[_HEAD.size:])
            return b
        _, _, _, k, nvals, B, U, nbytes, thin, small_in = self._adopt(msg)
        base = self.bases[k]
        assert base is not None, f"slot {k} used before its handle came"
        self.out.add(k)
        o = 0
        values = {}
        for name, dt, isz in self.values:
            nb = nvals * isz
            values[name] = torch.from_numpy(base[o:o + nb].view(dt))
            o += (nb + _ALIGN - 1) // _ALIGN * _ALIGN
        got: dict[str, torch.Tensor] = {}
        context: dict[str, torch.Tensor] = {}
        for i, (f, c, dt, isz, per_seq) in enumerate(self.small):
            if small_in is not None:
                a = small_in[i]
            else:
                nb = (U if per_seq else B) * isz
                a = base[o:o + nb].view(dt)
                o += (nb + _ALIGN - 1) // _ALIGN * _ALIGN
            if c is None:
                got[f] = torch.from_numpy(a)
            else:
                context[c] = torch.from_numpy(a)
        return Batch(
            request_id=got["request_id"], lengths=got["lengths"], values=values,
            context=context, user_id=got.get("user_id"), request_ts=got.get("request_ts"),
            bytes_read=nbytes, thin_bytes_read=thin,
            inverse_indices=got.get("inverse_indices"),
        )


class WorkerPool:
    """``n`` worker processes kept across passes; :meth:`run` is one pass over them.

    ``start=False``: the pool's objects are made, but not its processes, until :meth:`start`
    (which blocks for as long as a new process takes to import the reader, seconds)."""

    def __init__(self, n: int, *, prefetch: int, timeout_s: float | None, ctx: Any,
                 target: Callable[..., None], start: bool = True):
        self.n = n
        self.timeout_s = timeout_s
        self.ctx = ctx
        self.stop = ctx.Event()
        self.current = ctx.Value("q", 0)
        self.tasks = [ctx.Queue() for _ in range(n)]
        pipes = [ctx.Pipe(duplex=False) for _ in range(n)]
        self.conns = [r for r, _ in pipes]
        # One poll object per pipe, kept: a wait for a message is one system call.
        self._polls = []
        for r in self.conns:
            p = select.poll()
            p.register(r.fileno(), select.POLLIN)
            self._polls.append(p)
        self.permits = [ctx.Semaphore(prefetch) for _ in range(n)]
        #: Per worker: messages read whose permits are not given back yet, and the group size
        #: they are given back in (None: not chosen yet, one by one until then).
        self.held = [0] * n
        self.group: list[int | None] = [None] * n
        #: Per worker: the slot size its group was chosen for, and permits still to keep back
        #: (its group shrank).
        self.sized = [0] * n
        self.owed = [0] * n
        flags = [torch.zeros(slots_for(prefetch), dtype=torch.int8).share_memory_()
                 for _ in range(n)]
        self.readers = [SlotReader(f) for f in flags]
        me = os.getpid()
        self.procs = [
            ctx.Process(target=target,
                        args=(w, self.tasks[w], Channel(pipes[w][1], self.permits[w], me),
                              self.stop, self.current, flags[w]),
                        daemon=True, name=f"lmat-reader-{w}")
            for w in range(n)
        ]
        self._write_ends = [wr for _, wr in pipes]
        #: Whether worker w has sent anything (else it died starting up).
        self.heard = [False] * n
        self.pass_id = 0
        #: The pass sent ahead (its key and id), which workers start once done with theirs.
        self.ahead: tuple[Any, int] | None = None
        #: The pass whose iterator is open and not cancelled by a newer one (None: none).
        self.open_pass: int | None = None
        self._lock = threading.Lock()
        self.closed = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the processes (once)."""
        for p in self.procs:
            if self.closed:
                return
            p.start()
        for wr in self._write_ends:
            wr.close()  # the worker has its own copy: its end closes when it exits

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
                    msg = self._get(w, pid)
                except ReaderWorkerError as e:
                    raise on_error(w, e) from e
                self.heard[w] = True
                kind = msg[0]
                if kind == DONE:
                    active[w] = False
                elif kind == ERROR:
                    _raise_remote(pickle.loads(memoryview(msg)[_HEAD.size:]), w)
                else:
                    batch = self.readers[w].unpack(msg)
                    if self.readers[w].slot_bytes != self.sized[w]:
                        self._widen(w, self.readers[w].slot_bytes)
                    yield w, _HEAD.unpack_from(msg)[2], batch
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

    def _widen(self, w: int, slot_bytes: int) -> None:
        """Choose worker w's permit group by its slots' size (``GROUP_BYTES`` of extra slots
        at most) and give it the extra permits that the group holds back; when its slots have
        grown since (a first batch smaller than the rest), shrink the group: the permits it
        no longer holds back are kept from the next ones given back."""
        self.sized[w] = slot_bytes
        g = max(1, min(MAX_GROUP, GROUP_BYTES // max(slot_bytes, 1)))
        old = self.group[w]
        if old is None:
            for _ in range(g - 1):
                self.permits[w].release()
        elif g < old:
            self.owed[w] += old - g
        else:
            return  # never widened again: a smaller slot does not mean smaller batches
        self.group[w] = g

    def _get(self, w: int, pid: int) -> bytes:
        conn, proc, ready = self.conns[w], self.procs[w], self._polls[w].poll
        wait_ms = int(POLL_S * 1000)
        t0 = time.monotonic()
        while True:
            try:
                if not ready(wait_ms):
                    if not proc.is_alive() and not conn.poll(POLL_S):
                        raise ReaderWorkerError(
                            f"reader worker {w} (pid {proc.pid}) exited with code "
                            f"{proc.exitcode} without reporting an error")
                    waited = time.monotonic() - t0
                    if self.timeout_s is not None and waited > self.timeout_s:
                        raise ReaderTimeoutError(
                            f"no batch from reader worker {w} in {waited:.0f} s "
                            f"(timeout_s={self.timeout_s})")
                    continue
                msg = conn.recv_bytes()
            except (EOFError, ConnectionError) as e:
                proc.join(timeout=POLL_S)
                raise ReaderWorkerError(
                    f"reader worker {w} (pid {proc.pid}) stopped mid-message "
                    f"(exit code {proc.exitcode}): {type(e).__name__}: {e}"
                ) from e
            self.held[w] += 1
            if self.held[w] >= (self.group[w] or 1):
                # One wake-up of the worker for the whole group (see the module docstring).
                keep = min(self.owed[w], self.held[w])
                self.owed[w] -= keep
                for _ in range(self.held[w] - keep):
                    self.permits[w].release()
                self.held[w] = 0
            if _HEAD.unpack_from(msg, 0)[1] == pid:
                return msg
            # From a pass that was cancelled: its slot is free again.
            self.heard[w] = True
            self.readers[w].discard(msg)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        for t in self.tasks:
            with contextlib.suppress(Exception):
                t.put(None)
        for p in self.procs:
            if p.pid is None:
                continue  # never started
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for c in self.conns + self._write_ends:
            c.close()
        for q in self.tasks:
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

