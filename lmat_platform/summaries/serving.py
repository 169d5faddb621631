"""Point-in-time serving of summaries (spec section 10).

For a request of user u at T, with a tenant that declares ``summary: {model: NAME, tail_len: N}``:

* S = the newest snapshot whose summaries (of the model's pinned version) were published by T
  (``Q_S <= T``; none: S = -1). A summary published after T is never served, even if its
  snapshot was published before T.
* the **summary** is the user's newest summary row with ``snapshot_id <= S`` (the user's
  history did not change after it up to S), dequantized to float32 [K, d]; a user without one
  gets zeros and ``mask = False``;
* the **tail** is the last ``min(N, max_len)`` events of H(u, T) with ``arrival_ts >= W_S``
  (all of H(u, T) when S = -1), after the tenant's action and window filters, in the tenant's
  columns;
* the **pointer** of what was served: (S, head_len, head_checksum) of the head the summary
  covers (the same checksum as the protocol's head pointer), the summarizer version, and
  ``Q_S``. :func:`check_served` verifies it: Q_S <= T, and the checksum equals the tier's head
  checksum of (u, S).

Worked for one user, snapshots every 4 h, summaries published 1 h after their snapshot::

    W_0 = 04:00, P_0 = 04:00, Q_0 = 05:00;  W_1 = 08:00, P_1 = 08:00, Q_1 = 09:00
    request at 08:30: the head pointer names snapshot 1 (P_1 <= T), but Q_1 > T, so the
    summary served is snapshot 0's, and the tail is every event with 04:00 <= arrival < 08:30.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from lmat_platform.exceptions import TenantError
from lmat_platform.hashing import bucket_of
from lmat_platform.protocol.pointers import HeadIndex
from lmat_platform.protocol.thin import read_raw_range
from lmat_platform.store.core import Store, as_store, delta_dataset
from lmat_platform.store.deletion import pending_users
from lmat_platform.store.snapshots import list_snapshots
from lmat_platform.summaries.tier import (
    _tier_rows,
    dequantize,
    load_summarizer,
    resolve_version,
    summary_registry,
)
from lmat_platform.tenants import Tenant

log = logging.getLogger(__name__)

_NO_TIME = np.iinfo(np.int64).min


@dataclass
class ServedSummaries:
    """What was served to B requests (numpy; see :meth:`SummaryServer.attach` for tensors)."""

    version: str
    #: float32 [B, K, d]; zeros where ``mask`` is False.
    summary: np.ndarray
    #: bool [B]: the request has a summary.
    mask: np.ndarray
    #: int32 [B]: S, the summary snapshot served (-1: none published by T).
    snapshot_id: np.ndarray
    #: int64 [B]: head length and checksum the summary covers (0, 0 without summary).
    head_len: np.ndarray
    head_checksum: np.ndarray
    #: int64 [B]: Q_S (int64 min where S = -1).
    published_at: np.ndarray
    #: int64 [B]: W_S (int64 min where S = -1): the tail starts there.
    watermark: np.ndarray
    #: int64 [B] and column -> concatenated values: the tails, jagged.
    tail_lengths: np.ndarray
    tail_values: dict[str, np.ndarray] = field(default_factory=dict)


class SummaryServer:
    """Serves one summary tenant, with its summarizer version and the registry pinned when built
    (every batch of a pass sees the same summaries)."""

    def __init__(self, store: Store | str, tenant: Tenant, *, version: str | None = None):
        if tenant.summary is None:
            raise TenantError(f"tenant '{tenant.name}': declares no summary")
        self.store = as_store(store)
        self.tenant = tenant
        self.version = resolve_version(self.store, tenant.summary.model, version)
        cfg = load_summarizer(self.store, self.version).cfg
        self.k, self.d = cfg.k, cfg.d
        reg = summary_registry(self.store, self.version)
        self.reg_snapshot = np.array([e.snapshot_id for e in reg], dtype=np.int32)
        self.reg_published = np.array([e.published_at for e in reg], dtype=np.int64)
        snaps = list_snapshots(self.store)
        self.watermarks = np.array([s.watermark for s in snaps], dtype=np.int64)
        self.tail_len = min(tenant.summary.tail_len, tenant.max_len)

    # ------------------------------------------------------------------ resolution
    def resolve(self, request_ts: np.ndarray) -> np.ndarray:
        """S for each request: the newest snapshot with summaries published by T (-1: none).
        Summary publish times never go backwards, so this is a binary search."""
        i = np.searchsorted(self.reg_published, np.asarray(request_ts, np.int64), side="right") - 1
        out = np.full(len(i), -1, np.int32)
        ok = i >= 0
        out[ok] = self.reg_snapshot[i[ok]]
        return out

    def serve(self, user_id: np.ndarray, request_ts: np.ndarray) -> ServedSummaries:
        users = np.asarray(user_id, np.int64)
        ts = np.asarray(request_ts, np.int64)
        b = len(users)
        s = self.resolve(ts) if b else np.zeros(0, np.int32)
        summary = np.zeros((b, self.k, self.d), np.float32)
        mask = np.zeros(b, bool)
        head_len = np.zeros(b, np.int64)
        head_cs = np.zeros(b, np.int64)
        pub = np.full(b, _NO_TIME, np.int64)
        if b and len(self.reg_snapshot):
            q_of = dict(zip(self.reg_snapshot.tolist(), self.reg_published.tolist(), strict=True))
            has_s = s >= 0
            pub[has_s] = [q_of[int(x)] for x in s[has_s]]
            rows = self._rows(np.unique(users[has_s]), int(s.max()))
            if rows is not None and rows.num_rows:
                idx = _newest_at_or_before(rows, users, s)
                hit = idx >= 0
                mask[hit] = True
                # Every served row's tokens and scales decoded at once (fixed-size values).
                sel = pa.array(idx[hit])
                q = np.frombuffer(b"".join(rows.column("tokens").take(sel).to_pylist()),
                                  np.int8).reshape(-1, self.k, self.d)
                sc = np.frombuffer(b"".join(rows.column("scales").take(sel).to_pylist()),
                                   np.float32).reshape(-1, self.k)
                summary[hit] = dequantize(q, sc)
                head_len[hit] = rows.column("head_len").to_numpy()[idx[hit]]
                head_cs[hit] = rows.column("head_checksum").to_numpy()[idx[hit]]
        wm = np.full(b, _NO_TIME, np.int64)
        wm[s >= 0] = self.watermarks[s[s >= 0]]
        lens, values = self._tails(users, ts, s, wm)
        # A user whose forget is under way is served nothing (as every reader does).
        gone = np.isin(users, pending_users(self.store))
        if gone.any():
            summary[gone], mask[gone], head_len[gone], head_cs[gone] = 0, False, 0, 0
            keep = np.repeat(~gone, lens)
            values = {c: v[keep] for c, v in values.items()}
            lens = np.where(gone, 0, lens)
        return ServedSummaries(self.version, summary, mask, s, head_len, head_cs, pub, wm,
                               lens, values)

    def _rows(self, users: np.ndarray, max_s: int) -> pa.Table | None:
        if not len(users):
            return None
        ds = self.store.derived("summaries", "dataset", delta_dataset)
        if ds is None:
            return None
        f = ((pads.field("version") == self.version) & (pads.field("snapshot_id") <= max_s)
             & pads.field("user_id").isin(pa.array(users)))
        return ds.to_table(
            columns=["user_id", "snapshot_id", "head_len", "head_checksum", "tokens", "scales"],
            filter=f).sort_by([("user_id", "ascending"), ("snapshot_id", "ascending")])

    # ------------------------------------------------------------------ tails
    def _tails(self, users: np.ndarray, ts: np.ndarray, s: np.ndarray, wm: np.ndarray
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Last ``tail_len`` events of H(u, T) with arrival_ts >= W_S, projected."""
        cols = list(self.tenant.columns)
        need = list(dict.fromkeys([*cols, "user_id", "arrival_ts", "event_ts", "event_id", "action"]))
        b = len(users)
        if not b:
            return np.zeros(0, np.int64), {c: np.zeros(0) for c in cols}
        uu, inv = np.unique(users, return_inverse=True)
        # Each user's tail starts after the oldest summary snapshot among its requests (the
        # first snapshot for a request without one): a user served a summary never reads the
        # tier rows the summary covers, whatever the other requests of the batch are served.
        lo_u = np.full(len(uu), np.iinfo(np.int64).max, np.int64)
        np.minimum.at(lo_u, inv, s.astype(np.int64) + 1)
        parts = []
        bk = bucket_of(uu, self.store.n_buckets)
        for bb in np.unique(bk).tolist():
            # Only snapshots pinned at build: a later one's events are still read from the
            # raw log below (from the pinned newest watermark on), not twice.
            t = _tier_rows(self.store, int(bb), uu[bk == bb], lo=lo_u[bk == bb],
                           hi=len(self.watermarks) - 1, columns=need)
            parts.append(t.select(need))
        # The raw log's events not in any snapshot yet.
        lo = int(self.watermarks[-1]) if len(self.watermarks) else None
        if lo is None or lo < int(ts.max()):
            raw = read_raw_range(self.store, uu, lo, int(ts.max()), columns=need)
            parts.append(raw.select(need))
        ev = pa.concat_tables([p.cast(parts[0].schema) for p in parts])
        ev = ev.sort_by([("user_id", "ascending"), ("event_ts", "ascending"),
                         ("event_id", "ascending")])
        eu = ev.column("user_id").to_numpy()
        arr = ev.column("arrival_ts").to_numpy()
        ets = ev.column("event_ts").to_numpy()
        acts = self.tenant.action_array
        keep_a = (np.ones(len(eu), bool) if acts is None else
                  np.isin(ev.column("action").to_numpy(), acts))
        win = self.tenant.window_us
        starts = np.searchsorted(eu, users, side="left")
        ends = np.searchsorted(eu, users, side="right")
        picks = []
        lens = np.zeros(b, np.int64)
        for i in range(b):
            a, e = int(starts[i]), int(ends[i])
            m = (arr[a:e] >= wm[i]) & (arr[a:e] < ts[i]) & keep_a[a:e]
            if win is not None:
                m &= ets[a:e] >= ts[i] - win
            idx = np.flatnonzero(m)[-self.tail_len:] + a if self.tail_len else np.zeros(0, int)
            picks.append(idx)
            lens[i] = len(idx)
        take = np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, np.int64)
        values = {c: ev.column(c).to_numpy()[take] for c in cols}
        return lens, values

    # ------------------------------------------------------------------ batches
    def attach(self, batch: Any) -> Any:
        """The batch with its summaries: ``summary`` [B, K, d] float32, ``summary_mask`` [B],
        ``summary_pointer`` (``snapshot_id``, ``head_len``, ``head_checksum``,
        ``published_at``), and its sequences replaced by the tails (``values``/``lengths``)."""
        if batch.user_id is None or batch.request_ts is None:
            raise ValueError("summaries need the batch's user_id and request_ts")
        got = self.serve(batch.user_id.numpy(), batch.request_ts.numpy())
        return replace(
            batch,
            lengths=torch.from_numpy(got.tail_lengths),
            values={c: torch.from_numpy(np.ascontiguousarray(v))
                    for c, v in got.tail_values.items()},
            summary=torch.from_numpy(got.summary),
            summary_mask=torch.from_numpy(got.mask),
            summary_pointer={
                "snapshot_id": torch.from_numpy(got.snapshot_id.astype(np.int64)),
                "head_len": torch.from_numpy(got.head_len),
                "head_checksum": torch.from_numpy(got.head_checksum),
                "published_at": torch.from_numpy(got.published_at),
            },
        )


