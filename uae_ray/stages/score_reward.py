"""``uae-ray score-reward``: score every (query, candidate) pair with the reward model (Ray Data actor pool)
-> teacher_scores.parquet (+ score_reward_report.json, which names the reward model by its fingerprint).

Whether it needs to run is the pipeline's rule (:func:`uae_ray.stages.pipeline.run_stage`): its step is stale when
train-reward or mine ran again."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from uae_ray.config import ScoreRewardConfig
from uae_ray.data.schema import CANDIDATES, CORPUS, QUERIES, REWARD_MODEL, TEACHER_SCORES, TEACHER_SCORES_SCHEMA
from uae_ray.runtime import RunDir, ensure_ray

log = logging.getLogger("uae_ray")
REPORT = "score_reward_report.json"


def _fingerprint(run_dir: RunDir) -> str:
    """Identifies the trained reward model: the hash of its training record (config and the whole loss history), as
    its commit record states it, so an object-store run dir downloads nothing for it; a directory committed before
    commit records listed files is hashed from a fetched copy."""
    files = run_dir.commit_record(REWARD_MODEL).get("files") or {}
    if "training.json" in files:
        return files["training.json"]["sha256"][:16]
    return hashlib.sha256((run_dir.fetch_dir(REWARD_MODEL) / "training.json").read_bytes()).hexdigest()[:16]


def _pairs(run_dir: RunDir) -> tuple[pa.Table, dict[str, int], int]:
    """candidates joined with question and passage text, sorted by passage length (less padding per batch); the
    skips by reason; how many candidate rows there were."""
    cands = run_dir.read_table(CANDIDATES, columns=["qid", "pid"])
    queries = run_dir.read_table(QUERIES, columns=["qid", "question"])
    corpus = run_dir.read_table(CORPUS, columns=["pid", "text"])
    joined = cands.join(queries, "qid", join_type="left outer").join(corpus, "pid", join_type="left outer")
    skips: Counter[str] = Counter()
    no_q = pc.is_null(joined["question"])
    no_t = pc.is_null(joined["text"])
    skips["unknown_qid"] = pc.sum(no_q).as_py() or 0
    skips["unknown_pid"] = pc.sum(pc.and_(no_t, pc.invert(no_q))).as_py() or 0
    joined = joined.filter(pc.and_(pc.invert(no_q), pc.invert(no_t)))
    joined = joined.append_column("_len", pc.utf8_length(joined["text"])).sort_by([("_len", "descending")])
    return joined.drop(["_len"]), {k: v for k, v in skips.items() if v}, cands.num_rows


def run(cfg: ScoreRewardConfig, run_dir: RunDir) -> dict:
    if not run_dir.dir_complete(REWARD_MODEL):
        raise FileNotFoundError(f"{run_dir.path(REWARD_MODEL)} is missing or incomplete: run train-reward first")
    fp = _fingerprint(run_dir)
    pairs, skips, n_cands = _pairs(run_dir)
    if skips:
        log.warning("score-reward: skipped candidate rows: %s", skips)
    ensure_ray()
    import ray

    from uae_ray.models.reward import RewardScoreBatch

    t0 = time.perf_counter()
    blocks = max(1, min(64, pairs.num_rows // max(1, cfg.pool.batch_size)))
    ds = ray.data.from_arrow(pairs, override_num_blocks=blocks).map_batches(
        RewardScoreBatch,
        fn_constructor_kwargs={"model_path": f"run:{REWARD_MODEL}", "run_dir": run_dir.uri,
                               "max_length": cfg.max_length},  # fetched on each actor's node
        **cfg.pool.map_batches_args(),
        batch_size=cfg.pool.batch_size,
    )
    refs = ds.select_columns(["qid", "pid", "teacher_score"]).to_arrow_refs()
    out = pa.concat_tables(ray.get(refs)) if refs else TEACHER_SCORES_SCHEMA.empty_table()
    seconds = time.perf_counter() - t0
    out = out.cast(TEACHER_SCORES_SCHEMA).sort_by([("qid", "ascending"), ("pid", "ascending")])
    if out.num_rows != pairs.num_rows:
        raise RuntimeError(f"score-reward: {pairs.num_rows} pairs in, {out.num_rows} scores out")
    run_dir.write_table(TEACHER_SCORES, out)
    report = {
        "reward_model": fp,
        "candidates": n_cands,
        "scored": out.num_rows,
        "skipped": skips,
        "seconds": round(seconds, 1),
        "pairs_per_s": round(out.num_rows / seconds, 1) if seconds > 0 else None,
    }
    run_dir.write_json(REPORT, report)
    return report
