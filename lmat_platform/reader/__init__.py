"""The reader: ``SequenceLoader`` (torch), the ``Batch`` it yields, and the Ray Data backend.

Importing this package imports torch; ``import lmat_platform`` stays light and loads it lazily.
"""

from __future__ import annotations

# The kernels' warm-up (numba's start-up and their cache loads, in a thread) begins before
# torch and pyarrow are imported, so that it overlaps their import rather than the first pass
# (kernels.warm_up_in_background; the loader module starts it too, when imported alone).
from lmat_platform.kernels import warm_up_in_background as _warm_up_in_background

_warm_up_in_background()

from lmat_platform.reader.batch import Batch  # noqa: E402
from lmat_platform.reader.errors import (  # noqa: E402
    ReaderPassCancelledError,
    ReaderTimeoutError,
    ReaderWorkerError,
    StoreUnreachableError,
)
from lmat_platform.reader.loader import (  # noqa: E402
    SequenceLoader,
    WorkUnit,
    assign_units,
    plan_units,
)

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
