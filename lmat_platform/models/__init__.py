"""Torch models trained through the reader, and their evaluation.

* :mod:`~lmat_platform.models.evaluate`: the leave-one-out split by time, full-ranking HR@K and
  NDCG@K (with and without seen-item filtering), the most-popular baseline.
* :mod:`~lmat_platform.models.sasrec`: the next-item recommender (a SASRec-style causal
  transformer, full-softmax cross-entropy over the catalogue).
"""

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

__all__ = [
    "TEST",
    "TRAIN",
    "VALID",
    "RankingAccumulator",
    "hr_ndcg_at_k",
    "leave_one_out_split",
    "most_popular_scores",
    "seen_mask",
    "target_ranks",
]
