"""The summary tier (spec section 10): versioned, incremental, point-in-time VISTA summaries.

Tables (Delta, beside the UIH tier)::

    STORE/
      summarizers/       name, version (hash of weights), config, weights (bytes), registered_at
      summaries/         per (version, snapshot k, user touched by k): K summary tokens (int8,
                         one float32 scale per token), head_len, head_checksum  [bucket-partitioned]
      summary_state/     per (version, snapshot k, user touched by k): the summarizer's recurrent
                         state after k (float64), its event count, last event time, running
                         checksum                                           [bucket-partitioned]
      summary_snapshots/ the registry: (version, snapshot k, published_at Q_k >= P_k, users,
                         events); a row is the commit point of k's summaries

A row exists for a user at snapshot k when k holds new events of the user (as ``heads/``): the
summary at any later snapshot S is the user's newest row with ``snapshot_id <= S`` (no events
between, no change). Computing snapshot k reads only k's new events and the touched users'
previous states (:func:`compute_summaries`), so its cost follows the new events, not the
histories; :func:`recompute_check` folds the whole heads from scratch and compares.

Forgetting a user deletes their rows of ``summaries`` and ``summary_state`` (the store's
deletion lists both tables).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from lmat_platform.exceptions import LmatError, O2OConsistencyError, WatermarkError
from lmat_platform.hashing import as_signed, event_fingerprint
from lmat_platform.models.vista import Summarizer, VistaState
from lmat_platform.store import uih
from lmat_platform.store.core import Store, as_store, delta_dataset, now_us
from lmat_platform.store.snapshots import list_snapshots

log = logging.getLogger(__name__)

SUMMARY_TABLES = ("summaries", "summary_state")
"""Tables holding users' data (deleted by ``forget``)."""

#: Tolerances of :func:`recompute_check`: the recurrent state (float64 sums of float32
#: activations: a last-bit difference in one layer's output reaches the next) relative to its scale,
#: and dequantized tokens in units of their quantization step (the incremental and the full
#: computation may round a value that lies near a step boundary to neighbouring steps).
STATE_RTOL = 1e-6
TOKEN_STEPS = 1.0


class SummaryError(LmatError):
    """A summary tier operation is invalid (unknown model, snapshot out of order, ...)."""


@dataclass(frozen=True)
class SummaryRegistryEntry:
    version: str
    model: str
    snapshot_id: int
    published_at: int
    users: int
    events: int
    created_at: int


# ---------------------------------------------------------------------------- summarizers


def register_summarizer(store: Store | str, name: str, model: Summarizer) -> str:
    """Store ``model``'s weights under ``name``; returns its version (hash of the weights).
    Registering the same weights again is a no-op."""
    store = as_store(store)
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SummaryError(f"summarizer name {name!r}: use letters, digits, '-' and '_'")
    version = model.version
    have = store.read_table("summarizers", columns=["name", "version"])
    if have is not None and {"name": name, "version": version} in have.to_pylist():
        return version
    store.append(
        "summarizers",
        pa.table({
            "name": [name], "version": [version],
            "config": [json.dumps(model.cfg.__dict__, sort_keys=True)],
            "weights": pa.array([model.to_bytes()], pa.binary()),
            "registered_at": pa.array([now_us()], pa.int64()),
        }),
        op="register_summarizer", metadata={"name": name, "version": version},
    )
    log.info("registered summarizer %s version %s", name, version)
    return version


def summarizer_versions(store: Store | str, name: str) -> list[str]:
    """Versions registered under ``name``, oldest first."""
    t = as_store(store).read_table("summarizers", columns=["name", "version", "registered_at"])
    if t is None:
        return []
    rows = sorted((r for r in t.to_pylist() if r["name"] == name),
                  key=lambda r: r["registered_at"])
    return list(dict.fromkeys(r["version"] for r in rows))


def resolve_version(store: Store | str, name: str, version: str | None = None) -> str:
    """``version`` if registered under ``name``, else the newest version of ``name``."""
    vs = summarizer_versions(store, name)
    if not vs:
        raise SummaryError(f"summary model '{name}': no summarizer registered under that name")
    if version is None:
        return vs[-1]
    if version not in vs:
        raise SummaryError(f"summary model '{name}': no version {version} (have {', '.join(vs)})")
    return version


