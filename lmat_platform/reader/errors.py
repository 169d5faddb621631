"""Errors of the reader (candidates for ``lmat_platform.exceptions``; kept here so the reader
package is self-contained). Both are :class:`~lmat_platform.exceptions.LmatError`s, and also the
built-in error a caller would catch for the same condition."""

from __future__ import annotations

from lmat_platform.exceptions import LmatError


class StoreUnreachableError(LmatError, OSError):
    """The store (or a file of it) could not be read in the middle of a pass."""


class ReaderTimeoutError(LmatError, TimeoutError):
    """No batch arrived from a reader thread or worker within the loader's timeout."""


class ReaderWorkerError(LmatError):
    """A reader worker process died without reporting an error (killed, out of memory)."""


class ReaderPassCancelledError(LmatError, RuntimeError):
    """An iterator of a ``SequenceLoader`` with ``num_workers > 0`` was used after a newer
    iterator over the same loader started (the newer pass cancelled it, as a new iterator of a
    ``DataLoader`` with persistent workers does)."""

    def __init__(self, msg: str = (
            "this pass of the loader was cancelled: a newer iterator over the same "
            "SequenceLoader started (with num_workers > 0 one pass runs at a time)")):
        super().__init__(msg)
