"""The next-item recommender: a SASRec-style causal transformer (or HSTU blocks) over a tenant's
item sequence, scored against every item of the catalogue (full softmax).

Input layout. The reader's batch is jagged (values + lengths); :func:`left_pad` keeps the last
``max_len`` items of each sequence and aligns them to the right, so the newest item is always in
the last column and positions count back from it. Worked for two requests, ``max_len = 3``::

    lengths          = [4, 0]
    values[item_id]  = [a b c d]
    tokens           = [[b c d]          positions (0 = newest) = [2 1 0]
                        [0 0 BOS]]       an empty history reads a learned BOS token

Item indices are 1..n_items (0 is padding, ``n_items + 1`` is BOS). The output embedding is the
input one (tied, as in SASRec): ``scores = h_last @ E[0..n_items].T`` with column 0 set to -inf.

Blocks. ``sasrec``: post-LayerNorm multi-head softmax attention and a GELU feed-forward (the
layout of RecBole's SASRec). ``hstu``: the HSTU block of Zhai et al. 2024 (pointwise SiLU
attention normalized by ``max_len``, and a gating ``U``), one projection in, one out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0


@dataclass(frozen=True)
class SASRecConfig:
    """Shape of :class:`SASRec`."""

    n_items: int
    """Catalogue size; item indices are 1..n_items."""
    max_len: int = 50
    """Most recent items the model reads (longer sequences are cut, keeping the newest)."""
    d_model: int = 64
    """Width of embeddings and blocks."""
    n_heads: int = 2
    """Attention heads."""
    n_layers: int = 2
    """Blocks."""
    d_inner: int = 256
    """Feed-forward width (``sasrec`` blocks)."""
    dropout: float = 0.2
    """Dropout on embeddings, attention and block outputs."""
    block: Literal["sasrec", "hstu"] = "sasrec"
    """Block type."""
    repeat: bool = False
    """A learned logit offset (one scalar, starting at 0) for the items already in the input
    window: lets the model learn how likely a user is to act on an item again (MovieLens users
    never rate a film twice, so training drives it negative; on data with repeats it can
    learn the other sign)."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def right_align(
    values: torch.Tensor, lengths: torch.Tensor, *, max_len: int, fill: int = PAD
) -> torch.Tensor:
    """Jagged ``values`` + ``lengths`` [B] -> right-aligned [B, S], S <= ``max_len``: the last
    ``max_len`` values of each sequence, the newest in the last column, ``fill`` before them
    (the layout of :func:`left_pad`, for any per-item column such as arrival times)."""
    lengths = lengths.to(torch.int64)
    b = len(lengths)
    kept = torch.clamp(lengths, max=max_len)
    width = max(int(kept.max().item()) if b else 1, 1)
    out = torch.full((b, width), fill, dtype=torch.int64, device=values.device)
    if len(values):
        starts = torch.cumsum(lengths, 0) - lengths
        owner = torch.repeat_interleave(torch.arange(b, device=values.device), lengths)
        from_end = starts[owner] + lengths[owner] - torch.arange(len(values), device=values.device)
        keep = from_end <= kept[owner]  # from_end = 1 for the newest item
        out[owner[keep], width - from_end[keep]] = values[keep].to(torch.int64)
    return out


def left_pad(
    items: torch.Tensor, lengths: torch.Tensor, *, max_len: int, bos: int
) -> torch.Tensor:
    """Jagged ``items`` + ``lengths`` [B] -> right-aligned tokens [B, S], S <= ``max_len``.

    Keeps the last ``max_len`` items of each sequence (see the module docstring); a row with no
    items holds ``bos`` in its last column.
    """
    tokens = right_align(items, lengths, max_len=max_len)
    tokens[lengths.to(torch.int64) == 0, -1] = bos
    return tokens


class _SASRecBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_inner), nn.GELU(), nn.Linear(cfg.d_inner, cfg.d_model)
        )
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.p = cfg.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.p if self.training else 0.0
        )
        x = self.ln1(x + self.drop(self.out(a.transpose(1, 2).reshape(b, s, d))))
        return self.ln2(x + self.drop(self.ff(x)))