def load_summarizer(store: Store | str, version: str) -> Summarizer:
    t = as_store(store).read_table("summarizers", columns=["version", "weights"],
                                   filters=pads.field("version") == version)
    if t is None or t.num_rows == 0:
        raise SummaryError(f"summarizer version {version} is not registered")
    m = Summarizer.from_bytes(t.column("weights")[0].as_py())
    if m.version != version:
        raise SummaryError(f"summarizer version {version}: stored weights hash to {m.version}")
    return m


# ---------------------------------------------------------------------------- registry


def summary_registry(store: Store | str, version: str) -> list[SummaryRegistryEntry]:
    """Published summary snapshots of ``version``, oldest first."""
    t = as_store(store).read_table("summary_snapshots")
    if t is None:
        return []
    rows = sorted((r for r in t.to_pylist() if r["version"] == version),
                  key=lambda r: r["snapshot_id"])
    return [SummaryRegistryEntry(**{k: r[k] for k in SummaryRegistryEntry.__dataclass_fields__})
            for r in rows]


# ---------------------------------------------------------------------------- reading


def _tier_rows(store: Store, bucket: int, users: np.ndarray, *, lo: int | np.ndarray, hi: int,
               columns: list[str]) -> pa.Table:
    """Tier rows of ``users`` (sorted) in one bucket with ``lo <= snapshot_id <= hi``, in fold
    order ``(user, snapshot_id, event_ts, event_id)``; ``lo`` is one snapshot for all or one per
    user. A file is read only for the users whose range reaches it (files outside every range
    are skipped from their statistics), and only its row groups of those users."""
    # The tier's live files, listed once per table version and process.
    files = store.derived("uih", "summary-tier-files", uih.list_files) or []
    keys = ["user_id", "snapshot_id", "event_ts", "event_id"]
    cols = list(dict.fromkeys([*keys, *columns]))
    lo_u = np.broadcast_to(np.asarray(lo, dtype=np.int64), users.shape)
    chunks = []
    if len(users):
        first = int(lo_u.min())
        for f in files:
            if f.bucket != bucket or (f.min_snapshot is not None and f.min_snapshot > hi) or (
                    f.max_snapshot is not None and f.max_snapshot < first):
                continue
            need = users if f.max_snapshot is None else users[lo_u <= f.max_snapshot]
            for t in uih.read_user_row_groups(store, [f], need, cols):
                u = t.column("user_id").to_numpy()
                s = t.column("snapshot_id").to_numpy()
                at = np.minimum(np.searchsorted(users, u), len(users) - 1)
                keep = (users[at] == u) & (s >= lo_u[at]) & (s <= hi)
                chunks.append(t.filter(pa.array(keep)))
    if not chunks:
        return pa.table({c: pa.array([], pa.int32() if c == "snapshot_id" else pa.int64())
                         for c in cols})
    t = pa.concat_tables(chunks, promote_options="permissive")
    return t.sort_by([(c, "ascending") for c in keys])


def _states(store: Store, version: str, buckets: np.ndarray, users: np.ndarray, before: int
            ) -> pa.Table | None:
    """Each user's newest stored state of ``version`` with ``snapshot_id < before`` (one read
    for every bucket a snapshot touched)."""
    ds = store.derived("summary_state", "dataset", delta_dataset)
    if ds is None or not len(users):
        return None
    f = ((pads.field("bucket").isin(pa.array(np.unique(buckets).astype(np.int32))))
         & (pads.field("version") == version)
         & (pads.field("snapshot_id") < before) & pads.field("user_id").isin(pa.array(users)))
    t = ds.to_table(filter=f)
    if t.num_rows == 0:
        return None
    t = t.sort_by([("user_id", "ascending"), ("snapshot_id", "descending")])
    u = t.column("user_id").to_numpy()
    first = np.concatenate([[True], u[1:] != u[:-1]])
    return t.filter(pa.array(first))


def _offsets(users: np.ndarray, row_users: np.ndarray) -> np.ndarray:
    """Offsets of each of ``users`` (sorted) in rows sorted by user."""
    return np.concatenate([[0], np.searchsorted(row_users, users, side="right")]).astype(np.int64)


