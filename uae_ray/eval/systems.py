"""The retrieval systems compared by ``uae-ray evaluate``: BM25, dense encoders, and re-rankers of the base top-K.

Every system ranks corpus rows (indices into :class:`Corpus`) for one question, over either a candidate set (the pool
setting: the query's candidate pool; document-scoped open retrieval: the query's document) or the whole corpus
(``candidates=None``: open retrieval, through the FAISS index where one is given). One call = one query, so the
per-query latency measured around it is what a user waits (query encoding and search included; corpus vectors are
computed once beforehand, as an index would hold them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa


@dataclass
class Corpus:
    """Passages of the run, with per-document membership.

    Attributes:
        pids, texts, doc_ids: one entry per passage (row order of corpus.parquet).
        row_of: pid -> row.
        doc_rows: doc_id -> int64 array of rows.
    """

    pids: list[str]
    texts: list[str]
    doc_ids: list[str]
    row_of: dict[str, int] = field(default_factory=dict)
    doc_rows: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: pa.Table) -> Corpus:
        """From a corpus.parquet table (columns pid, doc_id, text)."""
        pids = [str(p) for p in table.column("pid").to_pylist()]
        docs = [str(d) for d in table.column("doc_id").to_pylist()]
        by_doc: dict[str, list[int]] = {}
        for i, d in enumerate(docs):
            by_doc.setdefault(d, []).append(i)
        return cls(pids=pids, texts=[str(t) for t in table.column("text").to_pylist()], doc_ids=docs,
                   row_of={p: i for i, p in enumerate(pids)},
                   doc_rows={d: np.asarray(r, dtype=np.int64) for d, r in by_doc.items()})

    def rows(self, pids: Sequence[str]) -> np.ndarray:
        """Rows of ``pids``; an unknown pid is an error naming it."""
        missing = [p for p in pids if p not in self.row_of]
        if missing:
            raise KeyError(f"pids not in corpus.parquet: {missing[:5]}")
        return np.asarray([self.row_of[p] for p in pids], dtype=np.int64)


class System(Protocol):
    """A retrieval system: ranks corpus rows for one question."""

    name: str

    def rank(self, question: str, candidates: np.ndarray | None, k: int) -> list[int]:
        """Top ``k`` corpus rows for ``question`` among ``candidates`` (None: the whole corpus), best first."""
        ...


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> list[int]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(rows[i]) for i in order]


class BM25System:
    """BM25 (``bm25s``) over the whole corpus; candidate sets are ranked by their corpus-wide BM25 scores."""

    def __init__(self, corpus: Corpus, name: str = "bm25") -> None:
        import bm25s

        self.name = name
        self._bm25s = bm25s
        self.n = len(corpus.pids)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(corpus.texts, stopwords="en", show_progress=False), show_progress=False)

    def rank(self, question: str, candidates: np.ndarray | None, k: int) -> list[int]:
        q = self._bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
        scores = self.retriever.get_scores(q) if q else np.zeros(self.n, dtype=np.float32)
        rows = np.arange(self.n) if candidates is None else candidates
        return _top(np.asarray(scores)[rows], rows, k)


class DenseSystem:
    """A bi-encoder: query encoded per call; exact inner product over candidates, or the FAISS index for the corpus.

    Args:
        name: system name in the report.
        model: a SentenceTransformer.
        corpus_vectors: float32 [n_passages, d] unit vectors of the same encoder (corpus row order).
        index: a :class:`~uae_ray.index.search.ShardedIndex` of this encoder, used for ``candidates=None``.
        corpus: needed with ``index`` (pid -> row).
        query_encoder: encodes the queries instead of ``model`` (a :mod:`uae_ray.models.fast_encoder` backend).
    """

    def __init__(self, name: str, model: Any, corpus_vectors: np.ndarray, *, index: Any | None = None,
                 corpus: Corpus | None = None, max_query_length: int = 64, query_encoder: Any | None = None) -> None:
        self.name = name
        self.model = model
        self.query_encoder = query_encoder
        self.vectors = corpus_vectors
        self.index = index
        self.corpus = corpus
        self.max_query_length = max_query_length
        if index is not None and corpus is None:
            raise ValueError("DenseSystem with an index needs the corpus (pid -> row)")

    def encode_query(self, question: str) -> np.ndarray:
        from uae_ray.models.encoder import encode

        if self.query_encoder is not None:
            return self.query_encoder.encode([question], batch_size=1, max_length=self.max_query_length)[0]
        return encode(self.model, [question], batch_size=1, max_length=self.max_query_length)[0]

    def rank(self, question: str, candidates: np.ndarray | None, k: int) -> list[int]:
        q = self.encode_query(question)
        if candidates is None and self.index is not None and self.corpus is not None:
            _, pids = self.index.search(q[None, :], k)
            return [int(r) for r in self.corpus.rows(pids[0])]
        rows = np.arange(len(self.vectors)) if candidates is None else candidates
        return _top(self.vectors[rows] @ q, rows, k)


class Reranker(Protocol):
    """Orders passages for a question: indices into ``passages``, best first."""

    def rerank(self, question: str, passages: list[str]) -> list[int]: ...


class RewardReranker:
    """The reward model r(q, d) as a cross-encoder re-ranker."""

    def __init__(self, model: Any, *, max_length: int = 256, batch_size: int = 32) -> None:
        self.model = model  # a CrossEncoder (uae_ray.models.reward.load_reward_model)
        self.max_length = max_length
        self.batch_size = batch_size

    def rerank(self, question: str, passages: list[str]) -> list[int]:
        from uae_ray.models.reward import score_pairs

        s = score_pairs(self.model, [question] * len(passages), passages, max_length=self.max_length,
                        batch_size=self.batch_size)
        return [int(i) for i in np.argsort(-s, kind="stable")]


class RerankSystem:
    """A re-ranker over the first stage's top ``top_k``; rows past ``top_k`` keep the first stage's order.

    Re-rankers are deterministic (scores, greedy decoding), so a (question, first-stage top K) seen before, e.g. in the
    pool setting when the open setting's base top K is the same list, is not re-ranked again: its order is reused and
    its measured re-ranking time is charged to the query again (:meth:`pop_replayed_seconds`), so latencies stay those
    of a real re-ranking."""

    def __init__(self, name: str, first: System, reranker: Reranker, corpus: Corpus, top_k: int) -> None:
        self.name = name
        self.first = first
        self.reranker = reranker
        self.corpus = corpus
        self.top_k = top_k
        self._seen: dict[tuple[str, tuple[int, ...]], tuple[list[int], float]] = {}
        self._replayed_s = 0.0

    def rank(self, question: str, candidates: np.ndarray | None, k: int) -> list[int]:
        base = self.first.rank(question, candidates, max(k, self.top_k))
        head = base[: self.top_k]
        key = (question, tuple(head))
        if key in self._seen:
            order, seconds = self._seen[key]
            self._replayed_s += seconds
        else:
            t0 = time.perf_counter()
            order = self.reranker.rerank(question, [self.corpus.texts[r] for r in head])
            self._seen[key] = (order, time.perf_counter() - t0)
        return ([head[i] for i in order] + base[self.top_k :])[:k]

    def pop_replayed_seconds(self) -> float:
        """Re-ranking seconds of the orders reused since the last call (0.0 when every query was re-ranked)."""
        seconds, self._replayed_s = self._replayed_s, 0.0
        return seconds


# ----------------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class QueryTask:
    """One query to rank: its text and candidate rows (None: whole corpus)."""

    qid: str
    question: str
    candidates: np.ndarray | None


def run_system(system: System, tasks: Sequence[QueryTask], corpus: Corpus, *, k: int,
               progress: Callable[[int], None] | None = None) -> pa.Table:
    """Rank every task with ``system``, timing each query on its own (a re-ranking reused by a
    :class:`RerankSystem` is charged its measured time, so ``latency_s`` is always what the query costs).

    Returns:
        table (qid, pids list<str> top-k best first, latency_s float64, reused bool: the re-ranker's order came
        from an identical earlier (question, top K)).
    """
    qids, rankings, latency, reused = [], [], [], []
    replay = getattr(system, "pop_replayed_seconds", None)
    for task in tasks:
        t0 = time.perf_counter()
        rows = system.rank(task.question, task.candidates, k)
        elapsed = time.perf_counter() - t0
        replayed = replay() if replay is not None else 0.0
        latency.append(elapsed + replayed)
        reused.append(replayed > 0)
        qids.append(task.qid)
        rankings.append([corpus.pids[r] for r in rows])
        if progress is not None:
            progress(1)
    return pa.table({"qid": pa.array(qids, pa.string()), "pids": pa.array(rankings, pa.list_(pa.string())),
                     "latency_s": pa.array(latency, pa.float64()), "reused": pa.array(reused, pa.bool_())})
