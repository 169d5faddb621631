"""Pipelined prefetch: a background thread runs a producer while the consumer works.

The reader's producer reads and reconstructs the next work unit (a bucket, or a slice of one)
while the training loop consumes batches of the current one. The hand-off queue is bounded
(``depth`` items), so at most ``depth + 2`` units are alive at a time however large the tables
are: the one being consumed, ``depth`` queued and one being built.

Decoding Parquet and the numpy kernels release the GIL, so a thread is enough to overlap I/O and
decode with batch assembly; across cores the loader uses worker processes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from lmat_platform.reader.errors import ReaderTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a blocked put/get wakes up to check for shutdown or a dead producer, in seconds.
POLL_S = 0.5


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
            self._thread.join(timeout=5 * POLL_S)

    def __del__(self) -> None:
        self._stop.set()