class _HSTUBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.ln_in = nn.LayerNorm(cfg.d_model)
        self.f1 = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.f2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.n = cfg.max_len  # a fixed normalizer: outputs do not depend on padding width

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        u, v, q, k = F.silu(self.f1(self.ln_in(x))).chunk(4, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.h, d // self.h).transpose(1, 2)

        w = F.silu(heads(q) @ heads(k).transpose(-1, -2)) / self.n
        w = w * allowed[:, None].to(w.dtype)
        a = (self.drop(w) @ heads(v)).transpose(1, 2).reshape(b, s, d)
        return x + self.drop(self.f2(self.ln_attn(a) * u))


class SASRec(nn.Module):
    """Item + position embeddings, causal blocks, read out at the newest position, scored
    against the tied item embeddings."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"d_model must be a multiple of n_heads, but got {cfg.d_model} and {cfg.n_heads}"
            )
        self.cfg = cfg
        self.bos = cfg.n_items + 1
        self.items = nn.Embedding(cfg.n_items + 2, cfg.d_model, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        block = _HSTUBlock if cfg.block == "hstu" else _SASRecBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.final_ln = nn.LayerNorm(cfg.d_model) if cfg.block == "hstu" else nn.Identity()
        self.apply(self._init)
        self.repeat = nn.Parameter(torch.zeros(())) if cfg.repeat else None

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, tokens: torch.Tensor, *, all_positions: bool = False) -> torch.Tensor:
        """User states from right-aligned ``tokens`` [B, S] (see :func:`left_pad`): [B, d] at
        the newest position, or [B, S, d] at every position with ``all_positions``."""
        s = tokens.shape[1]
        if s > self.cfg.max_len:
            raise ValueError(f"tokens has {s} columns, more than max_len {self.cfg.max_len}")
        pos = torch.arange(s - 1, -1, -1, device=tokens.device)  # 0 = newest
        x = self.drop(self.ln(self.items(tokens) + self.pos(pos)[None]))
        valid = tokens != PAD
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        allowed = causal[None] & valid[:, None, :]
        allowed |= torch.eye(s, dtype=torch.bool, device=tokens.device)[None]
        for blk in self.blocks:
            x = blk(x, allowed)
        return self.final_ln(x if all_positions else x[:, -1])

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scores [B, n_items + 1] of every item for the next item (column 0 is -inf)."""
        seen = self._in_window(tokens) if self.repeat is not None else None
        return self._logits(self.encode(tokens), seen)

    def _in_window(
        self, tokens: torch.Tensor, rows: torch.Tensor | None = None,
        upto: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, n_items + 1] bool: the items in each row of ``tokens``; with ``rows`` and
        ``upto`` [K], [K, n_items + 1]: the items in columns ``0..upto[k]`` of row ``rows[k]``
        (what the state read at that column has seen)."""
        b, s = tokens.shape
        col = torch.arange(s, device=tokens.device).expand(b, s)
        first = torch.full((b, self.cfg.n_items + 2), s, dtype=torch.int64, device=tokens.device)
        first.scatter_reduce_(1, tokens, col, reduce="amin")  # first column of each item
        first = first[:, : self.cfg.n_items + 1]
        first[:, PAD] = s
        if rows is None or upto is None:
            return first < s
        return first[rows] <= upto[:, None]

    def _logits(self, h: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        out = h @ self.items.weight[: self.cfg.n_items + 1].T
        if self.repeat is not None and seen is not None:
            out = out + self.repeat * seen.to(out.dtype)
        out[..., PAD] = -math.inf
        return out

    def loss(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        *,
        positions: str = "all",
        arrivals: torch.Tensor | None = None,
        window_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the catalogue, and the number of targets it averages.

        ``last``: one target per request, its label, read at the newest position. ``all``:
        every item of the window after the first is a target too (the newest predicts the
        label), as in SASRec's training; padding and BOS are never targets.

        ``arrivals`` [B, S] (the items' arrival times, right-aligned like ``tokens``; padding
        holds any value below every arrival): an item is then predicted from the newest
        position whose items all arrived strictly before it, i.e. from its own H(u, T) inside
        the window (same-second ratings are not visible to each other, as at serving time);
        an item with nothing visible inside the window is not a target. Without it, from the
        position just before it. The label is always read at the newest position.
        ``window_targets`` [B]: train only each row's newest ``window_targets`` targets (the
        label and the items before it), so that overlapping windows do not train an item twice.
        """
        if positions == "last":
            return F.cross_entropy(self.scores(tokens), labels.long()), len(labels)
        if positions != "all":
            raise ValueError(f"positions must be 'all' or 'last', but got {positions!r}")
        b, s = tokens.shape
        col = torch.arange(s, device=tokens.device)
        target = torch.empty_like(tokens)  # target[:, j]: the item after column j
        target[:, :-1] = tokens[:, 1:]
        target[:, -1] = labels.long()
        item = (tokens != PAD) & (tokens != self.bos)
        is_target = torch.ones_like(item)
        is_target[:, :-1] = item[:, 1:]
        if arrivals is None:
            query = col.expand(b, s)
        else:
            # Newest column whose items (and all before it) arrived before the target.
            seen = torch.cummax(arrivals, dim=1).values.contiguous()
            t_arr = torch.empty_like(arrivals)
            t_arr[:, :-1] = arrivals[:, 1:]
            query = torch.searchsorted(seen, t_arr.contiguous(), side="left") - 1
            query[:, -1] = s - 1
        q_ok = (query >= 0) & torch.gather(item, 1, query.clamp(min=0)) | (query == s - 1)
        query = query.clamp(min=0)
        keep = is_target & q_ok
        if window_targets is not None:
            keep &= col[None] >= s - window_targets.to(torch.int64)[:, None]
        h = self.encode(tokens, all_positions=True)
        rows = torch.arange(b, device=tokens.device)[:, None].expand(b, s)
        rows_k, query_k = rows[keep], query[keep]
        states = h[rows_k, query_k]
        in_win = self._in_window(tokens, rows_k, query_k) if self.repeat is not None else None
        t = target[keep]
        return F.cross_entropy(self._logits(states, in_win), t), len(t)

    def tokens(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The reader's jagged items -> this model's input (:func:`left_pad`)."""
        return left_pad(items, lengths, max_len=self.cfg.max_len, bos=self.bos)


def load_sasrec(path: str, *, map_location: str = "cpu") -> SASRec:
    """A model saved by the training loop (``model.pt``: config and state dict)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    net = SASRec(SASRecConfig(**blob["config"]))
    net.load_state_dict(blob["state_dict"])
    net.eval()
    return net