def _newest_at_or_before(rows: pa.Table, users: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Index of each query's newest row with the same user and ``snapshot_id <= s`` (-1: none);
    ``rows`` sorted by (user_id, snapshot_id)."""
    ru = rows.column("user_id").to_numpy()
    rs = rows.column("snapshot_id").to_numpy().astype(np.int64)
    lo = np.searchsorted(ru, users, side="left")
    hi = np.searchsorted(ru, users, side="right")
    out = np.full(len(users), -1, np.int64)
    for i in range(len(users)):
        if hi[i] > lo[i] and s[i] >= 0:
            j = int(np.searchsorted(rs[lo[i]:hi[i]], s[i], side="right")) - 1
            if j >= 0:
                out[i] = lo[i] + j
    return out


@dataclass
class ServingReport:
    checked: int
    future: int
    checksum_mismatches: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return self.future == 0 and self.checksum_mismatches == 0


def check_served(store: Store | str, version: str, user_id: np.ndarray, request_ts: np.ndarray,
                 served: ServedSummaries) -> ServingReport:
    """The serving invariants, from the registry and the tier alone: no summary served that was
    published after its request (``Q_S <= T`` from the registry, not from what the server
    says), and every served summary's checksum equals the tier's head checksum of (u, S)."""
    store = as_store(store)
    reg = {e.snapshot_id: e.published_at for e in summary_registry(store, version)}
    problems: list[str] = []
    future = mism = 0
    m = served.mask
    users = np.asarray(user_id, np.int64)
    ts = np.asarray(request_ts, np.int64)
    for i in np.flatnonzero(m | (served.snapshot_id >= 0)):
        q = reg.get(int(served.snapshot_id[i]))
        if q is None or q > ts[i]:
            future += 1
            if len(problems) < 5:
                problems.append(f"user {users[i]} at {ts[i]}: served snapshot "
                                f"{served.snapshot_id[i]} whose summary was published at {q}")
    if m.any():
        heads = HeadIndex.load(store, users[m])
        hl, cs = heads.pointers(users[m], served.snapshot_id[m])
        bad = (cs != served.head_checksum[m]) | (hl != served.head_len[m])
        mism = int(bad.sum())
        for i in np.flatnonzero(bad)[:5]:
            problems.append(f"user {users[m][i]}: served checksum {served.head_checksum[m][i]} "
                            f"but the head of snapshot {served.snapshot_id[m][i]} has {cs[i]}")
    return ServingReport(int(len(users)), future, mism, problems)
