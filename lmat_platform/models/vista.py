"""VISTA: a summarizer of whole histories into K tokens, and the downstream target attention.

**The summarizer** (:class:`Summarizer`) reads a user's events (item, action, time features)
through a stack of *causal quasi-linear attention* layers: per head,

    out_t = phi(q_t)^T S_t / n_t,    S_t = sum_{s <= t} phi(k_s) v_s^T,    phi = SiLU

(no softmax; dividing by the count ``n_t`` keeps the scale fixed over a million events). Its
**recurrent state** after n events is, per layer, the matrix ``S`` [heads, dk, dv], plus ``n``
and the last event time (for the time-gap feature). Appending events only needs the state:

    state(A + B) = extend(state(A), B)     (exactly, up to floating-point summation order)

**Summary tokens are a function of the state alone**: K learnable seed tokens pass through the
same layers, each reading the history through the layer's state (``phi(W_q seed)^T S / n``),
attending to each other (softmax over the K seeds), and an MLP. So the summary of snapshot k,
computed from the state after k-1 extended with snapshot k's events, equals the summary
computed from scratch (checked to a tolerance by the summary tier). The state is accumulated in
float64; the summary is computed in float32.

Events are folded in **arrival order by snapshot**: the events of snapshot 0 in
``(event_ts, event_id)`` order, then those of snapshot 1, ... (a late event of snapshot k is
folded with snapshot k, not inserted back into k-1's order). That is what makes the state
extendable snapshot by snapshot.

**Training** (:func:`reconstruction_loss`): the generative reconstruction objective. For each
sequence a cut ``c`` is drawn; the summary of the prefix ``1..c`` (read from the training pass's
running states at ``c``, no second pass) and the next ``window`` events go through a small causal
decoder (softmax attention over ``[summary tokens; events c+1..]``) that predicts, at every
position, the embedding of the next item, scored against the whole item table (full softmax; a
plain L2 regression to learned embeddings collapses to a constant).

**Downstream** (:class:`TargetAttentionRanker`): every candidate item attends (softmax) to the
K summary tokens and the N tail events only; candidates never attend to each other, so the cost
per candidate is O(K + N) whatever the history's length.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_US_PER_MIN = 60_000_000
_US_PER_DAY = 86_400_000_000
_US_PER_WEEK = 7 * _US_PER_DAY


@dataclass(frozen=True)
class VistaConfig:
    """Shape of a :class:`Summarizer`."""

    n_items: int = 4096
    """Item ids are hashed (``item_id mod n_items``) into this many embedding rows."""
    n_actions: int = 16
    """Action codes are hashed into this many embedding rows."""
    d: int = 32
    """Width of events, states and summary tokens."""
    k: int = 8
    """Summary tokens (learnable seeds)."""
    heads: int = 2
    """Heads of each linear-attention layer (``d`` divisible by it)."""
    layers: int = 2
    """Causal linear-attention layers."""
    decoder_layers: int = 1
    """Layers of the causal softmax decoder used by the reconstruction loss (training only)."""
    window: int = 16
    """Events after the cut the decoder reconstructs (training only)."""

    def __post_init__(self) -> None:
        if self.d % self.heads:
            raise ValueError(f"d must be divisible by heads, but got {self.d} and {self.heads}")
        for f in ("n_items", "n_actions", "d", "k", "heads", "layers", "window"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, but got {getattr(self, f)}")


@dataclass
class VistaState:
    """Recurrent state of B users (float64): what extending a summary needs.

    ``kv`` [B, layers, heads, dk, dv] holds each layer's ``sum phi(k) v^T``; ``n`` [B] the events
    folded in; ``last_ts`` [B] the newest folded event's ``event_ts`` (the time-gap feature of the
    next event)."""

    kv: torch.Tensor
    n: torch.Tensor
    last_ts: torch.Tensor

    def __len__(self) -> int:
        return int(self.n.shape[0])

    @classmethod
    def zeros(cls, cfg: VistaConfig, b: int) -> VistaState:
        dh = cfg.d // cfg.heads
        return cls(
            torch.zeros(b, cfg.layers, cfg.heads, dh, dh, dtype=torch.float64),
            torch.zeros(b, dtype=torch.int64),
            torch.zeros(b, dtype=torch.int64),
        )

    def flat(self) -> np.ndarray:
        """[B, state_size] float64 (kv flattened): the stored form."""
        return self.kv.reshape(len(self), -1).numpy()

    @classmethod
    def from_flat(cls, cfg: VistaConfig, kv: np.ndarray, n: np.ndarray, last_ts: np.ndarray
                  ) -> VistaState:
        dh = cfg.d // cfg.heads
        t = torch.from_numpy(np.ascontiguousarray(kv, dtype=np.float64))
        return cls(t.reshape(-1, cfg.layers, cfg.heads, dh, dh),
                   torch.from_numpy(np.asarray(n, dtype=np.int64).copy()),
                   torch.from_numpy(np.asarray(last_ts, dtype=np.int64).copy()))

    def select(self, idx: torch.Tensor | np.ndarray) -> VistaState:
        i = torch.as_tensor(idx, dtype=torch.int64)
        return VistaState(self.kv[i], self.n[i], self.last_ts[i])


def time_features(ts: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """[..., 5] float features of event times (microseconds) and the previous event's time:
    log1p(gap in minutes), hour of day and day of week as sin/cos."""
    gap = torch.clamp(ts - prev, min=0).to(torch.float64) / _US_PER_MIN
    tod = (torch.remainder(ts, _US_PER_DAY).to(torch.float64) / _US_PER_DAY) * (2 * math.pi)
    dow = (torch.remainder(ts, _US_PER_WEEK).to(torch.float64) / _US_PER_WEEK) * (2 * math.pi)
    return torch.stack([torch.log1p(gap) / 10.0, torch.sin(tod), torch.cos(tod),
                        torch.sin(dow), torch.cos(dow)], dim=-1).to(torch.float32)


class _FFN(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))))


class LinearAttentionLayer(nn.Module):
    """One causal quasi-linear attention layer (pre-norm, residual, MLP) and its seed read."""

    def __init__(self, cfg: VistaConfig):
        super().__init__()
        self.h = cfg.heads
        self.dh = cfg.d // cfg.heads
        self.norm = nn.LayerNorm(cfg.d)
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d)
        self.out = nn.Linear(cfg.d, cfg.d)
        self.ffn = _FFN(cfg.d)
        # Seeds: their own query projection into the history state, self-attention, MLP.
        self.seed_norm = nn.LayerNorm(cfg.d)
        self.seed_q = nn.Linear(cfg.d, cfg.d)
        self.seed_out = nn.Linear(cfg.d, cfg.d)
        self.seed_self = nn.MultiheadAttention(cfg.d, cfg.heads, batch_first=True)
        self.seed_self_norm = nn.LayerNorm(cfg.d)
        self.seed_ffn = _FFN(cfg.d)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.h, self.dh)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, kv0: torch.Tensor | None, n0: torch.Tensor,
        *, acc: torch.dtype, keep_prefix: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Events ``x`` [B, L, d] (``mask`` [B, L] marks real ones, a prefix of each row) after
        a state ``kv0`` [B, h, dk, dv] of ``n0`` [B] events -> (outputs [B, L, d], the state
        after the real events, and the running states [B, L, h, dk, dv] if ``keep_prefix``)."""
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        fq = F.silu(self._heads(q))
        fk = F.silu(self._heads(k)) * mask[..., None, None].to(q.dtype)
        vv = self._heads(v)
        kv = torch.einsum("blhd,blhe->blhde", fk.to(acc), vv.to(acc))
        run = torch.cumsum(kv, dim=1)
        if kv0 is not None:
            run = run + kv0[:, None].to(acc)
        cnt = n0[:, None] + torch.cumsum(mask.to(torch.int64), dim=1)
        att = torch.einsum("blhd,blhde->blhe", fq.to(acc), run)
        att = att / torch.clamp(cnt, min=1)[..., None, None].to(acc)
        y = x + self.out(att.to(x.dtype).reshape(*x.shape))
        y = self.ffn(y)
        y = y * mask[..., None].to(y.dtype)
        if x.shape[1]:
            last = run[:, -1]  # padding adds zeros to the running sum
        else:
            last = kv0.to(acc) if kv0 is not None else torch.zeros(
                x.shape[0], self.h, self.dh, self.dh, dtype=acc)
        return y, last, (run if keep_prefix else None)

    def seeds(self, s: torch.Tensor, kv: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Seeds ``s`` [B, K, d] read the history state ``kv`` [B, h, dk, dv] of ``n`` events."""
        fq = F.silu(self._heads(self.seed_q(self.seed_norm(s))))
        att = torch.einsum("bkhd,bhde->bkhe", fq.to(kv.dtype), kv)
        att = att / torch.clamp(n, min=1)[:, None, None, None].to(kv.dtype)
        s = s + self.seed_out(att.to(s.dtype).reshape(*s.shape))
        z = self.seed_self_norm(s)
        s = s + self.seed_self(z, z, z, need_weights=False)[0]
        return self.seed_ffn(s)


class Summarizer(nn.Module):
    """Seeds plus a causal quasi-linear attention stack (see the module docstring)."""

    def __init__(self, cfg: VistaConfig):
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(cfg.n_items, cfg.d)
        self.actions = nn.Embedding(cfg.n_actions, cfg.d)
        self.time = nn.Linear(5, cfg.d)
        self.layers = nn.ModuleList(LinearAttentionLayer(cfg) for _ in range(cfg.layers))
        self.seed = nn.Parameter(torch.randn(cfg.k, cfg.d) * 0.02)
        self.final = nn.LayerNorm(cfg.d)
        dec = nn.TransformerEncoderLayer(cfg.d, cfg.heads, dim_feedforward=4 * cfg.d, dropout=0.0,
                                         batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(dec, cfg.decoder_layers, enable_nested_tensor=False)
        self.dec_pos = nn.Embedding(cfg.k + cfg.window, cfg.d)
        self.dec_norm = nn.LayerNorm(cfg.d)
        self.predict = nn.Linear(cfg.d, cfg.d)

    # ------------------------------------------------------------------ identity
    @property
    def version(self) -> str:
        """A hash of the configuration and the weights (16 hex digits)."""
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"config": asdict(self.cfg), "state": self.state_dict()}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Summarizer:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        m = cls(VistaConfig(**obj["config"]))
        m.load_state_dict(obj["state"])
        return m.eval()

    # ------------------------------------------------------------------ events
    def embed(self, item: torch.Tensor, action: torch.Tensor, ts: torch.Tensor,
              prev_ts: torch.Tensor) -> torch.Tensor:
        """Event vectors [B, L, d] from padded ``item``, ``action``, ``ts`` [B, L] and the
        time of the event before each row's first one ``prev_ts`` [B] (its own time: gap 0)."""
        prev = torch.cat([prev_ts[:, None], ts[:, :-1]], dim=1)
        return (self.items(torch.remainder(item, self.cfg.n_items))
                + self.actions(torch.remainder(action.to(torch.int64), self.cfg.n_actions))
                + self.time(time_features(ts, prev)))

    def _stack(self, x: torch.Tensor, mask: torch.Tensor, state: VistaState | None, *,
               acc: torch.dtype, keep_prefix: bool = False
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
        n0 = state.n if state is not None else torch.zeros(x.shape[0], dtype=torch.int64)
        lasts, prefixes = [], []
        for i, layer in enumerate(self.layers):
            kv0 = state.kv[:, i] if state is not None else None
            x, last, pre = layer(x, mask, kv0, n0, acc=acc, keep_prefix=keep_prefix)
            lasts.append(last)
            prefixes.append(pre)
        return x, lasts, prefixes

    def summary_from_state(self, state: VistaState) -> torch.Tensor:
        """Summary tokens [B, K, d] (float32) of the histories whose state is ``state``; rows
        with no events are zeros (serving masks them)."""
        return self._seeds([state.kv[:, i] for i in range(self.cfg.layers)], state.n)

    def _seeds(self, kvs: list[torch.Tensor], n: torch.Tensor) -> torch.Tensor:
        s = self.seed[None].expand(len(n), -1, -1)
        for layer, kv in zip(self.layers, kvs, strict=True):
            assert isinstance(layer, LinearAttentionLayer)
            s = layer.seeds(s, kv, n)
        return self.final(s) * (n > 0)[:, None, None].to(s.dtype)

    @torch.no_grad()
    def extend(self, state: VistaState, item: np.ndarray, action: np.ndarray, ts: np.ndarray,
               offsets: np.ndarray, *, chunk: int = 4096) -> VistaState:
        """The state after folding, for each user b, the events ``offsets[b]:offsets[b+1]`` of
        the flat arrays (in fold order) into ``state`` (one row per user). Long histories are
        folded ``chunk`` events at a time, so memory stays bounded."""
        if len(offsets) != len(state) + 1:
            raise ValueError(f"offsets must have {len(state) + 1} entries, but got {len(offsets)}")
        lens = np.diff(offsets)
        kv, n, last_ts = state.kv.clone(), state.n.clone(), state.last_ts.clone()
        todo = np.flatnonzero(lens > 0)
        if not len(todo):
            return VistaState(kv, n, last_ts)
        # Users with similar lengths are padded together (bounded waste).
        todo = todo[np.argsort(lens[todo], kind="stable")]
        it = torch.from_numpy(np.array(item, dtype=np.int64))
        ac = torch.from_numpy(np.array(action, dtype=np.int64))
        tt = torch.from_numpy(np.array(ts, dtype=np.int64))
        budget = max(chunk * 8, 1)
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and (j + 1 - i) * min(int(lens[todo[j]]), chunk) <= budget:
                j += 1
            group = todo[i:j]
            done = np.zeros(len(group), dtype=np.int64)
            while True:
                left = lens[group] - done
                act = left > 0
                if not act.any():
                    break
                # Only rows with events left: a long history does not drag finished rows along.
                rows, d0, lf = group[act], done[act], left[act]
                w = int(min(lf.max(), chunk))
                take = np.minimum(lf, w)
                pos = offsets[rows][:, None] + d0[:, None] + np.arange(w)[None, :]
                m = np.arange(w)[None, :] < take[:, None]
                pos = np.where(m, pos, 0)
                mt = torch.from_numpy(m)
                r = torch.from_numpy(rows)
                sub = VistaState(kv[r], n[r], last_ts[r])
                tsb = tt[pos]
                prev = torch.where(sub.n > 0, sub.last_ts, tsb[:, 0])
                # Padding repeats a real event's time: no gap feature from padding.
                x = self.embed(it[pos], ac[pos], tsb, prev) * mt[..., None].to(torch.float32)
                _, lasts, _ = self._stack(x, mt, sub, acc=torch.float64)
                kv[r] = torch.stack(lasts, dim=1)
                n[r] = sub.n + torch.from_numpy(take)
                last_ts[r] = tt[torch.from_numpy(offsets[rows] + d0 + take - 1)]
                done[act] += take
            i = j
        return VistaState(kv, n, last_ts)

    @torch.no_grad()
    def summarize(self, state: VistaState) -> torch.Tensor:
        """:meth:`summary_from_state` without gradients (serving and the summary tier)."""
        return self.summary_from_state(state)


# ---------------------------------------------------------------------------- training


def pad_events(
    item: np.ndarray, action: np.ndarray, ts: np.ndarray, offsets: np.ndarray, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last ``max_len`` events of each of B sequences as padded [B, L] tensors
    (left-aligned) and the mask."""
    lens = np.minimum(np.diff(offsets), max_len)
    w = max(int(lens.max()) if len(lens) else 1, 1)
    start = offsets[1:] - lens
    pos = start[:, None] + np.arange(w)[None, :]
    m = np.arange(w)[None, :] < lens[:, None]
    pos = np.where(m, pos, 0)
    if len(item) == 0:
        z = torch.zeros(len(lens), w, dtype=torch.int64)
        return z, z.clone(), z.clone(), torch.from_numpy(m)
    return (torch.from_numpy(np.asarray(item, np.int64)[pos]),
            torch.from_numpy(np.asarray(action, np.int64)[pos]),
            torch.from_numpy(np.asarray(ts, np.int64)[pos]), torch.from_numpy(m))


def reconstruction_loss(
    model: Summarizer, item: torch.Tensor, action: torch.Tensor, ts: torch.Tensor,
    mask: torch.Tensor, *, generator: torch.Generator | None = None, cuts: int = 1,
) -> torch.Tensor:
    """The generative reconstruction loss of a padded batch (rows with >= 2 events count).

    ``cuts`` cuts ``c`` are drawn per row in ``[1, len - 1]`` (the pass over the row's events is
    shared by them); for each, the decoder sees the summary of events ``1..c`` and events
    ``c+1 .. c+window-1``, and predicts items ``c+1 .. c+window``."""
    cfg = model.cfg
    lens = mask.sum(1)
    ok = lens >= 2
    if not ok.any():
        return (model.seed * 0).sum()
    item, action, ts, mask, lens = item[ok], action[ok], ts[ok], mask[ok], lens[ok]
    b, L = item.shape
    x = model.embed(item, action, ts, ts[:, 0])
    _, _, prefixes = model._stack(x, mask, None, acc=torch.float32, keep_prefix=True)
    rows = torch.arange(b).repeat_interleave(cuts)
    lens_r = lens[rows]
    u = torch.rand(len(rows), generator=generator)
    cut = 1 + torch.floor(u * (lens_r - 1).to(torch.float32)).to(torch.int64)  # in summary
    kvs = [p[rows, cut - 1] for p in prefixes if p is not None]
    summ = model._seeds(kvs, cut)  # [b * cuts, K, d]
    w = cfg.window
    pos = cut[:, None] + torch.arange(w)[None, :]  # target positions c .. c+w-1 (0-based)
    valid = pos < lens_r[:, None]
    posc = torch.clamp(pos, max=L - 1)
    # Decoder inputs: the summary, then events c .. c+w-2 (0-based); targets: items c .. c+w-1.
    inp = torch.gather(x[rows], 1, posc[:, :-1, None].expand(-1, -1, cfg.d)) * valid[:, :-1, None]
    seq = torch.cat([summ, inp], dim=1)
    seq = seq + model.dec_pos(torch.arange(seq.shape[1]))[None]
    s = seq.shape[1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    h = model.decoder(seq, mask=causal)
    # Reads: the last summary token predicts item c; event c+j predicts item c+j+1.
    out = model.predict(model.dec_norm(h[:, cfg.k - 1:]))  # [b * cuts, w, d]
    target = torch.remainder(torch.gather(item[rows], 1, posc), cfg.n_items)
    logits = out @ model.items.weight.T
    return F.cross_entropy(logits[valid], target[valid])


# ---------------------------------------------------------------------------- downstream


@dataclass(frozen=True)
class RankerConfig:
    """Shape of a :class:`TargetAttentionRanker`."""

    n_items: int = 4096
    """Item embedding rows (ids hashed mod n_items)."""
    d: int = 32
    """Width of the ranker."""
    summary_d: int = 32
    """Width of the summary tokens it reads."""
    tail_len: int = 8
    """Tail events it reads (the last ones)."""
    heads: int = 2


class TargetAttentionRanker(nn.Module):
    """Scores candidates by target attention to the summary tokens and the tail.

    For candidate c of request b: ``o = softmax(e_c W_q [S_b; T_b]^T) [S_b; T_b] W_v`` over the
    K summary tokens ``S_b`` (projected) and the tail events ``T_b`` (item embedding plus a
    recency position), masked where absent, with values ``W_v = MLP(memory)`` (computed once per
    request, not per candidate); score = ``<e_c, o> + b_c``. Candidates are independent: cost
    per candidate is O((K + N) d).
    """

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(cfg.n_items, cfg.d)
        self.summ = nn.Linear(cfg.summary_d, cfg.d)
        self.summ_norm = nn.LayerNorm(cfg.summary_d)
        self.tail_pos = nn.Embedding(cfg.tail_len, cfg.d)
        self.kind = nn.Embedding(2, cfg.d)
        self.q = nn.Linear(cfg.d, cfg.d)
        self.k = nn.Linear(cfg.d, cfg.d)
        self.v = nn.Sequential(nn.Linear(cfg.d, cfg.d), nn.SiLU(), nn.Linear(cfg.d, cfg.d))
        self.bias = nn.Embedding(cfg.n_items, 1)
        nn.init.zeros_(self.bias.weight)

    def memory(self, summary: torch.Tensor, summary_mask: torch.Tensor, tail: torch.Tensor,
               tail_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values source [B, K + N, d] and mask from summaries [B, K, ds] (``summary_mask``
        [B]: the user has one), tail items [B, N] (right-aligned, newest last) and mask."""
        n = tail.shape[1]
        s = self.summ(self.summ_norm(summary)) + self.kind.weight[0]
        pos = torch.arange(n) + (self.cfg.tail_len - n)
        t = self.items(torch.remainder(tail, self.cfg.n_items)) + self.tail_pos(pos)[None]
        t = t + self.kind.weight[1]
        mem = torch.cat([s, t], dim=1)
        m = torch.cat([summary_mask[:, None].expand(-1, summary.shape[1]), tail_mask], dim=1)
        return mem, m

    def forward(self, summary: torch.Tensor, summary_mask: torch.Tensor, tail: torch.Tensor,
                tail_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of ``candidates`` [B, C] or [C] (shared, e.g. the whole catalogue)."""
        mem, m = self.memory(summary, summary_mask, tail, tail_mask)
        shared = candidates.dim() == 1
        e = self.items(torch.remainder(candidates, self.cfg.n_items))
        q = self.q(e)
        k, v = self.k(mem), self.v(mem)
        logits = torch.einsum("cd,bmd->bcm" if shared else "bcd,bmd->bcm", q, k)
        logits = logits / math.sqrt(self.cfg.d)
        # A request with nothing to attend to reads a zero vector.
        logits = logits.masked_fill(~m[:, None, :], float("-inf"))
        att = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        o = torch.einsum("bcm,bmd->bcd", att, v)
        b = self.bias(torch.remainder(candidates, self.cfg.n_items)).squeeze(-1)
        if shared:
            return torch.einsum("bcd,cd->bc", o, e) + b[None]
        return torch.einsum("bcd,bcd->bc", o, e) + b


# ---------------------------------------------------------------------------- training loop


def batch_events(batch: object, max_len: int) -> tuple[torch.Tensor, ...]:
    """Padded (item, action, event_ts, mask) of a reader batch's sequences (their last
    ``max_len`` events), from its jagged ``values`` (``item_id``, ``action``, ``event_ts``)."""
    v = batch.values  # type: ignore[attr-defined]
    lens = batch.lengths.numpy()  # type: ignore[attr-defined]
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return pad_events(v["item_id"].numpy(), v["action"].numpy(), v["event_ts"].numpy(), off,
                      max_len)


def train_summarizer(
    store: object, thin_uri: str, tenant: object, *, cfg: VistaConfig | None = None,
    epochs: int = 1, batch_size: int = 64, lr: float = 3e-3, max_len: int = 256,
    max_steps: int | None = None, seed: int = 0, cuts: int = 1, patience: int = 0,
    min_improvement: float = 0.005, warmup_steps: int = 0,
    on_epoch: Callable[[Summarizer, dict[str, object]], None] | None = None,
) -> tuple[Summarizer, dict[str, object]]:
    """Train a summarizer with :func:`reconstruction_loss` on the histories
    :class:`~lmat_platform.reader.SequenceLoader` rebuilds for ``tenant`` (it must read
    ``item_id``, ``action`` and ``event_ts``), ``cuts`` cuts per history a step.

    Runs ``epochs`` passes (or ``max_steps`` steps); with ``patience``, stops once that many
    epochs in a row lowered the mean training loss by less than ``min_improvement`` (relative):
    converged. The learning rate warms up linearly over ``warmup_steps``, then follows a cosine
    to a tenth of ``lr`` over the planned steps. Returns the model (eval mode) and metrics, with
    the mean loss of every epoch. ``on_epoch(model, metrics)`` is called after every epoch
    (e.g. to keep the weights of a run that may be stopped)."""
    import time

    from lmat_platform.reader import SequenceLoader

    cols = set(tenant.columns)  # type: ignore[attr-defined]
    missing = {"item_id", "action", "event_ts"} - cols
    if missing:
        raise ValueError(f"tenant '{tenant.name}' lacks columns {sorted(missing)} the "  # type: ignore[attr-defined]
                         "summarizer reads")
    torch.manual_seed(seed)
    model = Summarizer(cfg or VistaConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = SequenceLoader(store, thin_uri, tenant=tenant, batch_size=batch_size,  # type: ignore[arg-type]
                            shuffle=True, seed=seed)
    planned = max_steps if max_steps is not None else epochs * max(len(loader), 1)

    def rate(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        f = min(1.0, (step - warmup_steps) / max(planned - warmup_steps, 1))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * f))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    epoch_losses: list[float] = []
    examples = 0
    flat = 0
    converged = False
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        first = len(losses)
        for b in loader:
            loss = reconstruction_loss(model, *batch_events(b, max_len), generator=g, cuts=cuts)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            examples += len(b)
            if max_steps is not None and len(losses) >= max_steps:
                break
        epoch_losses.append(float(np.mean(losses[first:])) if len(losses) > first else math.nan)
        log.info("summarizer epoch %d: loss %.4f (%d steps, %.0f s)", epoch, epoch_losses[-1],
                 len(losses), time.perf_counter() - t0)
        if on_epoch is not None:
            on_epoch(model, {"steps": len(losses), "epoch_losses": list(epoch_losses),
                             "seconds": time.perf_counter() - t0})
        if len(epoch_losses) >= 2 and patience:
            prev, cur = epoch_losses[-2], epoch_losses[-1]
            flat = flat + 1 if prev - cur < min_improvement * abs(prev) else 0
            if flat >= patience:
                converged = True
                break
        if max_steps is not None and len(losses) >= max_steps:
            break
    secs = time.perf_counter() - t0
    log.info("summarizer: %d steps, loss %.3f -> %.3f", len(losses),
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return model.eval(), {
        "steps": len(losses), "examples": examples, "seconds": secs,
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "epoch_losses": epoch_losses, "converged": converged,
    }
