"""The evaluation protocol (split, ranks, HR/NDCG) on hand-made cases, and the model's shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmat_platform.models.evaluate import (
    TEST,
    TRAIN,
    VALID,
    RankingAccumulator,
    hr_ndcg_at_k,
    leave_one_out_split,
    most_popular_scores,
    seen_mask,
    target_ranks,
)

NEG = -math.inf


def test_split_last_is_test_previous_is_valid_ties_by_event_id() -> None:
    # user 7: ts 5 (id 1), ts 9 (id 3), ts 9 (id 2), ts 1 (id 4); user 8: two ratings; 9: one.
    user = np.array([7, 7, 7, 7, 8, 8, 9])
    ts = np.array([5, 9, 9, 1, 3, 2, 4])
    eid = np.array([1, 3, 2, 4, 5, 6, 7])
    got = leave_one_out_split(user, ts, eid)
    # user 7 ordered: (1,4) (5,1) (9,2) (9,3): id 3 is test, id 2 valid, the rest train.
    assert got.tolist() == [TRAIN, TEST, VALID, TRAIN, TEST, VALID, TEST]


def test_split_rejects_ragged_input() -> None:
    with pytest.raises(ValueError, match="one length"):
        leave_one_out_split(np.array([1, 2]), np.array([1]), np.array([1, 2]))


def test_ranks_count_ties_against_the_target() -> None:
    scores = torch.tensor([[NEG, 0.9, 0.5, 0.7], [NEG, 1.0, 1.0, 1.0], [NEG, 0.1, 0.2, 0.3]])
    targets = torch.tensor([2, 1, 3])
    assert target_ranks(scores, targets).tolist() == [2, 2, 0]


def test_hr_ndcg_hand_computed() -> None:
    scores = torch.tensor([[NEG, 0.9, 0.5, 0.7], [NEG, 0.1, 0.2, 0.3]])
    targets = torch.tensor([2, 3])
    # ranks 2 and 0
    r = hr_ndcg_at_k(scores, targets, k=2)
    assert r["hr@2"] == pytest.approx(0.5)
    assert r["ndcg@2"] == pytest.approx(0.5 * 1.0)
    r = hr_ndcg_at_k(scores, targets, k=3)
    assert r["hr@3"] == pytest.approx(1.0)
    assert r["ndcg@3"] == pytest.approx(0.5 * (1 / math.log2(4) + 1.0))


def test_seen_filter_removes_history_but_never_the_target() -> None:
    scores = torch.tensor([[NEG, 0.9, 0.5, 0.7]])
    # history holds items 1 and 2 (the target): only item 1 is removed.
    seen = seen_mask(torch.tensor([1, 2]), torch.tensor([2]), 4)
    assert seen.tolist() == [[False, True, True, False]]
    assert target_ranks(scores, torch.tensor([2]), seen=seen).tolist() == [1]
    acc = RankingAccumulator(ks=(2,))
    acc.update(scores, torch.tensor([2]), seen=seen)
    r = acc.result()
    assert r["hr@2"] == 0.0 and r["hr@2_filtered"] == 1.0
    assert r["ndcg@2_filtered"] == pytest.approx(1 / math.log2(3))


def test_accumulator_figures_do_not_depend_on_the_batching() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 40, generator=gen)
    scores[:, 0] = NEG
    targets = torch.randint(1, 40, (300,), generator=gen)
    seen = torch.rand(300, 40, generator=gen) < 0.3
    whole, single = RankingAccumulator(ks=(5, 40)), RankingAccumulator(ks=(5, 40))
    whole.update(scores, targets, seen=seen)
    for i in range(300):
        single.update(scores[i:i + 1], targets[i:i + 1], seen=seen[i:i + 1])
    assert whole.result() == single.result()  # equal to the last bit, not approximately
    ranks = target_ranks(scores, targets).to(torch.float64)
    assert whole.result()["ndcg@40"] == pytest.approx(float((1 / torch.log2(ranks + 2)).mean()))


def test_accumulator_averages_over_batches() -> None:
    acc = RankingAccumulator(ks=(1, 10))
    acc.update(torch.tensor([[NEG, 2.0, 1.0]]), torch.tensor([1]))
    acc.update(torch.tensor([[NEG, 2.0, 1.0], [NEG, 2.0, 1.0]]), torch.tensor([2, 2]))
    r = acc.result()
    assert r["n"] == 3
    assert r["hr@1"] == pytest.approx(1 / 3)
    assert r["hr@10"] == pytest.approx(1.0)
    assert r["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / 3)
    assert "hr@1_filtered" not in r


def test_seen_mask_jagged_layout() -> None:
    m = seen_mask(torch.tensor([3, 1, 1, 2]), torch.tensor([1, 0, 3]), 4)
    assert m.tolist() == [
        [False, False, False, True],
        [False, False, False, False],
        [False, True, True, False],
    ]


def test_most_popular_scores() -> None:
    s = most_popular_scores(np.array([2, 2, 3, 1, 2]), 5)
    assert s[0] == NEG
    assert s[1:].tolist() == [1.0, 3.0, 1.0, 0.0]
    # As a ranker: item 2 first, then 1 and 3 tied.
    r = target_ranks(s.expand(2, -1), torch.tensor([2, 3]))
    assert r.tolist() == [0, 2]


def test_target_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="targets must lie"):
        target_ranks(torch.zeros(1, 3), torch.tensor([3]))


def test_beats_baseline_fails_at_or_below_the_baseline() -> None:
    from lmat_platform.models.evaluate import beats_baseline

    assert beats_baseline({"hr@10": 0.13}, {"hr@10": 0.05})[0]
    ok, msg = beats_baseline({"hr@10": 0.05}, {"hr@10": 0.05})
    assert not ok and "not above" in msg
    assert not beats_baseline({"hr@10": 0.01}, {"hr@10": 0.05})[0]


@pytest.mark.parametrize("block", ["sasrec", "hstu"])
def test_model_reads_the_newest_items_right_aligned(block: str) -> None:
    from lmat_platform.models.sasrec import SASRec, SASRecConfig, left_pad

    t = left_pad(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([4, 0, 1]), max_len=3, bos=9)
    assert t.tolist() == [[2, 3, 4], [0, 0, 9], [0, 0, 5]]
    net = SASRec(SASRecConfig(n_items=8, max_len=3, d_model=8, n_layers=1,
                              block=block)).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # weights large enough for padding leaks to show
        for p in net.parameters():
            p.normal_(0, 0.5)
    s = net.scores(t)
    assert s.shape == (3, 9) and torch.isinf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()
    # Causal and padding-blind: a history's state does not depend on the padding width.
    wide = left_pad(torch.tensor([5, 1, 2, 3]), torch.tensor([1, 3]), max_len=3, bos=9)
    assert wide[0].tolist() == [0, 0, 5]
    narrow = torch.tensor([[5]])
    assert torch.allclose(net.scores(wide)[:1], net.scores(narrow), atol=1e-5)
    loss, n = net.loss(t, torch.tensor([5, 6, 7]), positions="all")
    assert n == 3 + 1 + 1 and torch.isfinite(loss)  # 2 inner targets + label, BOS, label
    assert net.loss(t, torch.tensor([5, 6, 7]), positions="last")[1] == 3


def _naive_visible_loss(net, tokens, arrivals, labels, window_targets=None):
    """Each target read at the newest column whose items all arrived before it, by hand."""
    h = net.encode(tokens, all_positions=True)
    states, targets, seen = [], [], []
    for b in range(tokens.shape[0]):
        s = tokens.shape[1]
        cols = [c for c in range(s) if 0 < int(tokens[b, c]) <= net.cfg.n_items]
        slots = [(c, int(tokens[b, c])) for c in cols[1:]] + [(s, int(labels[b]))]
        if window_targets is not None:
            slots = [(c, t) for c, t in slots if c >= s + 1 - int(window_targets[b])]
        for c, t in slots:
            if c == s:
                q = s - 1
            else:
                before = [j for j in cols if j < c and all(
                    int(arrivals[b, i]) < int(arrivals[b, c]) for i in cols if i <= j)]
                if not before:
                    continue
                q = max(before)
            states.append(h[b, q])
            targets.append(t)
            seen.append([int(tokens[b, j]) for j in range(q + 1)])
    logits = net.items.weight[: net.cfg.n_items + 1] @ torch.stack(states).T
    logits = logits.T.clone()
    if net.repeat is not None:  # items among the columns the state has read
        for k, its in enumerate(seen):
            for i in set(its) - {0, net.cfg.n_items + 1}:
                logits[k, i] += net.repeat
    logits[:, 0] = -math.inf
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets)), len(targets)


@pytest.mark.parametrize("repeat", [False, True])
def test_visible_loss_reads_each_target_at_its_own_h_u_t(repeat: bool) -> None:
    from lmat_platform.models.sasrec import SASRec, SASRecConfig, left_pad, right_align

    torch.manual_seed(0)
    net = SASRec(SASRecConfig(n_items=8, max_len=4, d_model=8, n_layers=1, dropout=0.0,
                              repeat=repeat)).eval()
    if repeat:
        with torch.no_grad():
            net.repeat.fill_(-1.5)
    items = torch.tensor([1, 2, 3, 4, 8, 5, 6, 7, 2, 3])
    arr = torch.tensor([10, 20, 20, 30, 1, 5, 7, 4, 4, 9])
    lengths = torch.tensor([4, 3, 0, 3])  # row 3: its first two items share a second
    tokens = left_pad(items, lengths, max_len=4, bos=9)
    a = right_align(arr, lengths, max_len=4, fill=-(2**62))
    assert a[1].tolist() == [-(2**62), 1, 5, 7] and tokens[2].tolist() == [0, 0, 0, 9]
    labels = torch.tensor([7, 8, 1, 4])
    with torch.no_grad():
        for wt in (None, torch.tensor([2, 1, 3, 4])):
            got, n = net.loss(tokens, labels, arrivals=a, window_targets=wt)
            want, m = _naive_visible_loss(net, tokens, a, labels, wt)
            assert n == m and torch.allclose(got, want, atol=1e-6)
        # Rows 0 and 3 lose what a same-second neighbour would have shown: 3 is read at
        # column 0 (not 1) in row 0, row 3's second item has no visible state in the window.
        assert net.loss(tokens, labels, arrivals=a)[1] == 4 + 3 + 1 + 2
        assert net.loss(tokens, labels)[1] == 4 + 3 + 1 + 3


def test_repeat_offset_moves_only_the_items_in_the_window() -> None:
    from lmat_platform.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    cfg = dict(n_items=20, max_len=6, d_model=8, n_layers=1, dropout=0.0)
    net = SASRec(SASRecConfig(**cfg, repeat=True)).eval()
    plain = SASRec(SASRecConfig(**cfg)).eval()
    state = net.state_dict()
    assert float(state.pop("repeat")) == 0.0  # learned from 0: no prior on repeats
    plain.load_state_dict(state)  # a model saved without the offset has the same weights
    with torch.no_grad():
        net.repeat.fill_(-2.0)
        tokens = torch.tensor([[0, 0, 3, 5, 3, 7], [1, 2, 4, 6, 8, 9], [0, 0, 0, 0, 0, 21]])
        diff = net.scores(tokens)[:, 1:] - plain.scores(tokens)[:, 1:]
    want = torch.zeros(3, 20)
    for r, its in enumerate(([3, 5, 7], [1, 2, 4, 6, 8, 9], [])):  # 21 is BOS, 0 padding
        want[r, [i - 1 for i in its]] = -2.0
    assert torch.allclose(diff, want, atol=1e-5)
    # training moves it: a window whose label repeats an item in it pulls the offset up
    net.train()
    loss, _ = net.loss(tokens[:1], torch.tensor([5]), positions="last")
    loss.backward()
    assert net.repeat.grad is not None and float(net.repeat.grad) < 0
