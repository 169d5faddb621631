"""The training batch: jagged sequences (values + lengths per column) and request context.

A batch of B requests holds, for every tenant column, the B sequences concatenated in request
order (``values[c]``), and one ``lengths`` tensor shared by all columns. Worked for B = 3 with
lengths 2, 0 and 3 (the second user had no visible history)::

    request_id   [ 11,        12,  13          ]
    lengths      [ 2,         0,   3           ]      sum(lengths) == 5 == len(values[c])
    offsets      [ 0,         2,   2,          5 ]    offsets() = [0, cumsum(lengths)]
    values[item] [ 7   9    |    | 4   4   8   ]
                   ^ request 11  ^ request 13 (oldest first, newest last)

    padded("item", side="right")      padded("item", side="left")
    [[7, 9, 0],                       [[0, 7, 9],
     [0, 0, 0],                        [0, 0, 0],
     [4, 4, 8]]                        [4, 4, 8]]

``context`` holds numeric ride-along request columns (labels, candidate features), one value per
request. The layout is the ``KeyedJaggedTensor`` convention; :meth:`Batch.to_kjt` converts.

A deduplicated batch (``SequenceLoader(dedup=True)``, RecD; :mod:`lmat_platform.reader.dedup`)
holds each distinct sequence once: ``lengths`` and ``values`` are then those of its U distinct
sequences, and ``inverse_indices`` [B] names each request's; :meth:`Batch.expand` gives the
plain batch, :meth:`Batch.padded` is per request either way::

    request_id       [ 11, 12, 13 ]
    inverse_indices  [ 0,  0,  1  ]      requests 11 and 12 saw the same history
    lengths          [ 2,      3  ]
    values[item]     [ 7  9  | 4  4  8 ]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """B requests with their reconstructed sequences, as tensors."""

    #: int64 [B]
    request_id: torch.Tensor
    #: int64 [B]: sequence length of each request (shared by every column).
    lengths: torch.Tensor
    #: column -> 1-D tensor of sum(lengths) values, the B sequences concatenated in order.
    values: dict[str, torch.Tensor]
    #: numeric ride-along request column -> tensor [B].
    context: dict[str, torch.Tensor] = field(default_factory=dict)
    #: int64 [B]
    user_id: torch.Tensor | None = None
    #: int64 [B], microseconds
    request_ts: torch.Tensor | None = None
    #: Compressed bytes read from storage (UIH tier and thin rows) attributed to this batch.
    bytes_read: int = 0
    #: Of ``bytes_read``: bytes of thin rows (pointers, stored tails, context); the rest is UIH.
    thin_bytes_read: int = 0
    #: Summary tenants only (spec section 10; :mod:`lmat_platform.summaries`): float32
    #: [B, K, d] summary tokens (zeros without one), ``summary_mask`` bool [B], and the pointer
    #: of what was served (``snapshot_id``, ``head_len``, ``head_checksum``, ``published_at``,
    #: each [B]); ``values``/``lengths`` then hold the tails.
    summary: torch.Tensor | None = None
    summary_mask: torch.Tensor | None = None
    summary_pointer: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Deduplicated batches only: int64 [B], request i's sequence is row ``inverse_indices[i]``
    #: of ``lengths`` / ``values`` (which then hold the distinct sequences). None: plain.
    inverse_indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def num_sequences(self) -> int:
        """Sequences the batch holds: B, or the distinct ones of a deduplicated batch."""
        return int(self.lengths.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's tensors: what moves to the trainer, or to an accelerator."""
        total = 0
        for f in fields(self):
            v = getattr(self, f.name)
            for t in (v.values() if isinstance(v, dict) else [v]):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def expand(self) -> Batch:
        """The plain batch (one sequence per request) of a deduplicated one; a plain batch is
        returned as it is."""
        inv = self.inverse_indices
        if inv is None:
            return self
        starts = self.offsets()[:-1][inv]
        lens = self.lengths[inv]
        total = int(lens.sum())
        # Position of every output value in the distinct values: its sequence's start + rank.
        out_off = torch.zeros(len(lens) + 1, dtype=torch.int64, device=lens.device)
        torch.cumsum(lens, 0, out=out_off[1:])
        owner = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens,
                                        output_size=total)
        pos = starts[owner] + torch.arange(total, device=lens.device) - out_off[:-1][owner]
        return replace(self, lengths=lens, values={c: v[pos] for c, v in self.values.items()},
                       inverse_indices=None)

    @property
    def batch_size(self) -> int:
        return len(self)

    def validate(self) -> None:
        """Raise ValueError if the jagged layout is inconsistent (off the hot path)."""
        n = int(self.lengths.sum())
        inv = self.inverse_indices
        if inv is None and len(self.lengths) != len(self):
            raise ValueError(f"{len(self.lengths)} lengths for {len(self)} requests")
        if inv is not None and (inv.shape != (len(self),) or (len(self) and (
                int(inv.min()) < 0 or int(inv.max()) >= len(self.lengths)))):
            raise ValueError(
                f"inverse_indices must be [{len(self)}] indices into {len(self.lengths)} "
                f"sequences, but got shape {tuple(inv.shape)}"
            )
        for c, v in self.values.items():
            if v.dim() != 1 or v.shape[0] != n:
                raise ValueError(
                    f"Sum of lengths must equal the number of values, but got {n} and "
                    f"{tuple(v.shape)} for column '{c}'"
                )
        for c, v in self.context.items():
            if v.shape[0] != len(self):
                raise ValueError(f"context '{c}' has {v.shape[0]} values for {len(self)} requests")

    # ------------------------------------------------------------------ devices
    def _map(self, fn: Any) -> Batch:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = fn(v)
            elif isinstance(v, dict):
                out[f.name] = {k: fn(t) for k, t in v.items()}
            else:
                out[f.name] = v
        return replace(self, **out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy of the batch on ``device`` (tensors already there are not copied)."""
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory, for asynchronous host-to-device copies.

        Without an accelerator there is nothing to pin for, so the batch is returned as is
        (as torch's DataLoader does with ``pin_memory=True`` on a CPU-only machine).
        """
        if not torch.cuda.is_available():
            log.debug("pin_memory: no accelerator available; batch left unpinned")
            return self
        return self._map(lambda t: t.pin_memory())

    # ------------------------------------------------------------------ views
    def offsets(self, col: str | None = None) -> torch.Tensor:
        """int64 [B + 1]: ``values[c][offsets[i]:offsets[i + 1]]`` is request i's sequence.

        All columns share the offsets; ``col`` is accepted (and checked) for symmetry with
        per-key jagged APIs. A deduplicated batch's offsets are those of its distinct sequences
        ([U + 1]; request i's sequence is ``inverse_indices[i]``).
        """
        if col is not None and col not in self.values:
            raise KeyError(f"no column '{col}' in batch (have {sorted(self.values)})")
        out = torch.zeros(len(self.lengths) + 1, dtype=torch.int64, device=self.lengths.device)
        torch.cumsum(self.lengths, 0, out=out[1:])
        return out

    def padded(
        self,
        col: str,
        max_len: int | None = None,
        side: Literal["right", "left"] = "right",
        pad_value: float | int = 0,
    ) -> torch.Tensor:
        """Dense [B, max_len] view of column ``col``, padded with ``pad_value``.

        ``max_len`` defaults to the longest sequence of the batch; a longer sequence keeps its
        **last** ``max_len`` values (the most recent events), as the tenant's own cut does.
        ``side="left"`` aligns every sequence's newest event in the last column. One row per
        request, deduplicated batch or not.
        """
        if side not in ("right", "left"):
            raise ValueError(f"side must be 'right' or 'left', but got {side!r}")
        v = self.values[col]
        lens = self.lengths
        rows = len(lens)
        m = int(lens.max()) if rows and max_len is None else int(max_len or 0)
        if m < 0:
            raise ValueError(f"max_len must be >= 0, but got {max_len}")
        out = torch.full((rows, m), pad_value, dtype=v.dtype, device=v.device)
        if self.inverse_indices is not None:
            return self._padded_rows(out, v, lens, m, side)[self.inverse_indices]
        return self._padded_rows(out, v, lens, m, side)

    def _padded_rows(self, out: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, m: int,
                     side: str) -> torch.Tensor:
        if m == 0 or len(lens) == 0:
            return out
        keep = torch.clamp(lens, max=m)
        start = self.offsets()[:-1] + lens - keep  # first kept value of each sequence
        j = torch.arange(m, device=v.device).unsqueeze(0)
        if side == "right":
            mask = j < keep.unsqueeze(1)
            src = start.unsqueeze(1) + j
        else:
            shift = (m - keep).unsqueeze(1)
            mask = j >= shift
            src = start.unsqueeze(1) + j - shift
        out[mask] = v[src[mask]]
        return out

    def to_kjt(self, columns: list[str] | None = None) -> Any:
        """The sequences as a TorchRec ``KeyedJaggedTensor`` (keys = columns, values int64).

        ``columns`` defaults to the integer columns (ids); float columns cannot be keys of one
        int64 jagged tensor. Needs the optional ``torchrec`` package.
        """
        try:
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        except ImportError as e:
            raise ImportError(
                "Batch.to_kjt needs torchrec, which is not installed: pip install torchrec "
                "(or use batch.values / batch.lengths / batch.offsets() directly)"
            ) from e
        keys = columns if columns is not None else [
            c for c, v in self.values.items() if not v.is_floating_point()
        ]
        for c in keys:
            if c not in self.values:
                raise KeyError(f"no column '{c}' in batch (have {sorted(self.values)})")
            if self.values[c].is_floating_point():
                raise ValueError(f"column '{c}' is floating point; KeyedJaggedTensor keys are ids")
        if not keys:
            raise ValueError("no integer columns to convert to a KeyedJaggedTensor")
        inv = self.inverse_indices
        # A deduplicated batch: the KJT holds the distinct sequences, and its inverse indices
        # (one row of request -> sequence per key) expand them to the batch.
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(keys),
            values=torch.cat([self.values[c].to(torch.int64) for c in keys]),
            lengths=self.lengths.repeat(len(keys)),
            **({} if inv is None else {
                "inverse_indices": (list(keys), inv.unsqueeze(0).repeat(len(keys), 1))}),
        )
