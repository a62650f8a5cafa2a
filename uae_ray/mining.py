"""Candidate pools: top-K passages per query by inner product of unit vectors (FAISS), gold always included.

Scope:

- ``document``: a query's pool comes from its own document's passages (QASPER: the paper's paragraphs).
- ``corpus``: the pool comes from the whole corpus, restricted to documents of the query's split (so training pools
  never hold evaluation passages); passages of documents without queries are open to every split.
- ``auto``: ``document`` when the median document has more than one passage, else ``corpus`` (SQuAD/MRQA).

Gold passages are in the pools of the splits the config's ``insert_gold`` names (all, by default): each missing gold
replaces the lowest-ranked non-gold candidate, and the pool is re-sorted by score, so ``rank`` is the position by score
(a gold below every other candidate ranks last). Other splits' pools are exactly what the encoder retrieved (``is_gold``
still marks golds that happen to be in them).

Answer-aware mining (``answer_passages`` N > 0, the splits of ``answer_splits``): the top N passages of the
query's search scope by BM25 of its answer strings join the pool when the encoder missed them, ranked among it by their
base cosine (the pool grows to at most K + N). No passage annotation is read: the answer points at passages the
generator then labels.

Re-mining with the reward model (``reward_weight`` w > 0): the candidate set is the dense top-2K plus the previous
pool; both the base cosine and the teacher score are z-scored within the query's set, a candidate without a teacher
score gets the query's lowest teacher z, and the pool is the top K of ``(1 - w) z_base + w z_teacher``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from uae_ray.data.schema import CANDIDATES_SCHEMA


@dataclass(frozen=True)
class Pool:
    """One query's pool: passage row indices into the corpus and their ranking scores, best first."""

    rows: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k]


def decide_scope(doc_ids: Sequence[str], scope: str) -> str:
    """``document`` or ``corpus`` for ``scope`` (``auto``: by the median number of passages per document)."""
    if scope in ("document", "corpus"):
        return scope
    if scope != "auto":
        raise ValueError(f"unknown scope {scope!r}: use auto, document or corpus")
    _, counts = np.unique(np.asarray(doc_ids, dtype=object), return_counts=True)
    return "document" if len(counts) and float(np.median(counts)) > 1 else "corpus"


