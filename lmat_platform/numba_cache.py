"""A writable folder for numba's on-disk cache of lmat's compiled kernels.

numba keeps a ``@njit(cache=True)`` function's machine code in the first writable of
``$NUMBA_CACHE_DIR``, the ``__pycache__`` folder beside the module, and the user's cache folder
(``~/.cache/numba``). Where none is writable (a read-only install under a read-only or
unset home, a locked-down container) it raises at import: ``cannot cache function ...: no
locator available``. :func:`ensure_cache_dir` runs before any kernel is defined and, in that
case only, points numba at a private folder under the temp dir.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from lmat_platform.exceptions import LmatError

log = logging.getLogger(__name__)

#: Packages whose modules define cached kernels: numba's in-tree cache is beside each module.
_KERNEL_PACKAGES = ("", "store")


def _writable(path: str) -> bool:
    """numba's own test of a cache folder: it can be created and a file written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def ensure_cache_dir() -> str | None:
    """Make sure numba can cache lmat's kernels; returns the fallback folder it was pointed
    at, or None when numba's own choices work (nothing changed)."""
    from numba.core import config as _config
    from numba.misc.appdirs import AppDirs

    config: Any = _config  # numba sets its settings at run time (no attributes for mypy)

    here = os.path.dirname(os.path.abspath(__file__))
    if config.CACHE_DIR and _writable(config.CACHE_DIR):
        return None
    if all(_writable(os.path.join(here, p, "__pycache__")) for p in _KERNEL_PACKAGES):
        return None
    if _writable(AppDirs(appname="numba", appauthor=False).user_cache_dir):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else 0
    fallback = os.path.join(tempfile.gettempdir(), f"lmat-numba-cache-{uid}")
    if not _writable(fallback):
        raise LmatError(
            f"numba cache: no writable folder for compiled kernels (tried "
            f"NUMBA_CACHE_DIR={config.CACHE_DIR or '(unset)'}, {here}/__pycache__, the user "
            f"cache and {fallback}); set NUMBA_CACHE_DIR to a writable folder"
        )
    config.CACHE_DIR = fallback
    log.info("numba cache: no writable cache folder configured; using %s", fallback)
    return fallback


# Before any kernel is defined: every module that defines cached kernels imports this module
# first (kernels.py directly; store/heads.py through store/uih.py, which imports kernels.py).
ensure_cache_dir()
