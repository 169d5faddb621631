"""A small sequential recommender trained through :class:`~lmat_platform.reader.SequenceLoader`.

The model is a causal transformer over the tenant's item sequence (a SASRec-style encoder) that
predicts the request's binary label from the last position's state. It exists to show the
platform end to end (thin rows -> reader -> batches -> training) and to measure the reader under a
real training loop: examples/s and the share of step time spent waiting for data.

Input layout. A batch arrives jagged (values + lengths); the model takes the last ``max_seq_len``
items of each sequence, right-padded behind a BOS token, worked for two requests with
``max_seq_len = 3``::

    lengths          = [4, 1]
    values[item_id]  = [a b c d | e]
    tokens           = [[BOS b c d]      lengths after cut = [3, 1]
                        [BOS e 0 0]]     read-out position = [3, 1]

Item ids are hashed into ``n_item_buckets`` embedding rows (0 is padding, 1 is BOS), so the model
has a fixed size whatever the catalogue.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lmat_platform.tenants import Tenant

log = logging.getLogger(__name__)

PAD, BOS, FIRST_ITEM = 0, 1, 2


@dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`CausalSeqModel`."""

    n_item_buckets: int = 50_000
    """Hashed item vocabulary (embedding rows for items)."""
    max_seq_len: int = 64
    """Most recent items the model attends to (the tenant's sequence is cut to this)."""
    d_model: int = 32
    """Width of embeddings and the transformer."""
    n_heads: int = 2
    """Attention heads."""
    n_layers: int = 1
    """Transformer encoder layers."""
    dropout: float = 0.1
    """Dropout inside the encoder."""


class CausalSeqModel(nn.Module):
    """Item embedding + learned positions + causal transformer encoder + a logit head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(cfg.n_item_buckets + FIRST_ITEM, cfg.d_model, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_seq_len + 1, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model,
            cfg.n_heads,
            dim_feedforward=4 * cfg.d_model,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 1)

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits [B] from ``tokens`` [B, S] (right-padded) read out at position ``last`` [B]."""
        s = tokens.shape[1]
        pos = torch.arange(s, device=tokens.device)
        x = self.items(tokens) + self.pos(pos)[None, :, :]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), diagonal=1)
        h = self.encoder(x, mask=causal, src_key_padding_mask=tokens == PAD)
        h = self.norm(h[torch.arange(len(last), device=tokens.device), last])
        return self.head(h).squeeze(-1)


def pad_sequences(
    items: torch.Tensor, lengths: torch.Tensor, *, max_seq_len: int, n_item_buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``items`` (1-D, concatenated) + ``lengths`` [B] -> (tokens [B, S], last [B]).

    Keeps the last ``max_seq_len`` items of each sequence, behind a BOS token (see the module
    docstring); ``last`` is the position to read the prediction from.
    """
    lengths = lengths.to(torch.int64)
    b = len(lengths)
    kept = torch.clamp(lengths, max=max_seq_len)
    width = int(kept.max().item()) + 1 if b else 1
    tokens = torch.zeros(b, width, dtype=torch.int64, device=items.device)
    tokens[:, 0] = BOS
    if len(items):
        starts = torch.cumsum(lengths, 0) - lengths
        owner = torch.repeat_interleave(torch.arange(b, device=items.device), lengths)
        idx = torch.arange(len(items), device=items.device) - starts[owner]
        col = idx - (lengths - kept)[owner]
        keep = col >= 0
        ids = torch.remainder(items[keep].to(torch.int64), n_item_buckets) + FIRST_ITEM
        tokens[owner[keep], col[keep] + 1] = ids
    return tokens, kept


@dataclass
class TrainResult:
    """What a training run produced: metrics, and where the model was saved."""

    metrics: dict[str, Any]
    model_path: str | None
    losses: list[float] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_model(
    store: str,
    thin_uri: str,
    tenant: Tenant,
    *,
    out_dir: str | None = None,
    model: ModelConfig | None = None,
    item_column: str = "item_id",
    label_column: str = "label",
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 3e-3,
    max_steps: int | None = None,
    num_workers: int = 0,
    device: Literal["auto", "cpu", "cuda"] | str = "auto",
    seed: int = 0,
    log_every: int = 20,
) -> TrainResult:
    """Train :class:`CausalSeqModel` on ``thin_uri``'s requests, read through ``SequenceLoader``.

    Logs loss, examples/s and the share of step time spent waiting for the next batch. Saves the
    model (``model.pt``, state dict and config) and ``metrics.json`` under ``out_dir`` if given.
    """
    from lmat_platform.reader import SequenceLoader

    if item_column not in tenant.columns:
        raise ValueError(
            f"tenant '{tenant.name}' has no column '{item_column}' (columns: {list(tenant.columns)})"
        )
    cfg = model or ModelConfig()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    net = CausalSeqModel(cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    loader = SequenceLoader(
        store,
        thin_uri,
        tenant=tenant,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=True,
        seed=seed,
    )

    losses: list[float] = []
    examples = steps = 0
    wait_s = step_s = 0.0
    positives = 0.0
    t_start = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        it = iter(loader)
        while max_steps is None or steps < max_steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            batch = batch.to(dev)
            t1 = time.perf_counter()
            tokens, last = pad_sequences(
                batch.values[item_column],
                batch.lengths,
                max_seq_len=cfg.max_seq_len,
                n_item_buckets=cfg.n_item_buckets,
            )
            y = batch.context[label_column].to(torch.float32)
            loss = loss_fn(net(tokens, last), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.item())  # syncs the device, so step timing is honest
            t2 = time.perf_counter()
            wait_s += t1 - t0
            step_s += t2 - t0
            steps += 1
            examples += len(y)
            positives += float(y.sum().item())
            losses.append(value)
            if steps % log_every == 0:
                log.info(
                    "epoch %d step %d loss %.4f  %.0f examples/s  data wait %.0f%%",
                    epoch,
                    steps,
                    value,
                    examples / max(step_s, 1e-9),
                    100 * wait_s / max(step_s, 1e-9),
                )
        if max_steps is not None and steps >= max_steps:
            break
    wall = time.perf_counter() - t_start
    tail = losses[-max(1, len(losses) // 5) :] if losses else []
    metrics: dict[str, Any] = {
        "tenant": tenant.name,
        "device": str(dev),
        "epochs": epochs,
        "steps": steps,
        "examples": examples,
        "positive_rate": positives / examples if examples else 0.0,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": sum(tail) / len(tail) if tail else math.nan,
        "examples_per_s": examples / step_s if step_s > 0 else 0.0,
        "data_wait_share": wait_s / step_s if step_s > 0 else 0.0,
        "wall_s": wall,
        "parameters": sum(p.numel() for p in net.parameters()),
        "model": asdict(cfg),
    }
    log.info(
        "trained %s: %d steps, %d examples, final loss %.4f, %.0f examples/s, data wait %.0f%%",
        tenant.name,
        steps,
        examples,
        metrics["final_loss"],
        metrics["examples_per_s"],
        100 * metrics["data_wait_share"],
    )
    path = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "model.pt")
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(
            {"state_dict": net.state_dict(), "config": asdict(cfg), "tenant": tenant.as_dict()}, tmp
        )
        os.replace(tmp, path)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({**metrics, "losses": losses}, f, indent=2, default=str)
    return TrainResult(metrics, path, losses)


def load_model(path: str, *, map_location: str = "cpu") -> CausalSeqModel:
    """Load a model saved by :func:`train_model`."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    net = CausalSeqModel(ModelConfig(**blob["config"]))
    net.load_state_dict(blob["state_dict"])
    return net
