"""``uae-ray mine``: candidate pools of ``pool_size`` passages per query -> candidates.parquet + mine_report.json.

Sequence: corpus and questions encoded by the base encoder on a Ray Data actor pool (``EncodeBatch``, model loaded
once per actor), FAISS inner-product search per document or over the query's split of the corpus
(:mod:`uae_ray.mining`), gold passages ensured, optional reward mix from teacher_scores.parquet. Whether it needs
to run is the pipeline's rule (:func:`uae_ray.stages.pipeline.run_stage`); the report's fingerprint names config
and inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uae_ray.config import MineConfig
from uae_ray.data.schema import CANDIDATES, CORPUS, MINE_REPORT, QUERIES, TEACHER_SCORES
from uae_ray.mining import (
    Pool,
    add_to_pool,
    answer_bm25_top,
    decide_scope,
    ensure_gold,
    mix_reward,
    pools_to_table,
    search_ip,
)
from uae_ray.runtime import RunDir, split_blocks
from uae_ray.training.data import answer_patterns

log = logging.getLogger("uae_ray")


def encode_texts(ids: list[str], texts: list[str], cfg: MineConfig, what: str) -> np.ndarray:
    """Unit vectors [n, d] of ``texts`` in input order, encoded on a Ray Data actor pool of ``EncodeBatch``."""
    import ray

    from uae_ray.models.encoder import EncodeBatch

    if not ids:
        raise ValueError(f"no {what} to encode")
    n_blocks = max(1, min(len(ids) // cfg.pool.batch_size + 1, cfg.pool.max_size * 8))
    ds = ray.data.from_arrow(split_blocks(pa.table({"id": ids, "text": texts}), n_blocks))
    out = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder": cfg.encoder},
        **cfg.pool.map_batches_args(),
        batch_size=cfg.pool.batch_size,
    )
    pos = {k: i for i, k in enumerate(ids)}
    vecs: np.ndarray | None = None
    for batch in out.iter_batches(batch_size=4096, batch_format="numpy"):
        emb = np.asarray(np.stack(list(batch["embedding"])), np.float32)
        if vecs is None:
            vecs = np.zeros((len(ids), emb.shape[1]), np.float32)
        vecs[[pos[str(k)] for k in batch["id"]]] = emb
    assert vecs is not None  # ids is non-empty, so at least one batch came back
    return vecs


def _fingerprint(cfg: MineConfig, run_dir: RunDir) -> str:
    parts = [cfg.model_dump_json(exclude_defaults=True)]
    for name in (CORPUS, QUERIES) + ((TEACHER_SCORES,) if cfg.reward_weight > 0 else ()):
        info = run_dir.fs.get_file_info(run_dir.path(name))
        parts.append(f"{name}:{info.size}:{info.mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _teacher_maps(run_dir: RunDir, pid_row: dict[str, int]) -> tuple[dict[str, dict[int, float]], dict[str, list[int]]]:
    """(qid -> {row: teacher score}, qid -> previous pool rows) for the reward mix."""
    ts = run_dir.read_table(TEACHER_SCORES)
    teacher: dict[str, dict[int, float]] = defaultdict(dict)
    for q, p, s in zip(ts["qid"].to_pylist(), ts["pid"].to_pylist(), ts["teacher_score"].to_pylist(), strict=True):
        if p not in pid_row:
            raise ValueError(f"{run_dir.path(TEACHER_SCORES)}: pid {p!r} (qid {q!r}) is not in {CORPUS}")
        teacher[q][pid_row[p]] = float(s)
    previous: dict[str, list[int]] = defaultdict(list)
    if run_dir.exists(CANDIDATES):
        prev = run_dir.read_table(CANDIDATES, columns=["qid", "pid"])
        for q, p in zip(prev["qid"].to_pylist(), prev["pid"].to_pylist(), strict=True):
            if p in pid_row:
                previous[q].append(pid_row[p])
    return teacher, previous


def run(cfg: MineConfig, run_dir: RunDir) -> dict[str, Any]:
    """Mine candidate pools; see the module docstring. Returns the report."""
    from uae_ray.runtime import ensure_ray

    fp = _fingerprint(cfg, run_dir)
    ensure_ray()
    t0 = time.perf_counter()
    corpus = run_dir.read_table(CORPUS, columns=["pid", "doc_id", "text"])
    q_columns = ["qid", "doc_id", "question", "gold_pids", "split"] + (["answers"] if cfg.answer_passages else [])
    queries = run_dir.read_table(QUERIES, columns=q_columns)
    queries = queries.filter(pc.is_in(queries["split"], pa.array(cfg.splits)))
    pids: list[str] = corpus["pid"].to_pylist()
    pid_row = {p: i for i, p in enumerate(pids)}
    doc_of_row = corpus["doc_id"].to_pylist()
    qids, q_docs, q_splits = (queries[c].to_pylist() for c in ("qid", "doc_id", "split"))
    gold_rows: list[list[int]] = []
    for qid, golds in zip(qids, queries["gold_pids"].to_pylist(), strict=True):
        missing = next((g for g in golds or [] if g not in pid_row), None)
        if missing is not None:
            raise ValueError(f"{run_dir.path(QUERIES)}: qid {qid!r} has gold pid {missing!r} not in {CORPUS}")
        gold_rows.append([pid_row[g] for g in golds or []])
    scope = decide_scope(doc_of_row, cfg.scope)
    log.info("mine: %d passages, %d queries, scope=%s, pool_size=%d", len(pids), len(qids), scope, cfg.pool_size)

    t_enc = time.perf_counter()
    # One pass over passages and questions: the actor pool starts once.
    vecs = encode_texts([f"p:{p}" for p in pids] + [f"q:{q}" for q in qids],
                        corpus["text"].to_pylist() + queries["question"].to_pylist(), cfg, "passages")
    p_vecs, q_vecs = vecs[: len(pids)], vecs[len(pids) :]
    enc_s = time.perf_counter() - t_enc

    mix = cfg.reward_weight > 0
    teacher, previous = _teacher_maps(run_dir, pid_row) if mix else ({}, {})
    depth = cfg.pool_size * 2 if mix else cfg.pool_size
    groups: dict[str, list[int]] = defaultdict(list)  # search group -> query indices
    allowed: dict[str, np.ndarray] = {}  # search group -> corpus rows searched
    skipped: Counter[str] = Counter()
    if scope == "document":
        rows_of_doc: dict[str, list[int]] = defaultdict(list)
        for r, d in enumerate(doc_of_row):
            rows_of_doc[d].append(r)
        for i, d in enumerate(q_docs):
            groups[d].append(i)
        allowed = {d: np.asarray(rows_of_doc.get(d, []), np.int64) for d in groups}
    else:
        doc_split = dict(zip(q_docs, q_splits, strict=True))
        for i, s in enumerate(q_splits):
            groups[s].append(i)
        row_split = [doc_split.get(d) for d in doc_of_row]
        allowed = {s: np.asarray([r for r, rs in enumerate(row_split) if rs in (s, None)], np.int64) for s in groups}

    answer_text: list[str] = []  # per query: its matchable answer strings joined ("" for none)
    if cfg.answer_passages:
        answer_text = [" ".join(answer_patterns(a)) for a in queries["answers"].to_pylist()]
    texts_all: list[str] = corpus["text"].to_pylist() if cfg.answer_passages else []
    answer_counts: Counter[str] = Counter()
    pools: list[Pool | None] = [None] * len(qids)
    dense_gold_hits = 0
    n_gold = 0
    without_insertion = 0
    for g, members in groups.items():
        rows = allowed[g]
        if rows.size == 0:
            skipped["no_passages_in_scope"] += len(members)
            continue
        scores, idx = search_ip(p_vecs[rows], q_vecs[members], depth)
        by_answer: list[list[int]] = [[] for _ in members]
        want = [j for j, qi in enumerate(members) if cfg.answer_passages and q_splits[qi] in cfg.answer_splits]
        if want:
            found = answer_bm25_top([texts_all[r] for r in rows.tolist()], [answer_text[members[j]] for j in want],
                                    cfg.answer_passages)
            for j, hits in zip(want, found, strict=True):
                by_answer[j] = [int(rows[h]) for h in hits]
        for j, qi in enumerate(members):
            cand = rows[idx[j]]
            if mix:
                extra = [r for r in previous.get(qids[qi], []) if r not in set(cand.tolist())]
                cand = np.concatenate([cand, np.asarray(extra, np.int64)])
                pool = mix_reward(cand, p_vecs[cand] @ q_vecs[qi], teacher.get(qids[qi], {}), cfg.reward_weight,
                                  cfg.pool_size)
            else:
                pool = Pool(cand, scores[j])
            golds = gold_rows[qi]
            n_gold += len(golds)
            dense_gold_hits += len(set(golds) & set(pool.rows.tolist()))
            if q_splits[qi] in cfg.insert_gold:
                pools[qi] = ensure_gold(pool, golds, [float(p_vecs[r] @ q_vecs[qi]) for r in golds])
            else:  # the pool as the encoder retrieved it: no passage annotation goes into it
                pools[qi] = pool
                without_insertion += 1
            if cfg.answer_passages and q_splits[qi] in cfg.answer_splits:
                grown = add_to_pool(pools[qi], by_answer[j], [float(p_vecs[r] @ q_vecs[qi]) for r in by_answer[j]])
                added = set(grown.rows.tolist()) - set(pools[qi].rows.tolist())  # type: ignore[union-attr]
                pools[qi] = grown
                answer_counts["queries"] += 1
                answer_counts["no_matchable_answer"] += not answer_text[qi]
                answer_counts["no_passage_matches_answer"] += bool(answer_text[qi]) and not by_answer[j]
                answer_counts["pools_grown"] += bool(added)
                answer_counts["passages_added"] += len(added)
                answer_counts["gold_added"] += len(added & set(golds))
    kept = [i for i, p in enumerate(pools) if p is not None]
    cosine = [p_vecs[pools[i].rows] @ q_vecs[i] for i in kept]  # type: ignore[union-attr]
    table = pools_to_table([qids[i] for i in kept], [pools[i] for i in kept], pids, cosine,  # type: ignore[misc]
                           [set(gold_rows[i]) for i in kept])
    run_dir.write_table(CANDIDATES, table)
    sizes = pc.value_counts(table["qid"]).field("counts").to_numpy() if table.num_rows else np.zeros(1)
    gold_first = pc.sum(pc.and_(pc.equal(table["rank"], 0), table["is_gold"])).as_py() or 0
    report = {
        "fingerprint": fp,
        "encoder": cfg.encoder,
        "scope": scope,
        "scope_config": cfg.scope,
        "pool_size": cfg.pool_size,
        "reward_weight": cfg.reward_weight,
        "splits": list(cfg.splits),
        "queries": len(qids),
        "queries_with_pool": len(kept),
        "skipped": dict(skipped),
        "pairs": table.num_rows,
        "mean_pool_size": round(float(sizes.mean()), 2),
        "insert_gold": list(cfg.insert_gold),
        "pools_without_gold_insertion": without_insertion,  # pools of splits not in insert_gold
        "gold_pairs": int(pc.sum(table["is_gold"]).as_py() or 0),
        "gold_recall_before_insertion": round(dense_gold_hits / n_gold, 4) if n_gold else None,
        "gold_at_rank0": round(gold_first / max(1, len(kept)), 4),
        "teacher_scored_queries": len(teacher) if mix else None,
        # answer-aware mining: queries of answer_splits, how many pools grew and by how many passages; gold_added
        # (annotated evidence the answer search found and the encoder missed) is read from the annotation only here,
        # as a yardstick
        "answer_passages": cfg.answer_passages,
        "answer_splits": list(cfg.answer_splits) if cfg.answer_passages else [],
        "answer_mining": dict(answer_counts) if cfg.answer_passages else None,
        "passages_encoded": len(pids),
        "encode_passages_per_s": round((len(pids) + len(qids)) / max(enc_s, 1e-9), 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    run_dir.write_json(MINE_REPORT, report)
    if skipped:
        log.warning("mine: queries without a pool by reason: %s", dict(skipped))
    log.info("mine: %s", json.dumps({k: report[k] for k in ("scope", "pairs", "gold_recall_before_insertion")}))
    return report
