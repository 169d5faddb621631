"""Pipelined prefetch: a background thread runs a producer while the consumer works.

The reader's producer reads and reconstructs the next work unit (a bucket, or a slice of one)
while the training loop consumes batches of the current one. The hand-off queue is bounded
(``depth`` items), so at most ``depth + 2`` units are alive at a time however large the tables
are: the one being consumed, ``depth`` queued and one being built.

Decoding Parquet and the numpy kernels release the GIL, so a thread is enough to overlap I/O and
decode with batch assembly; across cores the loader uses worker processes.

A process may end with a pass still open (a script that ``break``\ s out of its loop and ends, or
an exception that escapes it). Its daemon threads would then be stopped by the interpreter's
shutdown wherever they are: inside pyarrow's or numba's C++ code that aborts the process
("terminate called without an active exception", exit code 134). So whatever holds such a thread
registers with :func:`close_at_exit`, and an ``atexit`` hook (registered once, run before the
interpreter stops its threads) closes it: every live loader (its open passes, its workers and
their start), then every live prefetcher, each thread stopped and joined. Workers still
starting are not waited for (a thread waiting for a process to start is safe to leave; only
the C++ part of their start is: ``loader._Starting``); a read-ahead thread is, until it has
read its current unit (``EXIT_JOIN_S`` at most).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from lmat_platform.reader.errors import ReaderTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a blocked put/get wakes up to check for shutdown or a dead producer, in seconds.
POLL_S = 0.5

#: The longest an exiting process waits for one read-ahead thread to end its current unit.
EXIT_JOIN_S = 60.0


class _Closable(Protocol):
    def close(self) -> None: ...


#: What the exit hook closes, in order: loaders (which close their passes), then prefetchers.
_AT_EXIT: tuple[weakref.WeakSet[Any], weakref.WeakSet[Any]] = (weakref.WeakSet(), weakref.WeakSet())
_HOOKED = False
_HOOK_LOCK = threading.Lock()


def close_at_exit(obj: _Closable, *, first: bool = False) -> None:
    """Call ``obj.close()`` when the interpreter exits, if ``obj`` is still alive then (held
    weakly). ``first``: before the others (an owner whose close closes what it owns)."""
    global _HOOKED
    with _HOOK_LOCK:
        if not _HOOKED:
            atexit.register(_close_all)
            _HOOKED = True
        _AT_EXIT[0 if first else 1].add(obj)


_EXITING = False


def _exiting() -> bool:
    return _EXITING


def _close_all() -> None:
    global _EXITING
    _EXITING = True
    from lmat_platform.kernels import join_warm_up

    for live in _AT_EXIT:
        for obj in list(live):
            try:
                obj.close()
            except Exception as e:  # an exiting process reports it and goes on closing
                log.warning("closing %r at exit failed: %s", obj, e)
    # The kernels' warm-up thread, if still loading: numba's C++ code must not be cut short.
    join_warm_up()


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher(Generic[T], Iterator[T]):
    """Iterate ``produce()`` in a background thread, ``depth`` items ahead.

    Errors raised by the producer are re-raised, unchanged, by ``__next__``. ``timeout_s`` bounds
    the wait for one item (None: wait as long as the producer thread is alive). Call
    :meth:`close` (or exhaust the iterator) to stop the thread; closing is idempotent.
    """

    def __init__(
        self,
        produce: Callable[[], Iterable[T]],
        *,
        depth: int = 2,
        timeout_s: float | None = None,
        name: str = "lmat-prefetch",
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, but got {depth}")
        self._q: queue.Queue[T | _End | _Failure] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._timeout_s = timeout_s
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()
        close_at_exit(self)

    def _put(self, item: T | _End | _Failure) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce: Callable[[], Iterable[T]]) -> None:
        try:
            for item in produce():
                if not self._put(item):
                    return
                if self._stop.is_set():  # closed while this item was being made
                    return
            self._put(_End())
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Failure(e))

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        waited = 0.0
        t0 = time.monotonic()
        while True:
            try:
                item = self._q.get(timeout=POLL_S)
                break
            except queue.Empty:
                waited = time.monotonic() - t0
                if not self._thread.is_alive() and self._q.empty():
                    self.close()
                    raise RuntimeError("prefetch thread ended without a result") from None
                if self._timeout_s is not None and waited > self._timeout_s:
                    self.close()
                    raise ReaderTimeoutError(
                        f"no data from the prefetch thread in {waited:.0f} s "
                        f"(timeout_s={self._timeout_s})"
                    ) from None
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the producer thread and drop what it had queued."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            # At exit: wait for the unit being read (the thread must not be inside pyarrow
            # when the interpreter stops it); otherwise a bounded wait.
            self._thread.join(timeout=EXIT_JOIN_S if _exiting() else 5 * POLL_S)
            if self._thread.is_alive():
                log.warning("%s: the read-ahead thread did not stop", self._thread.name)

    def __del__(self) -> None:
        self._stop.set()
