"""One base error and specific subclasses.

Every error the platform raises on bad input is a :class:`LmatError`; its message is one line that
names the file, column, row or argument at fault, so the CLI can print it as is.
"""

from __future__ import annotations


class LmatError(Exception):
    """Base class of every error lmat raises on purpose."""


class StoreNotFoundError(LmatError):
    """The store path holds no lmat store."""


class StoreExistsError(LmatError):
    """``init`` was asked to create a store where one already exists."""


class SchemaError(LmatError):
    """An input's columns or types do not match what the platform expects."""


class InputFileError(LmatError):
    """An input file cannot be read (missing, not Parquet, ...)."""


class WatermarkError(LmatError):
    """A snapshot watermark or publish time breaks the ordering rules of spec section 3."""


class ImmutabilityError(LmatError):
    """A commit would change (or has changed) a published snapshot."""


class TenantError(LmatError):
    """A tenant declaration is invalid."""


class RequestError(LmatError):
    """A request file is invalid (missing column, duplicate request_id, ...)."""


class ThinTableError(LmatError):
    """A thin example table is invalid for this store."""


class O2OConsistencyError(LmatError):
    """A reconstructed head does not match the pointer logged online."""


class LeakageError(LmatError):
    """Materialized output contains an event that had not arrived at request time."""


class ConcurrencyError(LmatError):
    """Another writer holds the store's write lock for too long."""
