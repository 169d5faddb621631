"""Vectorized 64-bit hashing: user buckets and head checksums.

Both are pure numpy over whole columns (no per-event Python). ``mix64`` is the splitmix64
finalizer, a bijection on 64-bit integers with good avalanche, so sums of mixed values are a
strong order-canonical fingerprint of a set of events.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of an int64/uint64 array, as uint64 (wrapping arithmetic)."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return z


def bucket_of(user_id: np.ndarray, n_buckets: int) -> np.ndarray:
    """The user bucket (int32) every tier and thin table is clustered by."""
    return (mix64(user_id) % np.uint64(n_buckets)).astype(np.int32)


def event_fingerprint(event_id: np.ndarray, event_ts: np.ndarray) -> np.ndarray:
    """Per-event uint64 fingerprint; a head's checksum is the wrapping sum over its events.

    The head's order is a function of its ``(event_ts, event_id)`` set, so a sum over the set is a
    checksum of the ordered sequence of ``event_id``s that can be extended one snapshot at a time
    without re-reading the head.
    """
    with np.errstate(over="ignore"):
        return mix64(mix64(event_id) ^ np.asarray(event_ts).astype(np.uint64))


def as_signed(x: np.ndarray) -> np.ndarray:
    """uint64 checksums stored in int64 Delta columns (same bits)."""
    return np.asarray(x, dtype=np.uint64).view(np.int64)
