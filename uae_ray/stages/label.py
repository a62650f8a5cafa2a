"""``uae-ray label``: utility labels for every candidate pair, on a Ray Data actor pool, resumable and exact.

Sequence:
1. pairs = candidates.parquet of the configured splits, joined with their passage text (errors name missing ids);
2. pairs already in ``utilities/`` or ``utilities_skipped/`` are filtered out (so a killed run resumes);
3. the no-passage terms of the pending queries not yet in ``label_baseline.parquet`` (once per query and answer);
4. pending pairs (sorted by length, so batches pad little) -> ``map_batches(LabelPairsBatch)`` on an actor pool;
   the driver iterates the output ``rows_per_part`` rows at a time and writes each chunk atomically as
   ``utilities/part-NNNNNN.parquet`` (skipped pairs as ``utilities_skipped/part-NNNNNN.parquet``);
5. ``label_report.json``: pairs, pairs/s, tokens/s, skips per reason.

Labels from another generator or prompt version in the run directory are an error, never mixed.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from uae_ray.config import LabelConfig
from uae_ray.data.schema import (
    CANDIDATES,
    CORPUS,
    LABEL_BASELINE,
    LABEL_BASELINE_SCHEMA,
    LABEL_REPORT,
    LABEL_SKIPPED,
    LABEL_SKIPPED_SCHEMA,
    QUERIES,
    UTILITIES,
    UTILITIES_SCHEMA,
)
from uae_ray.labeling.pipeline import BaselineBatch, LabelPairsBatch, join_pair_inputs, split_blocks
from uae_ray.labeling.prompts import prompt_version_for
from uae_ray.models.registry import resolve_dtype
from uae_ray.runtime import RunDir

log = logging.getLogger("uae_ray")
_PART = re.compile(r"^part-(\d{6})\.parquet$")


class LabelMismatchError(ValueError):
    """Existing labels in the run directory were made with another generator or prompt version."""


def _read_parts(run_dir: RunDir, name: str, schema: pa.Schema) -> pa.Table:
    if not any(_PART.match(p) for p in run_dir.listdir(name)):
        return schema.empty_table()
    return run_dir.read_table(name)


def _check_same_labels(parts: pa.Table, where: str, generator: str, prompt_version: str) -> None:
    if parts.num_rows == 0:
        return
    seen = pc.unique(pc.binary_join_element_wise(parts["generator"], parts["prompt_version"], " / ")).to_pylist()
    if seen != [f"{generator} / {prompt_version}"]:
        raise LabelMismatchError(
            f"{where} holds labels from generator / prompt_version {sorted(seen)}; this config gives "
            f"{generator} / {prompt_version}. Labels from different generators or prompts never mix: use a new "
            f"run directory, or remove {where} to relabel."
        )


def _keys(table: pa.Table) -> set[tuple[str, str]]:
    return set(zip(table["qid"].to_pylist(), table["pid"].to_pylist(), strict=True))


def select_pairs(run_dir: RunDir, cfg: LabelConfig) -> tuple[pa.Table, pa.Table]:
    """(queries of cfg.splits, pairs qid/pid/text of their candidates); errors name the missing qid / pid."""
    queries = run_dir.read_table(QUERIES)
    queries = queries.filter(pc.is_in(queries["split"], pa.array(cfg.splits)))
    cands = run_dir.read_table(CANDIDATES, columns=["qid", "pid"])
    known = set(run_dir.read_table(QUERIES, columns=["qid"])["qid"].to_pylist())
    stray = next((q for q in cands["qid"].to_pylist() if q not in known), None)
    if stray is not None:
        raise ValueError(f"{run_dir.path(CANDIDATES)}: qid {stray!r} is not in {QUERIES}: re-run mine")
    cands = cands.filter(pc.is_in(cands["qid"], queries["qid"]))
    corpus = run_dir.read_table(CORPUS, columns=["pid", "text"])
    pid_row = {p: i for i, p in enumerate(corpus["pid"].to_pylist())}
    missing = next((p for p in cands["pid"].to_pylist() if p not in pid_row), None)
    if missing is not None:
        raise ValueError(f"{run_dir.path(CANDIDATES)}: pid {missing!r} is not in {CORPUS}: re-run mine")
    text = corpus["text"].take(pa.array([pid_row[p] for p in cands["pid"].to_pylist()], pa.int64()))
    return queries, cands.append_column("text", text)


def _next_part(run_dir: RunDir) -> int:
    nums = [int(m.group(1)) for d in (UTILITIES, LABEL_SKIPPED) for p in run_dir.listdir(d) if (m := _PART.match(p))]
    return max(nums, default=-1) + 1


def _ensure_baseline(run_dir: RunDir, cfg: LabelConfig, queries: pa.Table, generator: str, version: str) -> tuple[
    pa.Table, int
]:
    """The baseline table covering ``queries`` (computing only what ``label_baseline.parquet`` lacks), tokens used."""

    have = run_dir.read_table(LABEL_BASELINE) if run_dir.exists(LABEL_BASELINE) else LABEL_BASELINE_SCHEMA.empty_table()
    _check_same_labels(have, run_dir.path(LABEL_BASELINE), generator, version)
    todo = queries.filter(pc.invert(pc.is_in(queries["qid"], have["qid"])))
    tokens = 0
    if todo.num_rows:
        log.info("label: no-passage terms for %d queries", todo.num_rows)
        n_blocks = max(1, min(cfg.pool.max_size * 4, todo.num_rows // cfg.rows_per_batch + 1))
        out = _map_on_actor_pool(todo.select(["qid", "question", "answers"]), BaselineBatch, cfg, n_blocks, version)
        new = pa.concat_tables(list(out.iter_batches(batch_size=None, batch_format="pyarrow")))
        tokens = int(pc.sum(new["tokens"]).as_py() or 0)
        have = pa.concat_tables([have, new.drop_columns(["tokens"]).cast(LABEL_BASELINE_SCHEMA)])
        run_dir.write_table(LABEL_BASELINE, have)
    return have.filter(pc.is_in(have["qid"], queries["qid"])), tokens


def _map_on_actor_pool(table: pa.Table, udf: type, cfg: LabelConfig, n_blocks: int, version: str) -> Any:
    """``table`` cut into ``n_blocks`` on the driver, mapped by scorer class ``udf`` on the autoscaling actor pool."""
    import ray

    return ray.data.from_arrow(split_blocks(table, n_blocks)).map_batches(
        udf,
        fn_constructor_kwargs={"cfg": cfg, "generator": cfg.generator, "prompt_version": version},
        **cfg.pool.map_batches_args(),
        batch_size=cfg.rows_per_batch,
        batch_format="pyarrow",
    )


def run(cfg: LabelConfig, run_dir: RunDir) -> dict[str, Any]:
    """Label every pending candidate pair; see the module docstring. Returns the report."""

    from uae_ray.runtime import ensure_ray

    ensure_ray()
    generator, version = cfg.generator, prompt_version_for(cfg)
    queries, pairs = select_pairs(run_dir, cfg)
    for name in (UTILITIES, LABEL_SKIPPED):  # a run killed mid-write (SIGKILL) can leave its temp part behind
        if removed := run_dir.remove_stale_temps(name):
            log.warning("label: removed %d temporary file(s) a killed run left in %s", removed, run_dir.path(name))
    done = _read_parts(run_dir, UTILITIES, UTILITIES_SCHEMA)
    skipped = _read_parts(run_dir, LABEL_SKIPPED, LABEL_SKIPPED_SCHEMA)
    _check_same_labels(done, run_dir.path(UTILITIES), generator, version)
    _check_same_labels(skipped, run_dir.path(LABEL_SKIPPED), generator, version)
    finished = _keys(done) | _keys(skipped)
    keys = list(zip(pairs["qid"].to_pylist(), pairs["pid"].to_pylist(), strict=True))
    pending = pairs.filter(pa.array([k not in finished for k in keys], pa.bool_()))
    log.info("label: %d pairs, %d already done, %d pending", pairs.num_rows, pairs.num_rows - pending.num_rows,
             pending.num_rows)
    t0 = time.perf_counter()
    tokens, labeled_now, skipped_now, duplicates = 0, 0, Counter(), 0
    if pending.num_rows:
        pending_q = queries.filter(pc.is_in(queries["qid"], pending["qid"]))
        baseline, tokens = _ensure_baseline(run_dir, cfg, pending_q, generator, version)
        rows = join_pair_inputs(pending, pending_q, baseline)
        est = pc.add(pc.utf8_length(rows["text"]), pc.utf8_length(rows["question"]))
        rows = rows.take(pc.sort_indices(est))  # length-sorted: neighbouring pairs share a batch, little padding
        n_blocks = max(1, min(rows.num_rows // cfg.rows_per_batch + 1, cfg.pool.max_size * 8))
        ds = _map_on_actor_pool(rows, LabelPairsBatch, cfg, n_blocks, version)
        part = _next_part(run_dir)
        written: set[tuple[str, str]] = set()
        for chunk in ds.iter_batches(batch_size=cfg.rows_per_part, batch_format="pyarrow"):
            tokens += int(pc.sum(chunk["tokens"]).as_py() or 0)
            chunk_keys = list(zip(chunk["qid"].to_pylist(), chunk["pid"].to_pylist(), strict=True))
            fresh = [k not in written and k not in finished for k in chunk_keys]
            duplicates += fresh.count(False)
            chunk = chunk.filter(pa.array(fresh, pa.bool_()))
            written.update(k for k, f in zip(chunk_keys, fresh, strict=True) if f)
            is_skip = pc.not_equal(chunk["skip_reason"], "")
            bad = chunk.filter(is_skip)
            good = chunk.filter(pc.invert(is_skip)).select(UTILITIES_SCHEMA.names).cast(UTILITIES_SCHEMA)
            if bad.num_rows:  # skips first: a kill between the two writes leaves pairs pending, never doubled
                run_dir.write_table(
                    f"{LABEL_SKIPPED}/part-{part:06d}.parquet",
                    pa.table({"qid": bad["qid"], "pid": bad["pid"], "reason": bad["skip_reason"],
                              "generator": bad["generator"], "prompt_version": bad["prompt_version"]},
                             schema=LABEL_SKIPPED_SCHEMA),
                )
                skipped_now.update(bad["skip_reason"].to_pylist())
            if good.num_rows:
                run_dir.write_table(f"{UTILITIES}/part-{part:06d}.parquet", good)
                labeled_now += good.num_rows
            part += 1
            elapsed = time.perf_counter() - t0
            log.info("label: %d/%d pending pairs done, %.2f pairs/s", len(written), pending.num_rows,
                     len(written) / max(elapsed, 1e-9))
    elapsed = time.perf_counter() - t0
    return _report(
        run_dir, cfg, pc.unique(pairs["qid"]), pairs.num_rows, labeled_now, skipped_now, duplicates, tokens, elapsed,
        version,
    )


def _report(
    run_dir: RunDir, cfg: LabelConfig, pairs_qids: pa.Array, n_pairs: int, labeled_now: int, skipped_now: Counter,
    duplicates: int, tokens: int, elapsed: float, version: str,
) -> dict[str, Any]:
    done = _read_parts(run_dir, UTILITIES, UTILITIES_SCHEMA)
    skipped = _read_parts(run_dir, LABEL_SKIPPED, LABEL_SKIPPED_SCHEMA)
    done = done.filter(pc.is_in(done["qid"], pairs_qids))
    skipped = skipped.filter(pc.is_in(skipped["qid"], pairs_qids))
    now = labeled_now + sum(skipped_now.values())
    report = {
        "generator": cfg.generator,
        "prompt_version": version,
        "backend": cfg.backend,
        "dtype": resolve_dtype(cfg.dtype, "cuda" if cfg.pool.num_gpus > 0 else "cpu"),
        "answer_aggregate": cfg.answer_aggregate,
        "splits": list(cfg.splits),
        "pairs": n_pairs,
        "labeled": done.num_rows,
        "skipped": dict(Counter(skipped["reason"].to_pylist())),
        "unaccounted": n_pairs - done.num_rows - skipped.num_rows,
        "this_run": {
            "labeled": labeled_now,
            "skipped": dict(skipped_now),
            "duplicates_dropped": duplicates,
            "seconds": round(elapsed, 2),
            "pairs_per_s": round(now / elapsed, 3) if now and elapsed > 0 else None,
            "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1) if tokens and elapsed > 0 else None,
            "actors": [cfg.pool.min_size, cfg.pool.max_size],
        },
    }
    if done.num_rows:
        report["mean_utility"] = round(float(pc.mean(done["utility"]).as_py()), 4)
    run_dir.write_json(LABEL_REPORT, report)
    if report["skipped"]:
        log.warning("label: skipped pairs by reason: %s (listed in %s/)", report["skipped"], LABEL_SKIPPED)
    log.info("label: %d labeled, %.2f pairs/s this run", done.num_rows, report["this_run"]["pairs_per_s"] or 0.0)
    return report
