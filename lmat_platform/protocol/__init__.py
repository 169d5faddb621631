"""Pointers and checksums; the streaming path (log) and the batch path (examples)."""

from lmat_platform.protocol.pointers import POINTER_BYTES, HeadIndex, Pointer
from lmat_platform.protocol.thin import build_thin_rows, open_thin, write_thin

__all__ = ["POINTER_BYTES", "HeadIndex", "Pointer", "build_thin_rows", "open_thin", "write_thin"]
