"""Paired comparisons of retrieval systems over the same queries, with scipy's resampling statistics.

For two systems A and B measured on the same n queries (per-query values a_i, b_i of one metric), the report gives
the mean difference d = mean(a_i - b_i), a 95% paired-bootstrap interval for it (``scipy.stats.bootstrap``, percentile
method, resampling queries: the pairs stay together) and the two-sided p-value of a paired randomization test
(``scipy.stats.permutation_test`` with ``permutation_type="samples"`` on the differences: each query's sign flipped at
random, Fisher's sign-flip test; exact when 2^n <= the number of resamples). Resampling the differences is the same as
resampling the pairs, at half the work.

Why these: the randomization test compares means, the quantity the report prints (Wilcoxon's signed-rank test drops
the zero differences that dominate a binary Recall@1 and tests a median; the paired t-test assumes normal means at
n ~ 100 and is undefined for identical systems), and it is one of the tests Smucker, Allan and Carterette (CIKM 2007)
recommend for IR. scipy is a declared dependency; ``ranx`` (not installed here) would add numba and computes its own
metrics from qrels, while ExpUtil and Token F1 are ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

COMPARED_METRICS = ("recall@1", "mrr", "map", "exputil@1")
# every system against the base encoder and the gold-only ablation (when present); evaluate: its compare_to
REFERENCES = ("base", "infonce")
CONFIDENCE = 0.95
N_RESAMPLES = 10_000


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                      confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> dict[str, float | int | None]:
    """Mean of ``a - b`` (paired per query), its paired-bootstrap interval and the randomization-test p-value.

    Args:
        a, b: per-query values of one metric for systems A and B, in the same query order (shape [n]).
        confidence: interval level (0.95: a 95% interval).
        n_resamples: bootstrap resamples and random sign-flip permutations.
        seed: seed of both resamplings (the report is reproducible).

    Returns:
        {"n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_value"}; the interval and p are None for n < 2.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values must be 1-d arrays of one length, got {x.shape} and {y.shape}")
    n = int(x.shape[0])
    if n == 0:
        return {"n": 0, "mean_a": None, "mean_b": None, "diff": None, "ci_low": None, "ci_high": None,
                "p_value": None}
    d = x - y
    out: dict[str, float | int | None] = {"n": n, "mean_a": float(x.mean()), "mean_b": float(y.mean()),
                                          "diff": float(d.mean()), "ci_low": None, "ci_high": None, "p_value": None}
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    if np.all(d == d[0]):  # a constant difference: every resample has the same mean (scipy warns, the answer is exact)
        out["ci_low"] = out["ci_high"] = float(d[0])
    else:
        ci = stats.bootstrap((d,), np.mean, vectorized=True, confidence_level=confidence,
                             n_resamples=n_resamples, method="percentile", rng=rng).confidence_interval
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    if np.all(d == 0):
        out["p_value"] = 1.0  # every sign flip gives the same (zero) mean
    else:
        test = stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                                      n_resamples=n_resamples, alternative="two-sided", rng=rng)
        out["p_value"] = float(test.pvalue)
    return out


def compare_systems(per_query: Mapping[str, Mapping[str, Mapping[str, Any]]], *,
                    metrics: Sequence[str] = COMPARED_METRICS, references: Sequence[str] = REFERENCES,
                    confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                    seed: int = 0) -> dict[str, dict[str, dict[str, dict[str, float | int | None]]]]:
    """Every system against each reference system that is present, metric by metric, on their shared queries.

    Args:
        per_query: system -> qid -> metric -> value (None or absent: not measured for that query).
        metrics: metrics compared; references: systems compared against (skipped when absent).

    Returns:
        reference -> system -> metric -> :func:`paired_difference` (queries where both systems have a value).
    """
    out: dict[str, dict[str, dict[str, dict[str, float | int | None]]]] = {}
    for ref in references:
        if ref not in per_query:
            continue
        block: dict[str, dict[str, dict[str, float | int | None]]] = {}
        for name, rows in per_query.items():
            if name == ref:
                continue
            block[name] = {}
            for metric in metrics:
                shared = [q for q, r in rows.items() if r.get(metric) is not None
                          and per_query[ref].get(q, {}).get(metric) is not None]
                block[name][metric] = paired_difference([rows[q][metric] for q in shared],
                                                        [per_query[ref][q][metric] for q in shared],
                                                        confidence=confidence, n_resamples=n_resamples, seed=seed)
        out[ref] = block
    return out


