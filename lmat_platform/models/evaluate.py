"""Next-item evaluation: the leave-one-out split by time and full-ranking HR@K / NDCG@K.

The protocol (the one RecBole, SASRec and most sequential-recommendation papers use):

* **Split** (:func:`leave_one_out_split`): each user's ratings ordered by ``(event_ts,
  event_id)``; the last is the **test** target, the one before it the **validation** target, the
  rest are **training** targets. A user with two ratings has no training target, with one only a
  test target.
* **Ranking**: every item of the catalogue is scored; the target's rank is the number of other
  items that score strictly higher plus the number that tie with it (ties count against the
  target, so a constant scorer gets no credit). Padding columns must score ``-inf``.
* **HR@K** is the share of requests whose target ranks in the top K; **NDCG@K** with one relevant
  item is ``1 / log2(rank + 2)`` (rank 0-based) inside the top K, 0 outside, averaged.
* **Seen-item filtering** (optional): items already in the request's history are removed from
  the ranking before the target is ranked; the target itself is never removed. Results are
  reported both ways (``hr@10`` and ``hr@10_filtered``); RecBole's published numbers are
  unfiltered.

Worked example: scores ``[-inf, 0.9, 0.5, 0.7]`` (column 0 is padding), target 2, seen item 1:
unfiltered rank 2 (items 1 and 3 score higher), so HR@2 = 0, NDCG@3 = 1/log2(4) = 0.5; filtered
rank 1 (only item 3 is left above), HR@2 = 1, NDCG@2 = 1/log2(3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

TRAIN, VALID, TEST = 0, 1, 2
"""Split codes returned by :func:`leave_one_out_split`."""

SPLIT_NAMES = {TRAIN: "train", VALID: "valid", TEST: "test"}


def leave_one_out_split(
    user_id: np.ndarray, event_ts: np.ndarray, event_id: np.ndarray
) -> np.ndarray:
    """Split code (``TRAIN``/``VALID``/``TEST``, int8) of each rating, in input order.

    Per user, ratings are ordered by ``(event_ts, event_id)``: the last is ``TEST``, the one
    before ``VALID``, the others ``TRAIN``. The arrays are parallel and may come in any order.
    """
    user_id = np.asarray(user_id)
    event_ts = np.asarray(event_ts)
    event_id = np.asarray(event_id)
    if not (len(user_id) == len(event_ts) == len(event_id)):
        raise ValueError(
            "user_id, event_ts and event_id must have one length, but got "
            f"{len(user_id)}, {len(event_ts)} and {len(event_id)}"
        )
    n = len(user_id)
    out = np.full(n, TRAIN, dtype=np.int8)
    if n == 0:
        return out
    order = np.lexsort((event_id, event_ts, user_id))
    u = user_id[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = u[:-1] != u[1:]
    out[order[last]] = TEST
    # The rating before a user's last one, if it belongs to the same user.
    prev = np.zeros(n, dtype=bool)
    prev[:-1] = last[1:] & ~last[:-1]
    out[order[prev]] = VALID
    return out


def seen_mask(
    values: torch.Tensor, lengths: torch.Tensor, n_items: int
) -> torch.Tensor:
    """Boolean [B, n_items] mask of the items in each of B jagged sequences.

    ``values`` is the B sequences' item indices concatenated, ``lengths`` [B] their lengths
    (the reader's layout); indices outside ``[0, n_items)`` are ignored.
    """
    lengths = lengths.to(torch.int64)
    b = len(lengths)
    mask = torch.zeros(b, n_items, dtype=torch.bool, device=values.device)
    if len(values):
        owner = torch.repeat_interleave(torch.arange(b, device=values.device), lengths)
        v = values.to(torch.int64)
        ok = (v >= 0) & (v < n_items)
        mask[owner[ok], v[ok]] = True
    return mask


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, *, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank [B] of each target among all columns of ``scores`` [B, N].

    Rank = items scoring strictly above the target + other items tying with it (pessimistic).
    With ``seen`` (bool [B, N]), seen items other than the target are left out of the ranking.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], but got shape {tuple(scores.shape)}")
    b, n = scores.shape
    targets = targets.to(torch.int64).reshape(-1)
    if len(targets) != b:
        raise ValueError(f"expected {b} targets (one per row of scores), but got {len(targets)}")
    if b and (int(targets.min()) < 0 or int(targets.max()) >= n):
        raise ValueError(
            f"targets must lie in [0, {n}), but got range [{int(targets.min())}, "
            f"{int(targets.max())}]"
        )
    rows = torch.arange(b, device=scores.device)
    t = scores[rows, targets].unsqueeze(1)
    ahead = scores >= t
    ahead[rows, targets] = False
    if seen is not None:
        if seen.shape != scores.shape:
            raise ValueError(
                f"seen must have the shape of scores {tuple(scores.shape)}, "
                f"but got {tuple(seen.shape)}"
            )
        ahead &= ~seen.to(torch.bool)
    return ahead.sum(dim=1)


def hr_ndcg_at_k(
    scores: torch.Tensor,
    targets: torch.Tensor,
    k: int = 10,
    seen: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean HR@k and NDCG@k of one batch: ``{"hr@k": ..., "ndcg@k": ..., "n": B}``."""
    acc = RankingAccumulator(ks=(k,))
    acc.update(scores, targets, seen=seen)
    r = acc.result()
    return {f"hr@{k}": r[f"hr@{k}"], f"ndcg@{k}": r[f"ndcg@{k}"], "n": r["n"]}


@dataclass
class RankingAccumulator:
    """Sums HR@K and NDCG@K over batches, unfiltered and (where ``seen`` is given) filtered.

    It counts the requests at each rank below the largest K (integers), so the result does not
    depend on how the requests were split into batches: scoring the same requests in batches of
    1 or of 512 gives equal figures, to the last bit. ``result()`` keys: ``hr@K``, ``ndcg@K``,
    and ``hr@K_filtered``, ``ndcg@K_filtered`` when every batch came with ``seen``; ``n`` is the
    number of requests.
    """

    ks: tuple[int, ...] = (10,)
    n: int = 0
    _counts: dict[str, np.ndarray] = field(default_factory=dict)
    _filtered_n: int = 0

    def update(
        self, scores: torch.Tensor, targets: torch.Tensor, *, seen: torch.Tensor | None = None
    ) -> None:
        """Add one batch: ``scores`` [B, N], ``targets`` [B] (column indices), ``seen`` [B, N]."""
        self._add(target_ranks(scores, targets), "")
        if seen is not None:
            self._add(target_ranks(scores, targets, seen=seen), "_filtered")
            self._filtered_n += len(targets)
        self.n += len(targets)

    def _add(self, ranks: torch.Tensor, suffix: str) -> None:
        top = max(self.ks)
        r = ranks.to(torch.int64).cpu()
        counts = torch.bincount(r[r < top], minlength=top).numpy()
        self._counts[suffix] = self._counts.get(suffix, np.zeros(top, dtype=np.int64)) + counts

    def result(self) -> dict[str, float]:
        """Means over every request added so far (NaN before the first)."""
        out: dict[str, float] = {}
        gains = [1.0 / math.log2(r + 2) for r in range(max(self.ks))]
        for suffix, counts in self._counts.items():
            denom = self._filtered_n if suffix else self.n
            if suffix and self._filtered_n != self.n:
                continue  # some batches came without seen items: no filtered figure
            for k in self.ks:
                hits = int(counts[:k].sum())
                gain = math.fsum(int(c) * g for c, g in zip(counts[:k], gains, strict=False))
                out[f"hr@{k}{suffix}"] = hits / denom if denom else math.nan
                out[f"ndcg@{k}{suffix}"] = gain / denom if denom else math.nan
        return {"n": float(self.n), **dict(sorted(out.items()))}


def most_popular_scores(train_items: np.ndarray | torch.Tensor, n_items: int) -> torch.Tensor:
    """Scores [n_items] of the most-popular baseline: each item's count among training targets.

    Column 0 (padding) scores ``-inf``. Every request gets the same scores.
    """
    items = torch.as_tensor(np.array(train_items, dtype=np.int64))
    counts = torch.bincount(items, minlength=n_items)[:n_items].to(torch.float32)
    counts[0] = -math.inf
    return counts


def beats_baseline(
    model: dict[str, float], baseline: dict[str, float], *, key: str = "hr@10"
) -> tuple[bool, str]:
    """Whether ``model[key]`` is strictly above ``baseline[key]``, and a one-line verdict."""
    a, b = float(model[key]), float(baseline[key])
    if a > b:
        return True, f"{key} {a:.4f} is above the baseline's {b:.4f}"
    return False, f"{key} {a:.4f} is not above the baseline's {b:.4f}"
