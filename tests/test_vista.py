"""The VISTA summarizer: its recurrent state extends exactly, summaries are a function of the
state, the reconstruction loss trains, and the downstream ranker's candidates are independent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmat_platform.models.vista import (
    RankerConfig,
    Summarizer,
    TargetAttentionRanker,
    VistaConfig,
    VistaState,
    pad_events,
    reconstruction_loss,
)

CFG = VistaConfig(n_items=256, d=16, k=4, heads=2, layers=2, window=4)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # Small tensors: intra-op threads only contend on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _events(lens: list[int], seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    n = int(sum(lens))
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ts = np.concatenate([np.sort(rng.integers(0, 10**12, m)) for m in lens]) if n else \
        np.zeros(0, np.int64)
    return rng.integers(0, 10_000, n), rng.integers(0, 5, n), ts, off


def _split(arrs: tuple[np.ndarray, ...], cuts: np.ndarray) -> tuple[tuple, tuple]:
    item, act, ts, off = arrs
    first = [np.concatenate([a[off[b]:off[b] + cuts[b]] for b in range(len(cuts))])
             for a in (item, act, ts)]
    second = [np.concatenate([a[off[b] + cuts[b]:off[b + 1]] for b in range(len(cuts))])
              for a in (item, act, ts)]
    lens = np.diff(off)
    return ((*first, np.concatenate([[0], np.cumsum(cuts)])),
            (*second, np.concatenate([[0], np.cumsum(lens - cuts)])))


@pytest.mark.parametrize("chunk", [3, 4096])
def test_extend_is_exact_in_pieces(chunk: int) -> None:
    torch.manual_seed(0)
    m = Summarizer(CFG).eval()
    lens = [0, 1, 7, 50, 333]
    arrs = _events(lens)
    cuts = np.array([0, 1, 3, 0, 200])
    full = m.extend(VistaState.zeros(CFG, len(lens)), *arrs, chunk=chunk)
    a, b = _split(arrs, cuts)
    s1 = m.extend(VistaState.zeros(CFG, len(lens)), *a, chunk=chunk)
    s2 = m.extend(s1, *b, chunk=7)
    assert full.n.tolist() == lens == s2.n.tolist()
    assert torch.equal(full.last_ts, s2.last_ts)
    scale = full.kv.abs().max()
    # float32 activations between layers: a last-bit difference in layer 1 reaches layer 2.
    assert float((full.kv - s2.kv).abs().max() / scale) < 1e-6
    ta, tb = m.summarize(full), m.summarize(s2)
    assert float((ta - tb).abs().max()) < 1e-5
    assert not ta[0].any()  # no events: zero summary
    assert ta[1:].abs().sum(dim=(1, 2)).min() > 0


def test_state_roundtrip_and_version() -> None:
    torch.manual_seed(1)
    m = Summarizer(CFG).eval()
    s = m.extend(VistaState.zeros(CFG, 3), *_events([5, 0, 9]))
    back = VistaState.from_flat(CFG, s.flat(), s.n.numpy(), s.last_ts.numpy())
    assert torch.equal(back.kv, s.kv)
    m2 = Summarizer.from_bytes(m.to_bytes())
    assert m2.version == m.version
    with torch.no_grad():
        m2.seed.add_(1e-3)
    assert m2.version != m.version
    # The summary depends on the history (a different last event changes it).
    item, act, ts, off = _events([5])
    other = item.copy()
    other[-1] += 1
    a = m.summarize(m.extend(VistaState.zeros(CFG, 1), item, act, ts, off))
    b = m.summarize(m.extend(VistaState.zeros(CFG, 1), other, act, ts, off))
    assert float((a - b).abs().max()) > 1e-6


@pytest.mark.parametrize("cuts", [1, 3])
def test_reconstruction_loss_learns_a_pattern(cuts: int) -> None:
    """Users walk a cycle of 50 items: the loss falls below log(50), the best a model that
    knows only which items occur can do, so the summary + decoder learnt the order (with one
    cut per history a step, or several sharing the pass over its events)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lens = [24] * 16
    starts = rng.integers(0, 50, len(lens))
    item = np.concatenate([(s + np.arange(n)) % 50 for s, n in zip(starts, lens, strict=True)])
    act = np.zeros(len(item), np.int64)
    ts = np.concatenate([np.arange(n) * 60_000_000 for n in lens])
    off = np.concatenate([[0], np.cumsum(lens)])
    batch = pad_events(item, act, ts, off, 24)
    m = Summarizer(CFG)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    first = last = 0.0
    for _ in range(40):
        loss = reconstruction_loss(m, *batch, generator=g, cuts=cuts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
        last = loss.item()
    assert first > np.log(CFG.n_items) - 1.0
    assert last < np.log(50) - 1.0, (first, last)


def test_ranker_candidates_are_independent() -> None:
    torch.manual_seed(0)
    r = TargetAttentionRanker(RankerConfig(n_items=100, d=16, summary_d=16, tail_len=4))
    summ = torch.randn(2, 4, 16)
    sm = torch.tensor([True, False])
    tail = torch.randint(0, 100, (2, 4))
    tm = torch.tensor([[True] * 4, [False, False, True, True]])
    all_scores = r(summ, sm, tail, tm, torch.arange(100))
    some = r(summ, sm, tail, tm, torch.tensor([[5, 7], [9, 3]]))
    assert torch.allclose(all_scores[0, [5, 7]], some[0])
    assert torch.allclose(all_scores[1, [9, 3]], some[1])
    # A masked summary is not read: changing it changes nothing for request 1.
    other = r(summ + torch.randn_like(summ) * (~sm)[:, None, None], sm, tail, tm,
              torch.arange(100))
    assert torch.allclose(other[1], all_scores[1])
