"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from uae_ray import metrics as M


def test_recall_at_k_hand_cases():
    ranking = ["a", "b", "c", "d"]
    assert M.recall_at_k(ranking, {"c"}, 1) == 0.0
    assert M.recall_at_k(ranking, {"c"}, 2) == 0.0
    assert M.recall_at_k(ranking, {"c"}, 3) == 1.0
    assert M.recall_at_k(ranking, {"x"}, 10) == 0.0
    assert M.recall_at_k(ranking, {"a", "d"}, 1) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        M.recall_at_k(ranking, {"a"}, 0)


def test_mrr_and_map_hand_cases():
    ranking = ["a", "b", "c", "d", "e"]
    assert M.reciprocal_rank(ranking, {"c", "e"}) == pytest.approx(1 / 3)
    assert M.reciprocal_rank(ranking, {"z"}) == 0.0
    # gold at ranks 2 and 4: precisions 1/2 and 2/4 -> AP = (0.5 + 0.5) / 2
    assert M.average_precision(ranking, {"b", "d"}) == pytest.approx(0.5)
    # gold at rank 1 and one gold not retrieved: (1/1 + 0) / 2
    assert M.average_precision(ranking, {"a", "zz"}) == pytest.approx(0.5)
    assert M.average_precision(ranking, set()) == 0.0


def test_ndcg_graded_hand_case():
    ranking = ["a", "b", "c"]
    gains = {"a": 0.0, "b": 2.0, "c": 1.0, "d": -3.0}
    dcg = 0.0 / math.log2(2) + 2.0 / math.log2(3) + 1.0 / math.log2(4)
    idcg = 2.0 / math.log2(2) + 1.0 / math.log2(3)
    assert M.ndcg_at_k(ranking, gains, 10) == pytest.approx(dcg / idcg)
    assert M.ndcg_at_k(["b", "c"], gains, 10) == pytest.approx(1.0)
    # cut-off: only the first passage counts at k=1
    assert M.ndcg_at_k(ranking, gains, 1) == 0.0
    assert M.ndcg_at_k(ranking, {"a": -1.0}, 10) == 0.0


def test_ndcg_binary_fallback():
    # one gold at rank 2 of 2 gold in total: (1/log2 3) / (1 + 1/log2 3)
    value = M.ndcg_at_k(["x", "g1", "y"], M.binary_gains({"g1", "g2"}), 10)
    assert value == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert M.utility_gains({"a": -1.0, "b": 0.5}) == {"a": 0.0, "b": 0.5}


def test_exp_util_hand_case_and_missing_label():
    util = {"a": 1.0, "b": -0.5, "c": 2.5}
    assert M.exp_util_at_k(["c", "a", "b"], util, 1) == pytest.approx(2.5)
    assert M.exp_util_at_k(["c", "a", "b"], util, 3) == pytest.approx(1.0)
    assert M.exp_util_at_k(["b"], util, 5) == pytest.approx(-0.5)  # shorter ranking: mean of what it has
    with pytest.raises(KeyError, match="no utility label for passages \\['q'\\]"):
        M.exp_util_at_k(["a", "q"], util, 2)


def test_squad_normalisation_and_token_f1():
    assert M.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert M.normalize_answer("An apple, a pear") == "apple pear"
    # pred "blue whale song" vs gold "the blue whale": common {blue, whale}=2, P=2/3, R=2/2 -> F1 = 0.8
    assert M.token_f1("blue whale song", ["the blue whale"]) == pytest.approx(0.8)
    # max over answers
    assert M.token_f1("Paris", ["London", "paris."]) == 1.0
    assert M.token_f1("anything", []) == 0.0
    assert M.exact_match("The Paris", ["paris"]) == 1.0
    assert M.exact_match("Paris France", ["paris"]) == 0.0


def test_rouge_l_hand_case():
    # LCS("w x y z", "w y z v") over tokens: "w y z" = 3 -> P = 3/4, R = 3/4, F = 0.75
    assert M.rouge_l("w x y z", ["w y z v"]) == pytest.approx(0.75)
    assert M.rouge_l("w x y z", ["q", "w y z v"]) == pytest.approx(0.75)  # max over answers
    assert M.rouge_l("", ["w"]) == 0.0


def test_mean_and_latency_summary():
    assert M.mean([]) is None
    assert M.mean([1.0, 0.0, 0.5]) == pytest.approx(0.5)
    lat = M.latency_summary([0.001, 0.002, 0.003])
    assert lat["mean_ms"] == pytest.approx(2.0)
    assert lat["p50_ms"] == pytest.approx(2.0)
    assert lat["n"] == 3
    assert M.latency_summary([])["mean_ms"] is None
