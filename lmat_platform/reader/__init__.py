"""The reader: ``SequenceLoader`` (torch), the ``Batch`` it yields, and the Ray Data backend.

Importing this package imports torch; ``import lmat_platform`` stays light and loads it lazily.
"""

from __future__ import annotations

from lmat_platform.reader.batch import Batch
from lmat_platform.reader.errors import (
    ReaderPassCancelledError,
    ReaderTimeoutError,
    ReaderWorkerError,
    StoreUnreachableError,
)
from lmat_platform.reader.loader import SequenceLoader, WorkUnit, assign_units, plan_units

__all__ = [
    "Batch",
    "ReaderPassCancelledError",
    "ReaderTimeoutError",
    "ReaderWorkerError",
    "SequenceLoader",
    "StoreUnreachableError",
    "WorkUnit",
    "assign_units",
    "plan_units",
]