def search_ip(passages: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with FAISS (``IndexFlatIP``).

    Args:
        passages: float32 [n, d] unit vectors.
        queries: float32 [m, d] unit vectors.
        k: results per query (capped at n).

    Returns:
        (scores [m, k'], row indices [m, k']) with k' = min(k, n), best first.
    """
    import faiss

    k = min(k, passages.shape[0])
    if k == 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    index = faiss.IndexFlatIP(passages.shape[1])
    index.add(np.ascontiguousarray(passages, dtype=np.float32))
    scores, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, idx.astype(np.int64)


def ensure_gold(pool: Pool, gold_rows: Sequence[int], gold_scores: Sequence[float]) -> Pool:
    """``pool`` with every gold row in it: each missing gold replaces the lowest-ranked non-gold; re-sorted by score.

    A pool smaller than the number of golds grows to hold them all.
    """
    gold = [int(g) for g in gold_rows]
    have = set(pool.rows.tolist())
    missing = [(g, s) for g, s in zip(gold, gold_scores, strict=True) if g not in have]
    if not missing:
        return pool
    gold_set = set(gold)
    rows, scores = pool.rows.tolist(), pool.scores.tolist()
    for g, s in missing:
        victim = next((i for i in range(len(rows) - 1, -1, -1) if rows[i] not in gold_set), None)
        if victim is None:
            rows.append(g)
            scores.append(float(s))
        else:
            rows[victim], scores[victim] = g, float(s)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return Pool(np.asarray(rows, np.int64)[order], np.asarray(scores, np.float32)[order])


def answer_bm25_top(texts: Sequence[str], answer_queries: Sequence[str], k: int) -> list[list[int]]:
    """Indices into ``texts`` of each answer query's top ``k`` by BM25 (``bm25s``, English stopwords), best first.

    Only passages sharing at least one answer term (BM25 score > 0) are returned, so an answer whose words are in no
    passage gets ``[]``, as does an empty query.

    Args:
        texts: the passages searched (one query's document, or its split of the corpus).
        answer_queries: one string per query: its answer strings joined by spaces ("" for none).
        k: passages per query.
    """
    import bm25s

    if k <= 0 or not texts:
        return [[] for _ in answer_queries]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)
    out: list[list[int]] = []
    for query in answer_queries:
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0] if query else []
        if not tokens:
            out.append([])
            continue
        scores = np.asarray(retriever.get_scores(tokens), np.float64)
        order = np.argsort(-scores, kind="stable")[:k]
        out.append([int(i) for i in order if scores[i] > 0])
    return out


def add_to_pool(pool: Pool, rows: Sequence[int], scores: Sequence[float]) -> Pool:
    """``pool`` plus the ``rows`` it lacks (with their ranking ``scores``), re-sorted by score; the pool grows."""
    have = set(pool.rows.tolist())
    extra = [(int(r), float(s)) for r, s in zip(rows, scores, strict=True) if int(r) not in have]
    if not extra:
        return pool
    all_rows = np.concatenate([pool.rows, np.asarray([r for r, _ in extra], np.int64)])
    all_scores = np.concatenate([pool.scores.astype(np.float64), np.asarray([s for _, s in extra], np.float64)])
    order = np.argsort(-all_scores, kind="stable")
    return Pool(all_rows[order].astype(np.int64), all_scores[order].astype(np.float32))


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over one query's candidates (0 where the std is 0)."""
    x = np.asarray(x, np.float64)
    std = x.std()
    return np.zeros_like(x) if std == 0 or not np.isfinite(std) else (x - x.mean()) / std


def mix_reward(
    rows: np.ndarray, base: np.ndarray, teacher: dict[int, float], weight: float, k: int
) -> Pool:
    """Top ``k`` of ``(1-w) z(base) + w z(teacher)`` over one query's candidate set (scores are the mixed value).

    Args:
        rows: candidate row indices [c].
        base: their base cosines [c].
        teacher: row -> teacher score for the candidates that have one.
        weight: w in [0, 1].
        k: pool size.
    """
    zb = zscore(base)
    have = np.array([r in teacher for r in rows.tolist()])
    zt = np.zeros(len(rows), np.float64)
    if have.any():
        t = np.array([teacher[r] for r in rows[have].tolist()], np.float64)
        zt[have] = zscore(t)
        zt[~have] = zt[have].min()
    mixed = (1.0 - weight) * zb + weight * zt
    order = np.argsort(-mixed, kind="stable")[:k]
    return Pool(rows[order].astype(np.int64), mixed[order].astype(np.float32))


def pools_to_table(
    qids: Sequence[str], pools: Sequence[Pool], pids: Sequence[str], cosine: Sequence[np.ndarray],
    gold: Sequence[set[int]],
) -> pa.Table:
    """``candidates.parquet`` rows: (qid, pid, rank, base_score = cosine, is_gold) for every pool."""
    out_q: list[str] = []
    out_p: list[str] = []
    rank: list[int] = []
    base: list[float] = []
    is_gold: list[bool] = []
    for qid, pool, cos, g in zip(qids, pools, cosine, gold, strict=True):
        for r, row in enumerate(pool.rows.tolist()):
            out_q.append(qid)
            out_p.append(pids[row])
            rank.append(r)
            base.append(float(cos[r]))
            is_gold.append(row in g)
    return pa.Table.from_pydict(
        {"qid": out_q, "pid": out_p, "rank": rank, "base_score": base, "is_gold": is_gold}, schema=CANDIDATES_SCHEMA
    )
