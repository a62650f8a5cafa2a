"""What the training stages report: reward-model ranking quality against utilities, and loss-curve plots."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from uae_ray.metrics import ndcg_at_k, utility_gains
from uae_ray.training.data import RewardGroup


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (``scipy.stats.spearmanr``, ties averaged); None when either side is constant or has
    < 2 values (undefined there)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} scores but {len(b)} utilities")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def ranking_quality(groups: list[RewardGroup], scores: list[np.ndarray], k: int = 10) -> dict[str, Any]:
    """Mean per-query Spearman(scores, utilities) and NDCG@k (gains max(u, 0)) over ``groups``.

    Args:
        groups: queries with their labeled candidates.
        scores: per group, [n_candidates] scores aligned with ``group.pids``.
    """
    rhos, ndcgs = [], []
    for g, s in zip(groups, scores, strict=True):
        rho = spearman(np.asarray(s), np.asarray(g.utilities))
        if rho is not None:
            rhos.append(rho)
        ranking = [g.pids[i] for i in np.argsort(-np.asarray(s), kind="stable")]
        gains = utility_gains(dict(zip(g.pids, g.utilities, strict=True)))
        if any(v > 0 for v in gains.values()):
            ndcgs.append(ndcg_at_k(ranking, gains, k))
    return {
        "queries": len(groups),
        "spearman": float(np.mean(rhos)) if rhos else None,
        "spearman_queries": len(rhos),
        f"ndcg@{k}": float(np.mean(ndcgs)) if ndcgs else None,
        "ndcg_queries": len(ndcgs),
    }


def loss_curve_png(history: list[dict[str, float]], title: str, resumed_from: list[int] | None = None) -> bytes:
    """A PNG of loss per step (raw and a moving average), with vertical lines where training resumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.35, label="loss")
    if len(loss) >= 5:
        w = max(2, len(loss) // 20)
        ax.plot(steps[w - 1 :], np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"moving avg ({w})")
    for s in resumed_from or []:
        ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pool_scores(groups: list[RewardGroup], candidates: Any, column: str = "base_score") -> tuple[list[RewardGroup],
                                                                                                 list[np.ndarray]]:
    """Groups restricted to candidates present in ``candidates`` (a table with qid, pid, ``column``), and their scores
    (e.g. the base encoder's cosine, as the baseline the reward model should beat)."""
    d = candidates.select(["qid", "pid", column]).to_pydict()
    lookup = {(q, p): float(s) for q, p, s in zip(d["qid"], d["pid"], d[column], strict=True)}
    out_groups, out_scores = [], []
    for g in groups:
        keep = [i for i, p in enumerate(g.pids) if (g.qid, p) in lookup]
        if len(keep) < 2:
            continue
        sub = RewardGroup(g.qid, g.doc_id, g.split, g.question, [g.pids[i] for i in keep],
                          [g.passages[i] for i in keep], [g.utilities[i] for i in keep])
        out_groups.append(sub)
        out_scores.append(np.array([lookup[(g.qid, p)] for p in sub.pids]))
    return out_groups, out_scores
