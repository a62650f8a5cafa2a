"""Retrieval and generation metrics: pure, typed functions of rankings, labels and strings.

A *ranking* is a list of passage ids, best first. *Gold* is the set of gold passage ids of a query. *Gains* map a
passage id to a graded relevance (here: the generator utility u(q, d), clipped at 0). Every function handles one
query; :func:`mean` averages per-query values (the report's numbers are means over queries).
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np


# ------------------------------------------------------------------------------------------------------ retrieval
def recall_at_k(ranking: Sequence[str], gold: Collection[str], k: int) -> float:
    """1.0 when a gold passage is among the top ``k`` of ``ranking`` (the paper's Recall@k), else 0.0."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return 1.0 if any(pid in gold for pid in ranking[:k]) else 0.0


def reciprocal_rank(ranking: Sequence[str], gold: Collection[str]) -> float:
    """1 / (1-based rank of the first gold passage); 0.0 when no gold passage was retrieved."""
    for i, pid in enumerate(ranking):
        if pid in gold:
            return 1.0 / (i + 1)
    return 0.0


def average_precision(ranking: Sequence[str], gold: Collection[str]) -> float:
    """Average precision: mean over *all* gold passages of precision at each gold passage's rank.

    Gold passages that were not retrieved count as precision 0, so the denominator is ``len(gold)``.
    """
    if not gold:
        return 0.0
    hits = 0
    total = 0.0
    for i, pid in enumerate(ranking):
        if pid in gold:
            hits += 1
            total += hits / (i + 1)
    return total / len(gold)


def dcg(gains_in_rank_order: Sequence[float]) -> float:
    """Discounted cumulative gain with linear gains: sum_i g_i / log2(i + 2) (i 0-based)."""
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains_in_rank_order)))


def ndcg_at_k(ranking: Sequence[str], gains: Mapping[str, float], k: int = 10) -> float:
    """nDCG@k with graded gains (passages absent from ``gains`` have gain 0; negative gains count as 0).

    The ideal ranking sorts every passage in ``gains`` by gain, so a retriever that misses a useful passage that
    exists is penalised. Returns 0.0 when no passage has a positive gain.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    g = {pid: max(float(v), 0.0) for pid, v in gains.items()}
    ideal = dcg(sorted(g.values(), reverse=True)[:k])
    if ideal <= 0.0:
        return 0.0
    return dcg([g.get(pid, 0.0) for pid in ranking[:k]]) / ideal


def binary_gains(gold: Collection[str]) -> dict[str, float]:
    """Gains of 1.0 for each gold passage: nDCG's fallback where no utility labels exist."""
    return {pid: 1.0 for pid in gold}


def utility_gains(utilities: Mapping[str, float]) -> dict[str, float]:
    """Gains from utilities u(q, d): max(u, 0), so passages that hurt the generator count as irrelevant."""
    return {pid: max(float(u), 0.0) for pid, u in utilities.items()}


def exp_util_at_k(ranking: Sequence[str], utilities: Mapping[str, float], k: int) -> float:
    """ExpUtil@k: mean utility u(q, d) of the top ``k`` passages of ``ranking``.

    Every top-k passage must be labeled (label missing pairs on demand first); a missing one is an error naming it.
    Rankings shorter than ``k`` average over what they have.
    """
    top = list(ranking[:k])
    if not top:
        return 0.0
    missing = [pid for pid in top if pid not in utilities]
    if missing:
        raise KeyError(f"ExpUtil@{k}: no utility label for passages {missing[:5]} (label them on demand first)")
    return float(np.mean([utilities[pid] for pid in top]))


# ----------------------------------------------------------------------------------------------------- generation
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, squeeze white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1_one(prediction: str, answer: str) -> float:
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(answer).split()
    if not pred or not gold:
        return 1.0 if pred == gold else 0.0
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 of ``prediction``: the max over the gold ``answers`` (0.0 when there are none)."""
    return max((_f1_one(prediction, a) for a in answers), default=0.0)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    p = normalize_answer(prediction)
    return 1.0 if any(p == normalize_answer(a) for a in answers) else 0.0


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F-measure (``rouge-score``) on SQuAD-normalised text: the max over the gold ``answers``."""
    scorer = _rouge_scorer()
    pred = normalize_answer(prediction)
    best = 0.0
    for a in answers:
        gold = normalize_answer(a)
        if not pred or not gold:
            best = max(best, 1.0 if pred == gold else 0.0)
            continue
        best = max(best, scorer.score(gold, pred)["rougeL"].fmeasure)
    return float(best)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


# ------------------------------------------------------------------------------------------------------ aggregates
def mean(values: Sequence[float]) -> float | None:
    """Mean of per-query values; None for no queries (reported as missing, never as 0)."""
    if len(values) == 0:
        return None
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """Per-query latency in milliseconds: mean, p50, p95 and the number of queries timed."""
    if len(seconds) == 0:
        return {"mean_ms": None, "p50_ms": None, "p95_ms": None, "n": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "n": len(ms),
    }
