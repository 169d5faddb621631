"""Packages whose names load on first use (PEP 562), so that importing a package costs only
what its caller uses (``lmat --help`` imports no pyarrow, numba or torch).

A package sets ``__getattr__, __dir__ = lazy_names(__name__, WHERE, __all__)``, where ``WHERE``
maps each public name to the submodule that defines it. A name loads its submodule on first
access and is then an ordinary module attribute; any submodule is an attribute too (imported
on first access), as it is in a package that imports its submodules eagerly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_names(
    package: str, where: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (see the module)."""
    names = set(public)

    def __getattr__(name: str) -> Any:
        mod = where.get(name)
        if mod is not None:
            value = getattr(importlib.import_module(f"{package}.{mod}"), name)
            setattr(sys.modules[package], name, value)  # later look-ups skip this function
            return value
        if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module '{package}' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | names)

    return __getattr__, __dir__
