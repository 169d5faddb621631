"""Tenants (spec section 6): what each model reads, loaded from YAML and validated.

A tenant's sequence for a request is H(u, T), restricted to its ``actions`` and to
``event_ts >= T - window``, cut to the last ``max_len`` events, projected to ``columns``. The
reader pushes every one of these restrictions into the storage read (see
:func:`lmat_platform.store.uih.read_bucket`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from lmat_platform.exceptions import TenantError
from lmat_platform.schema import MICROS_PER_DAY

_FIELDS = {"name", "columns", "max_len", "actions", "window_days", "summary"}


@dataclass(frozen=True)
class SummarySpec:
    """A tenant's summary (spec section 10): the summarizer's name and the tail it reads."""

    #: The registered summarizer's name (its newest version is served).
    model: str
    #: Events after the summary's snapshot watermark to serve (the last ``tail_len``).
    tail_len: int


@dataclass(frozen=True)
class Tenant:
    """One model's projection of the shared histories."""

    name: str
    #: Stored columns to return, in order (``event_ts`` and ``event_id`` allowed).
    columns: tuple[str, ...]
    #: Keep the last ``max_len`` events.
    max_len: int
    #: Action codes to keep; None keeps every action.
    actions: tuple[int, ...] | None = None
    #: Keep events with ``event_ts >= T - window_days`` days; None keeps all.
    window_days: float | None = None
    #: Summary tokens plus a short tail instead of the whole sequence (spec section 10).
    summary: SummarySpec | None = None

    @property
    def window_us(self) -> int | None:
        if self.window_days is None:
            return None
        return int(round(self.window_days * MICROS_PER_DAY))

    @property
    def action_array(self) -> np.ndarray | None:
        return None if self.actions is None else np.array(sorted(self.actions), dtype=np.int16)

    def check_columns(self, available: Iterable[str]) -> None:
        """Raise if a declared column is not stored."""
        have = set(available)
        for c in self.columns:
            if c not in have:
                raise TenantError(
                    f"tenant '{self.name}': columns: unknown column '{c}' "
                    f"(stored: {', '.join(sorted(have))})"
                )

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "columns": list(self.columns), "max_len": self.max_len}
        if self.actions is not None:
            d["actions"] = list(self.actions)
        if self.window_days is not None:
            d["window_days"] = self.window_days
        if self.summary is not None:
            d["summary"] = {"model": self.summary.model, "tail_len": self.summary.tail_len}
        return d


def union_tenant(tenants: Iterable[Tenant], *, name: str = "union") -> Tenant:
    """The widest projection that serves every tenant (what a fat-row union dataset stores)."""
    ts = list(tenants)
    if not ts:
        raise TenantError("union of no tenants")
    cols = tuple(dict.fromkeys(c for t in ts for c in t.columns))
    actions = None
    if all(t.actions is not None for t in ts):
        actions = tuple(sorted({a for t in ts for a in (t.actions or ())}))
    window = None
    if all(t.window_days is not None for t in ts):
        window = max(float(t.window_days or 0) for t in ts)
    return Tenant(name, cols, max(t.max_len for t in ts), actions, window)


def parse_tenant(obj: Any, *, where: str = "tenant") -> Tenant:
    if not isinstance(obj, Mapping):
        raise TenantError(f"{where}: each tenant must be a mapping, but got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TenantError(f"{where}: field 'name' must be a non-empty string")
    label = f"tenant '{name}'"
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise TenantError(f"{label}: unknown field '{unknown[0]}'")
    cols = obj.get("columns")
    if not isinstance(cols, list) or not cols or not all(isinstance(c, str) and c for c in cols):
        raise TenantError(f"{label}: columns: must be a non-empty list of column names")
    if len(set(cols)) != len(cols):
        raise TenantError(f"{label}: columns: a column is listed twice")
    max_len = obj.get("max_len")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise TenantError(f"{label}: max_len: must be a positive integer, but got {max_len!r}")
    actions = obj.get("actions")
    if actions is not None:
        if not isinstance(actions, list) or not actions:
            raise TenantError(f"{label}: actions: must be a non-empty list of action codes")
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in actions):
            raise TenantError(f"{label}: actions: action codes must be integers")
        if any(a < -32768 or a > 32767 for a in actions):
            raise TenantError(f"{label}: actions: action codes must fit int16")
        actions = tuple(sorted(set(actions)))
    window = obj.get("window_days")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int | float) or window <= 0:
            raise TenantError(f"{label}: window_days: must be a positive number, but got {window!r}")
        window = float(window)
    summary = _parse_summary(obj.get("summary"), label) if "summary" in obj else None
    return Tenant(name, tuple(cols), max_len, actions, window, summary)


def _parse_summary(obj: Any, label: str) -> SummarySpec:
    if not isinstance(obj, Mapping):
        raise TenantError(f"{label}: summary: must be a mapping with 'model' and 'tail_len'")
    unknown = sorted(set(obj) - {"model", "tail_len"})
    if unknown:
        raise TenantError(f"{label}: summary: unknown field '{unknown[0]}'")
    model = obj.get("model")
    if not isinstance(model, str) or not model.strip():
        raise TenantError(f"{label}: summary: model: must be a non-empty string")
    n = obj.get("tail_len")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TenantError(f"{label}: summary: tail_len: must be an integer >= 0, but got {n!r}")
    return SummarySpec(model, n)


def parse_tenants(doc: Any, *, where: str = "tenants") -> dict[str, Tenant]:
    if not isinstance(doc, Mapping) or "tenants" not in doc:
        raise TenantError(f"{where}: expected a top-level 'tenants:' list")
    items = doc["tenants"]
    if not isinstance(items, list) or not items:
        raise TenantError(f"{where}: 'tenants' must be a non-empty list")
    out: dict[str, Tenant] = {}
    for i, item in enumerate(items):
        t = parse_tenant(item, where=f"{where}: tenants[{i}]")
        if t.name in out:
            raise TenantError(f"{where}: tenant '{t.name}' is declared twice")
        out[t.name] = t
    return out


def load_tenants(path: str) -> dict[str, Tenant]:
    """Load and validate a tenants YAML file (spec section 6); name -> tenant."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise TenantError(f"{path}: tenants file does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise TenantError(f"{path}: not valid YAML{at}") from None
    return parse_tenants(doc, where=path)