def format_difference(res: Mapping[str, Any], *, scale: float = 100.0, digits: int = 1) -> str:
    """``+12.2 [+8.2, +16.2] p=0.001`` (a difference scaled to points, its interval and p); ``-`` when unmeasured."""
    if res.get("diff") is None:
        return "-"

    def num(v: float) -> str:
        return f"{scale * v:+.{digits}f}"

    text = num(res["diff"])
    if res.get("ci_low") is not None:
        text += f" [{num(res['ci_low'])}, {num(res['ci_high'])}]"
    if res.get("p_value") is not None:
        p = res["p_value"]
        text += f" p={p:.3f}" if p >= 0.001 else " p<0.001"
    return text


def _scale(metric: str) -> tuple[float, int]:
    # retrieval metrics in points (%), utilities in nats
    return (1.0, 3) if metric.lower().startswith("exputil") else (100.0, 1)


def comparisons_markdown(comparisons: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
                         order: Sequence[str] = ()) -> str:
    """A GitHub table: one row per (system, reference), one cell per metric: difference [95% CI] p, with n."""
    metrics = list(dict.fromkeys(m for block in comparisons.values() for ms in block.values() for m in ms))
    if not metrics:
        return ""
    head = ["system", "vs", "n", *[f"Δ {m}" for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ref, block in comparisons.items():
        names = [s for s in order if s in block] + [s for s in block if s not in order]
        for name in names:
            ns = sorted({int(block[name][m]["n"]) for m in metrics if m in block[name]})
            cells = [name, ref, "/".join(str(n) for n in ns)]
            for m in metrics:
                scale, digits = _scale(m)
                cells.append(format_difference(block[name].get(m, {}), scale=scale, digits=digits))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_columns(per_query: Mapping[str, Mapping[str, Mapping[str, Any]]], reference: str,
                     metrics: Sequence[str], *, seed: int = 0) -> dict[str, dict[str, str]]:
    """For a benchmark table: system -> {"Δ<metric> vs <reference>": "+d [lo, hi] p=..."} (the reference: "-").

    ``per_query`` as in :func:`compare_systems` (system -> qid -> metric -> value)."""
    res = compare_systems(per_query, metrics=metrics, references=[reference], seed=seed).get(reference, {})
    out: dict[str, dict[str, str]] = {}
    for name in per_query:
        out[name] = {}
        for m in metrics:
            scale, digits = _scale(m)
            out[name][f"Δ{m} vs {reference}"] = "-" if name == reference else format_difference(
                res[name][m], scale=scale, digits=digits)
    return out


def table_with_intervals(rows: list[dict[str, Any]], name_key: str,
                         metrics: Sequence[str] = ("recall@1", "map", "exputil@1")) -> list[dict[str, Any]]:
    """Benchmark rows (each with a ``per_query`` {qid: {metric: value}} entry, popped here) with one column per
    metric: the paired difference to the first row, its 95% bootstrap interval and p (``bench_train.py`` tables)."""
    per_query = {str(r[name_key]): r.pop("per_query") for r in rows if "per_query" in r}
    if not rows or str(rows[0][name_key]) not in per_query:
        return rows
    cols = interval_columns(per_query, str(rows[0][name_key]), metrics)
    return [{**r, **cols.get(str(r[name_key]), {})} for r in rows]
