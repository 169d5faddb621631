"""numba's on-disk cache of lmat's compiled kernels: a writable folder, and cheap loads.

**A writable folder.**

numba keeps a ``@njit(cache=True)`` function's machine code in the first writable of
``$NUMBA_CACHE_DIR``, the ``__pycache__`` folder beside the module, and the user's cache folder
(``~/.cache/numba``). Where none is writable (a read-only install under a read-only or
unset home, a locked-down container) it raises at import: ``cannot cache function ...: no
locator available``. :func:`ensure_cache_dir` runs before any kernel is defined and, in that
case only, points numba at a private folder under the temp dir.

**Cheap loads.** Before every load from its on-disk cache numba refreshes its whole target
context (``BaseContext.refresh``): the first time in a process that imports about 60 modules of
typing and lowering registries (``numba.cpython.*``, ``numba.np.npyimpl`` with its 80 ufunc
kernels, ``numba.np.random``, ``numba.typed``, cffi, ...) and installs them, about 0.3 s of CPU
on this project's machine, 2/3 of a fresh process's kernel warm-up. Rebuilding cached machine
code needs none of it: the NRT (its C helpers and atomic functions, which the code links to),
the C helpers and math functions every CPU context registers when made, and, for code that
hashes, the hash secrets :mod:`numba.cpython.hashing` registers. So for lmat's own kernels
(functions of ``lmat_platform`` modules only; other code's cached functions load as numba
does it) :func:`install_cheap_loads` makes a cache load initialize just those; a compile
(cache miss) refreshes the context itself (``CompilerBase.__init__``), and a load that fails
the cheap way is retried numba's way. ``LMAT_NUMBA_FULL_REFRESH=1`` turns it off.
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


#: numba's own ``Cache.load_overload`` (what :func:`install_cheap_loads` wraps).
_NUMBA_LOAD: Any = None


def _cheap_load_overload(self: Any, sig: Any, target_context: Any) -> Any:
    """``Cache.load_overload`` without the full context refresh, for lmat's kernels."""
    func = getattr(self, "_py_func", None)
    if not getattr(func, "__module__", "").startswith("lmat_platform."):
        return _NUMBA_LOAD(self, sig, target_context)
    try:
        import numba.cpython.hashing  # noqa: F401 - registers the hash secrets' symbols
        from numba.core.runtime import nrt

        nrt.rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        return None  # the guard swallowed an I/O error: numba then compiles (and refreshes)
    except Exception:  # noqa: BLE001 - numba's own way below, which raises what it raises
        log.debug("numba cache: cheap load of %s failed; loading it numba's way",
                  self._name, exc_info=True)
        return _NUMBA_LOAD(self, sig, target_context)


def install_cheap_loads() -> bool:
    """Make cache loads of lmat's kernels skip numba's full context refresh (see the module
    docstring); once per process. False where it is off (``LMAT_NUMBA_FULL_REFRESH=1``) or
    this numba lacks what it relies on (then loads are numba's own)."""
    global _NUMBA_LOAD
    if _NUMBA_LOAD is not None:
        return True
    if os.environ.get("LMAT_NUMBA_FULL_REFRESH") == "1":
        return False
    from numba.core import caching
    from numba.core.runtime import nrt

    cls: Any = caching.Cache
    if not all(hasattr(cls, a) for a in ("load_overload", "_load_overload",
                                         "_guard_against_spurious_io_errors")) \
            or not hasattr(nrt, "rtsys"):
        return False
    _NUMBA_LOAD = cls.load_overload
    cls.load_overload = _cheap_load_overload
    return True


# Before any kernel is defined: every module that defines cached kernels imports this module
# first (kernels.py directly; store/heads.py through store/uih.py, which imports kernels.py).
ensure_cache_dir()
install_cheap_loads()