def quantize(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [B, K, d] -> int8 [B, K, d] and a float32 scale per token [B, K]
    (``x ~= q * scale``; a zero token has scale 0)."""
    a = x.detach().to(torch.float32).numpy()
    scale = (np.abs(a).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint(a / safe), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


# ---------------------------------------------------------------------------- computing


def compute_summaries(
    store: Store | str, version: str, snapshot_id: int, *, model_name: str | None = None,
    published_at: int | None = None, summarizer: Summarizer | None = None,
) -> SummaryRegistryEntry:
    """Compute and publish the summaries of snapshot ``snapshot_id`` for summarizer ``version``,
    incrementally: each user the snapshot touched is folded from their previous state (or from
    scratch if they have none) with the snapshot's new events only.

    Snapshots are computed in order (k needs k-1's states); a snapshot already published is
    returned as it is (idempotent). ``published_at`` (``Q_k``) defaults to ``max(P_k, now)``;
    ``Q_k >= P_k`` and ``Q_k >= Q_{k-1}`` are enforced."""
    store = as_store(store)
    snaps = list_snapshots(store)
    if not 0 <= snapshot_id < len(snaps):
        raise SummaryError(f"snapshot {snapshot_id} is not published ({len(snaps)} snapshots)")
    snap = snaps[snapshot_id]
    model = summarizer or load_summarizer(store, version)
    if model.version != version:
        raise SummaryError(f"summarizer hashes to {model.version}, not {version}")
    with store.write_lock():
        reg = summary_registry(store, version)
        done = {e.snapshot_id: e for e in reg}
        if snapshot_id in done:
            return done[snapshot_id]
        if snapshot_id > 0 and snapshot_id - 1 not in done:
            raise SummaryError(
                f"summaries of snapshot {snapshot_id - 1} (version {version}) are not published: "
                "compute snapshots in order")
        q = max(snap.published_at, now_us()) if published_at is None else int(published_at)
        if q < snap.published_at:
            raise WatermarkError(f"summary publish time {q} is before snapshot {snapshot_id}'s "
                                 f"publish time {snap.published_at} (need Q >= P)")
        if reg and q < reg[-1].published_at:
            raise WatermarkError(f"summary publish time {q} is before snapshot "
                                 f"{reg[-1].snapshot_id}'s summary publish time "
                                 f"{reg[-1].published_at}")
        txn = f"lmat-summary-{version}"
        heads = store.read_table("heads", columns=["bucket", "user_id", "snapshot_id",
                                                   "head_len", "head_checksum"],
                                 filters=pads.field("snapshot_id") == snapshot_id)
        n_users = n_events = 0
        sdt = store.open_table("summaries")
        if sdt is None or (sdt.transaction_version(txn) or -1) < snapshot_id:
            parts, states = [], []
            if heads is not None and heads.num_rows:
                prev = _states(store, version, heads.column("bucket").to_numpy(),
                               heads.column("user_id").to_numpy(), snapshot_id)
                for b in np.unique(heads.column("bucket").to_numpy()).tolist():
                    h = heads.filter(pads.field("bucket") == b).sort_by("user_id")
                    pb = None if prev is None else prev.filter(pads.field("bucket") == b)
                    s, st, ne = _compute_bucket(store, model, version, snapshot_id, h, pb)
                    parts.append(s)
                    states.append(st)
                    n_events += ne
            summ = pa.concat_tables(parts) if parts else _empty_summaries(model)
            state = pa.concat_tables(states) if states else _empty_states()
            n_users = summ.num_rows
            # State first, summaries second (both idempotent by txn), registry last: the
            # registry row is the commit point serving looks for.
            stdt = store.open_table("summary_state")
            if stdt is None or (stdt.transaction_version(txn) or -1) < snapshot_id:
                store.append("summary_state", state, op="summary_state",
                             partition_by=["bucket"], txn=(txn, snapshot_id),
                             metadata={"version": version, "snapshot_id": snapshot_id})
            store.append("summaries", summ, op="summaries", partition_by=["bucket"],
                         txn=(txn, snapshot_id),
                         metadata={"version": version, "snapshot_id": snapshot_id,
                                   "users": n_users, "events": n_events})
        else:
            hist = [h for h in sdt.history()
                    if h.get("lmat.version") == version
                    and h.get("lmat.snapshot_id") == str(snapshot_id)]
            if hist:
                n_users = int(hist[0].get("lmat.users", 0))
                n_events = int(hist[0].get("lmat.events", 0))
        entry = SummaryRegistryEntry(version, model_name or "", snapshot_id, q, n_users,
                                     n_events, now_us())
        store.append(
            "summary_snapshots",
            pa.Table.from_pylist([entry.__dict__], schema=pa.schema([
                ("version", pa.string()), ("model", pa.string()), ("snapshot_id", pa.int32()),
                ("published_at", pa.int64()), ("users", pa.int64()), ("events", pa.int64()),
                ("created_at", pa.int64())])),
            op="register_summaries", txn=(f"lmat-summary-registry-{version}", snapshot_id),
        )
    log.info("summaries of snapshot %d (version %s): %d users, %d new events",
             snapshot_id, version, n_users, n_events)
    return entry


def _compute_bucket(store: Store, model: Summarizer, version: str, k: int, heads: pa.Table,
                    prev: pa.Table | None) -> tuple[pa.Table, pa.Table, int]:
    users = heads.column("user_id").to_numpy()
    head_len = heads.column("head_len").to_numpy()
    b = int(heads.column("bucket")[0].as_py())
    cols = ["item_id", "action", "event_ts", "event_id"]
    new = _tier_rows(store, b, users, lo=k, hi=k, columns=cols)
    state = VistaState.zeros(model.cfg, len(users))
    csum = np.zeros(len(users), dtype=np.uint64)
    if prev is not None and prev.num_rows:
        pu = prev.column("user_id").to_numpy()
        at = np.searchsorted(users, pu)
        kv = np.stack([np.frombuffer(x, dtype=np.float64) for x in
                       prev.column("state").to_pylist()])
        got = VistaState.from_flat(model.cfg, kv, prev.column("n_events").to_numpy(),
                                   prev.column("last_ts").to_numpy())
        idx = torch.from_numpy(at)
        state.kv[idx], state.n[idx], state.last_ts[idx] = got.kv, got.n, got.last_ts
        csum[at] = prev.column("checksum").to_numpy().view(np.uint64)
    new_counts = np.diff(_offsets(users, new.column("user_id").to_numpy()))
    # A user whose previous state does not account for their head (no state stored: their
    # first summary, or states computed elsewhere) is folded from scratch.
    scratch = state.n.numpy() + new_counts != head_len
    if scratch.any():
        su = users[scratch]
        state.kv[torch.from_numpy(scratch)] = 0
        state.n[torch.from_numpy(scratch)] = 0
        state.last_ts[torch.from_numpy(scratch)] = 0
        csum[scratch] = 0
        old = _tier_rows(store, b, su, lo=0, hi=k - 1, columns=cols)
        if old.num_rows:
            new = pa.concat_tables([old, new]).sort_by(
                [(c, "ascending") for c in ("user_id", "snapshot_id", "event_ts", "event_id")])
    u = new.column("user_id").to_numpy()
    off = _offsets(users, u)
    item = new.column("item_id").to_numpy()
    action = new.column("action").to_numpy()
    ts = new.column("event_ts").to_numpy()
    fp = event_fingerprint(new.column("event_id").to_numpy(), ts)
    with np.errstate(over="ignore"):
        cs = np.concatenate([[np.uint64(0)], np.cumsum(fp, dtype=np.uint64)])
        csum = csum + (cs[off[1:]] - cs[off[:-1]])
    state = model.extend(state, item, action, ts, off)
    n_after = state.n.numpy()
    if not np.array_equal(n_after, head_len):
        bad = int(np.flatnonzero(n_after != head_len)[0])
        raise O2OConsistencyError(
            f"summaries of snapshot {k}: user {users[bad]} folded {n_after[bad]} events but "
            f"the head holds {head_len[bad]}")
    tokens = model.summarize(state)
    q, scale = quantize(tokens)
    n = len(users)
    common = {
        "version": pa.array([version] * n, pa.string()),
        "snapshot_id": pa.array(np.full(n, k, np.int32)),
        "bucket": pa.array(np.full(n, b, np.int32)),
        "user_id": pa.array(users),
    }
    summ = pa.table({
        **common,
        "head_len": pa.array(head_len.astype(np.int64)),
        "head_checksum": heads.column("head_checksum").combine_chunks(),
        "tokens": pa.array([r.tobytes() for r in q], pa.binary()),
        "scales": pa.array([r.tobytes() for r in scale], pa.binary()),
    })
    st = pa.table({
        **common,
        "n_events": pa.array(n_after.astype(np.int64)),
        "last_ts": pa.array(state.last_ts.numpy()),
        "checksum": pa.array(as_signed(csum)),
        "state": pa.array([r.tobytes() for r in state.flat()], pa.binary()),
    })
    if not np.array_equal(as_signed(csum), heads.column("head_checksum").to_numpy()):
        bad = int(np.flatnonzero(as_signed(csum) != heads.column("head_checksum").to_numpy())[0])
        raise O2OConsistencyError(
            f"summaries of snapshot {k}: user {users[bad]}'s folded events have another "
            "checksum than their head")
    return summ, st, int(len(ts))


def _empty_summaries(model: Summarizer) -> pa.Table:
    return pa.table({
        "version": pa.array([], pa.string()), "snapshot_id": pa.array([], pa.int32()),
        "bucket": pa.array([], pa.int32()), "user_id": pa.array([], pa.int64()),
        "head_len": pa.array([], pa.int64()), "head_checksum": pa.array([], pa.int64()),
        "tokens": pa.array([], pa.binary()), "scales": pa.array([], pa.binary()),
    })


def _empty_states() -> pa.Table:
    return pa.table({
        "version": pa.array([], pa.string()), "snapshot_id": pa.array([], pa.int32()),
        "bucket": pa.array([], pa.int32()), "user_id": pa.array([], pa.int64()),
        "n_events": pa.array([], pa.int64()), "last_ts": pa.array([], pa.int64()),
        "checksum": pa.array([], pa.int64()), "state": pa.array([], pa.binary()),
    })


def compute_pending(store: Store | str, version: str, *, model_name: str | None = None,
                    publish_delay_us: int | None = None, through: int | None = None
                    ) -> list[SummaryRegistryEntry]:
    """Compute every published snapshot (up to snapshot ``through``, None: all) that has no
    summaries of ``version`` yet, in order, published at ``Q_k = P_k + publish_delay_us``
    (None: the wall clock, at least ``P_k``)."""
    store = as_store(store)
    model = load_summarizer(store, version)
    done = {e.snapshot_id for e in summary_registry(store, version)}
    out = []
    for s in list_snapshots(store):
        if s.snapshot_id not in done and (through is None or s.snapshot_id <= through):
            q = None if publish_delay_us is None else s.published_at + publish_delay_us
            out.append(compute_summaries(store, version, s.snapshot_id, model_name=model_name,
                                         published_at=q, summarizer=model))
    return out


# ---------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class RecomputeReport:
    snapshot_id: int
    users: int
    max_state_rel_err: float
    max_token_steps: float
    checksum_mismatches: int

    @property
    def ok(self) -> bool:
        return (self.max_state_rel_err <= STATE_RTOL and self.max_token_steps <= TOKEN_STEPS
                and self.checksum_mismatches == 0)


def read_summary_rows(store: Store, version: str, snapshot_id: int | None = None,
                      users: np.ndarray | None = None) -> pa.Table | None:
    dt = store.open_table("summaries")
    if dt is None:
        return None
    f = pads.field("version") == version
    if snapshot_id is not None:
        f &= pads.field("snapshot_id") == snapshot_id
    if users is not None:
        f &= pads.field("user_id").isin(pa.array(np.asarray(users, np.int64)))
    return delta_dataset(dt).to_table(filter=f)


def recompute_check(store: Store | str, version: str, snapshot_id: int, *,
                    max_users: int | None = None) -> RecomputeReport:
    """Recompute snapshot ``snapshot_id``'s summaries from scratch (each user's whole head
    folded from a zero state) and compare with the stored, incrementally computed ones: states
    within :data:`STATE_RTOL` (relative to the state's largest value), tokens within
    :data:`TOKEN_STEPS` quantization steps, checksums equal to the heads'."""
    store = as_store(store)
    model = load_summarizer(store, version)
    rows = read_summary_rows(store, version, snapshot_id)
    if rows is None or rows.num_rows == 0:
        return RecomputeReport(snapshot_id, 0, 0.0, 0.0, 0)
    rows = rows.sort_by([("bucket", "ascending"), ("user_id", "ascending")])
    if max_users is not None:
        rows = rows.slice(0, max_users)
    sdt = store.open_table("summary_state")
    st_rows = delta_dataset(sdt).to_table(filter=(pads.field("version") == version) & (
        pads.field("snapshot_id") == snapshot_id)) if sdt is not None else None
    heads = store.read_table("heads", columns=["user_id", "snapshot_id", "head_checksum"],
                             filters=pads.field("snapshot_id") == snapshot_id)
    hmap = dict(zip(heads.column("user_id").to_pylist(), heads.column("head_checksum").to_pylist(),
                    strict=True)) if heads is not None else {}
    # Users whose state of this snapshot may have been pruned: they have a newer one.
    newer = set()
    if sdt is not None:
        later = delta_dataset(sdt).to_table(columns=["user_id"], filter=(
            pads.field("version") == version) & (pads.field("snapshot_id") > snapshot_id))
        newer = set(later.column("user_id").to_pylist())
    smap = {}
    if st_rows is not None:
        for u, s in zip(st_rows.column("user_id").to_pylist(), st_rows.column("state").to_pylist(),
                        strict=True):
            smap[u] = np.frombuffer(s, dtype=np.float64)
    max_state = max_tok = 0.0
    mismatches = 0
    cols = ["item_id", "action", "event_ts", "event_id"]
    for b in np.unique(rows.column("bucket").to_numpy()).tolist():
        r = rows.filter(pads.field("bucket") == b)
        users = r.column("user_id").to_numpy()
        t = _tier_rows(store, int(b), users, lo=0, hi=snapshot_id, columns=cols)
        off = _offsets(users, t.column("user_id").to_numpy())
        ts = t.column("event_ts").to_numpy()
        state = model.extend(VistaState.zeros(model.cfg, len(users)), t.column("item_id").to_numpy(),
                             t.column("action").to_numpy(), ts, off)
        fp = event_fingerprint(t.column("event_id").to_numpy(), ts)
        with np.errstate(over="ignore"):
            cs = np.concatenate([[np.uint64(0)], np.cumsum(fp, dtype=np.uint64)])
            csum = as_signed(cs[off[1:]] - cs[off[:-1]])
        stored_cs = r.column("head_checksum").to_numpy()
        mismatches += int(np.sum(csum != stored_cs))
        mismatches += int(sum(hmap.get(int(u)) != int(c) for u, c in zip(users, stored_cs,
                                                                          strict=True)))
        flat = state.flat()
        for i, u in enumerate(users.tolist()):
            s = smap.get(u)
            if s is None:
                # Pruned once superseded (summaries.retention): the tokens are still compared.
                if int(u) not in newer:
                    mismatches += 1
                continue
            scale = max(float(np.abs(flat[i]).max()), 1e-30)
            max_state = max(max_state, float(np.abs(flat[i] - s).max()) / scale)
        tok = model.summarize(state).numpy()
        q = np.stack([np.frombuffer(x, np.int8) for x in r.column("tokens").to_pylist()])
        sc = np.stack([np.frombuffer(x, np.float32) for x in r.column("scales").to_pylist()])
        q = q.reshape(len(users), model.cfg.k, model.cfg.d)
        step = np.where(sc > 0, sc, 1.0)[..., None]
        err = np.abs(tok - dequantize(q, sc)) / step
        max_tok = max(max_tok, float(err.max()) if err.size else 0.0)
    rep = RecomputeReport(snapshot_id, rows.num_rows, max_state, max_tok, mismatches)
    log.info("recompute check of snapshot %d: %s", snapshot_id, rep)
    return rep


def storage_report(store: Store | str, version: str) -> dict[str, float]:
    """Bytes of the summary tier per (user, snapshot) row, from the files' footers: tokens and
    scales (what serving reads), the recurrent state (what the next snapshot extends), and the
    snapshots it keeps."""
    store = as_store(store)
    out: dict[str, float] = {}
    for name in SUMMARY_TABLES:
        dt = store.open_table(name)
        if dt is None:
            continue
        fs, root = store.filesystem()
        total = rows = 0
        per_col: dict[str, int] = {}
        for f in dt.file_uris():
            path = f.removeprefix("file://")
            md = pq.ParquetFile(path).metadata
            rows += md.num_rows
            for g in range(md.num_row_groups):
                for i in range(md.num_columns):
                    c = md.row_group(g).column(i)
                    name_c = c.path_in_schema
                    per_col[name_c] = per_col.get(name_c, 0) + c.total_compressed_size
                    total += c.total_compressed_size
        out[f"{name}_rows"] = rows
        out[f"{name}_bytes"] = total
        out[f"{name}_bytes_per_row"] = total / rows if rows else 0.0
        for c, nb in per_col.items():
            out[f"{name}.{c}_bytes_per_row"] = nb / rows if rows else 0.0
    out["snapshots_kept"] = len(summary_registry(store, version))
    return out
