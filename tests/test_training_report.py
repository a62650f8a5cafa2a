"""The training report's ranking quality: Spearman (scipy) against utilities, by hand on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uae_ray.training.data import RewardGroup
from uae_ray.training.report import ranking_quality, spearman


def test_spearman_by_hand_with_ties_and_undefined_cases():
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(-1.0)
    # ties averaged: ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4) -> Pearson = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(3 / math.sqrt(10))
    assert spearman(np.array([1.0]), np.array([2.0])) is None
    assert spearman(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) is None
    with pytest.raises(ValueError, match="3 scores but 2 utilities"):
        spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0]))


def test_ranking_quality_means_over_queries_and_counts_undefined_ones():
    def group(qid: str, utilities: list[float]) -> RewardGroup:
        pids = [f"{qid}-p{i}" for i in range(len(utilities))]
        return RewardGroup(qid, "d", "dev", "q?", pids, ["text"] * len(pids), utilities)

    groups = [group("a", [2.0, 1.0, 0.0]), group("b", [0.0, 1.0, 2.0]), group("c", [1.0, 1.0, 1.0])]
    scores = [np.array([3.0, 2.0, 1.0]), np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])]
    q = ranking_quality(groups, scores, k=3)
    assert q["queries"] == 3
    assert q["spearman_queries"] == 2 and q["spearman"] == pytest.approx(0.0)  # (+1 + -1) / 2; "c" is constant
    # nDCG@3 with linear gains: "a" and "c" are ideal; "b" ranks gains (0, 1, 2) against the ideal (2, 1, 0)
    b = (1 / math.log2(3) + 2 / 2) / (2 + 1 / math.log2(3))
    assert q["ndcg_queries"] == 3 and q["ndcg@3"] == pytest.approx((1.0 + b + 1.0) / 3)
