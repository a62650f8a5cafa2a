"""``uae-ray label``: utility labels for every candidate pair, on a Ray Data actor pool, content-keyed and resumable.

Every label is keyed by a fingerprint of what determined it (:mod:`uae_ray.labeling.fingerprint`): the question,
the scored answers, the passage text and every setting that changes the numbers (generator, backend, the dtype
actually used, ``max_model_len``, ``max_passage_tokens``, answer aggregate, prompt). Labels are kept in an
append-only cache; the stage's product is the *current view* built from it.

Sequence:
1. pairs = candidates.parquet of the configured splits, joined with their passage text (errors name missing ids),
   each with its baseline and pair fingerprints;
2. pairs whose fingerprint is in ``label_cache/`` (labeled or skipped, by any earlier run) are reused;
3. the no-passage terms the pending pairs need and ``label_baseline/`` lacks (once per question + answers);
4. pending pairs (one per fingerprint, sorted by length) -> ``map_batches(LabelPairsBatch)`` on an actor pool; the
   driver writes the output ``rows_per_part`` rows at a time as atomic parts
   ``label_cache/part-<writer id>-NNNNNN.parquet`` (the writer id is unique per run, so writers never collide);
5. the current view: ``utilities/`` (one row per labeled current (qid, pid)) and ``utilities_skipped/`` (one per
   skipped pair, with the reason), each committed atomically;
6. ``label_report.json``: pairs, reused / new pairs, orphaned cache rows, skips, pairs/s, tokens/s.

A setting that does not change the numbers (actor pool, batch sizes, ``rows_per_part``, splits) relabels nothing;
one that does makes new fingerprints, so every pair it touches is labeled again and never mixed with the old rows.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uae_ray.config import LabelConfig
from uae_ray.data.schema import (
    CANDIDATES,
    CORPUS,
    LABEL_BASELINE,
    LABEL_BASELINE_SCHEMA,
    LABEL_CACHE,
    LABEL_CACHE_SCHEMA,
    LABEL_REPORT,
    LABEL_SKIPPED,
    LABEL_SKIPPED_SCHEMA,
    LEGACY_LABEL_BASELINE,
    QUERIES,
    UTILITIES,
    UTILITIES_VIEW_SCHEMA,
)
from uae_ray.labeling.core import attach_fingerprints, join_pair_inputs
from uae_ray.labeling.fingerprint import label_device, settings_key
from uae_ray.labeling.pipeline import BaselineBatch, LabelPairsBatch
from uae_ray.labeling.prompts import prompt_version_for
from uae_ray.labeling.scorers import SKIP_INFERENCE_ERROR
from uae_ray.models.registry import resolve_dtype
from uae_ray.runtime import RunDir, split_blocks

log = logging.getLogger("uae_ray")
_PART = re.compile(r"^part-[A-Za-z0-9-]+\.parquet$")
VIEW_PART = "part-000000.parquet"


def new_writer_id() -> str:
    """A part-name prefix unique to this run: UTC time (parts sort by age) and a random suffix."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class PartWriter:
    """Appends atomic Parquet parts ``<name>/part-<writer>-NNNNNN.parquet``."""

    def __init__(self, run_dir: RunDir, name: str, writer: str) -> None:
        self.run_dir, self.name, self.writer, self.n = run_dir, name, writer, 0

    def write(self, table: pa.Table) -> None:
        self.run_dir.write_table(f"{self.name}/part-{self.writer}-{self.n:06d}.parquet", table)
        self.n += 1


def read_parts(run_dir: RunDir, name: str, schema: pa.Schema) -> pa.Table:
    """Every part in directory ``name`` as one table in ``schema`` (empty when there is none)."""
    parts = [p for p in run_dir.listdir(name) if _PART.match(p)]
    if not parts:
        return schema.empty_table()
    return pq.read_table(run_dir.path(name), filesystem=run_dir.fs, schema=schema)  # dot files (temps) are skipped


def first_index(fingerprints: list[str]) -> dict[str, int]:
    """fingerprint -> its first row (rows made twice by concurrent writers are identical: one is used)."""
    out: dict[str, int] = {}
    for i, fp in enumerate(fingerprints):
        out.setdefault(fp, i)
    return out


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


def _ensure_baseline(
    run_dir: RunDir, cfg: LabelConfig, queries: pa.Table, pending: pa.Table, ctx: dict[str, str],
    vllm_pass: Any = None,
) -> tuple[pa.Table, dict[str, int], int, dict[str, str]]:
    """The baseline rows the ``pending`` pairs need (computing only the fingerprints ``label_baseline/`` lacks),
    counts {needed, reused, new}, tokens used, and {baseline fingerprint: error} of the terms the vLLM engine failed
    on (their pairs are skipped this run, not cached). ``vllm_pass``: the vllm backend's one engine pass
    (:class:`~uae_ray.labeling.vllm_scorer.VLLMPass`), which scores these terms first."""
    have = read_parts(run_dir, LABEL_BASELINE, LABEL_BASELINE_SCHEMA)
    have_fp = first_index(have["fingerprint"].to_pylist())
    need = first_index(pending["baseline_fp"].to_pylist())  # baseline fp -> first pending pair needing it
    todo_fp = [fp for fp in need if fp not in have_fp]
    counts = {"needed": len(need), "reused": len(need) - len(todo_fp), "new": len(todo_fp)}
    tokens, tables, failed = 0, [have], {}
    if todo_fp:
        q_row = {q: i for i, q in enumerate(queries["qid"].to_pylist())}
        pending_qid = pending["qid"].to_pylist()
        rows = pa.array([q_row[pending_qid[need[fp]]] for fp in todo_fp], pa.int64())
        todo = queries.select(["qid", "question", "answers"]).take(rows)
        log.info("label: no-passage terms for %d question/answer sets (%d reused)", len(todo_fp), counts["reused"])
        parts = PartWriter(run_dir, LABEL_BASELINE, ctx["writer"])
        if vllm_pass is not None:
            got = vllm_pass.baseline(todo)
            tokens, failed = got.tokens, got.failed
            chunks = [got.table.slice(i, cfg.rows_per_part) for i in range(0, got.table.num_rows, cfg.rows_per_part)]
        else:
            n_blocks = max(1, min(cfg.pool.max_size * 4, todo.num_rows // cfg.rows_per_batch + 1))
            out = _map_on_actor_pool(todo, BaselineBatch, cfg, n_blocks, ctx)
            chunks = out.iter_batches(batch_size=cfg.rows_per_part, batch_format="pyarrow")
        for chunk in chunks:
            if "tokens" in chunk.column_names:
                tokens += int(pc.sum(chunk["tokens"]).as_py() or 0)
                chunk = chunk.drop_columns(["tokens"])
            new = chunk.cast(LABEL_BASELINE_SCHEMA)
            parts.write(new)
            tables.append(new)
    table = pa.concat_tables(tables)
    index = first_index(table["fingerprint"].to_pylist())
    lost = [fp for fp in need if fp not in index and fp not in failed]
    if lost:  # the actors keyed a baseline differently from the driver: never label against a wrong term
        raise RuntimeError(f"label: {len(lost)} no-passage fingerprint(s) missing after the baseline pass "
                           f"(first {lost[0]}): the actors and the driver disagree on the label settings")
    return table.take(pa.array([index[fp] for fp in need if fp in index], pa.int64())), counts, tokens, failed


def _map_on_actor_pool(table: pa.Table, udf: type, cfg: LabelConfig, n_blocks: int, ctx: dict[str, str]) -> Any:
    """``table`` cut into ``n_blocks`` on the driver, mapped by scorer class ``udf`` on the autoscaling actor pool."""
    import ray

    from uae_ray.runtime import ensure_ray

    ensure_ray()
    return ray.data.from_arrow(split_blocks(table, n_blocks)).map_batches(
        udf,
        fn_constructor_kwargs={"cfg": cfg, "generator": cfg.generator, "prompt_version": ctx["version"],
                               "settings": ctx["settings"]},
        **cfg.pool.map_batches_args(),
        batch_size=cfg.rows_per_batch,
        batch_format="pyarrow",
    )


def _label_pending(
    run_dir: RunDir, cfg: LabelConfig, queries: pa.Table, pending: pa.Table, ctx: dict[str, str]
) -> tuple[list[pa.Table], dict[str, Any]]:
    """Label the ``pending`` pairs (one per fingerprint) into new cache parts; (new tables, this run's counts)."""
    stats: dict[str, Any] = {"labeled": 0, "skipped": Counter(), "duplicates_dropped": 0, "tokens": 0,
                             "baseline": {"needed": 0, "reused": 0, "new": 0}}
    if not pending.num_rows:
        return [], stats
    pending_q = queries.filter(pc.is_in(queries["qid"], pending["qid"]))
    vllm_pass = None
    if cfg.backend == "vllm":  # one engine pass: the missing no-passage terms first, then the pairs
        from uae_ray.labeling.vllm_scorer import VLLMPass, pair_requests

        vllm_pass = VLLMPass(cfg, ctx, pair_requests(pending, pending_q, cfg.answer_aggregate))
    baseline, stats["baseline"], stats["tokens"], failed = _ensure_baseline(run_dir, cfg, pending_q, pending, ctx,
                                                                            vllm_pass)
    if failed:  # the engine failed on their no-passage term: reported as skips, not cached (a rerun retries them)
        lost = pc.is_in(pending["baseline_fp"], pa.array(list(failed), pa.string()))
        stats["skipped"][SKIP_INFERENCE_ERROR] += int(pc.sum(lost).as_py() or 0)
        pending = pending.filter(pc.invert(lost))
    rows = join_pair_inputs(pending, pending_q, baseline)
    est = pc.add(pc.utf8_length(rows["text"]), pc.utf8_length(rows["question"]))
    rows = rows.take(pc.sort_indices(est))  # length-sorted: neighbouring pairs share a batch, little padding
    if vllm_pass is not None:
        chunks = vllm_pass.pairs(rows)
    else:
        n_blocks = max(1, min(rows.num_rows // cfg.rows_per_batch + 1, cfg.pool.max_size * 8))
        ds = _map_on_actor_pool(rows, LabelPairsBatch, cfg, n_blocks, ctx)
        chunks = ((c, {}) for c in ds.iter_batches(batch_size=cfg.rows_per_part, batch_format="pyarrow"))
    parts = PartWriter(run_dir, LABEL_CACHE, ctx["writer"])
    written: set[str] = set()
    new: list[pa.Table] = []
    t0 = time.perf_counter()
    for chunk, errors in chunks:
        if errors:  # reported as skips this run; not cached, so the next run labels them again
            stats["skipped"][SKIP_INFERENCE_ERROR] += len(errors)
            log.warning("label: the vLLM engine failed on %d pair(s), e.g. %s", len(errors),
                        next(iter(errors.values())))
        stats["tokens"] += int(pc.sum(chunk["tokens"]).as_py() or 0)
        fps = chunk["fingerprint"].to_pylist()
        fresh = [fp not in written for fp in fps]  # a retried block can come back twice: write each key once
        stats["duplicates_dropped"] += fresh.count(False)
        chunk = chunk.filter(pa.array(fresh, pa.bool_())).drop_columns(["tokens"]).cast(LABEL_CACHE_SCHEMA)
        written.update(chunk["fingerprint"].to_pylist())
        if chunk.num_rows:
            parts.write(chunk)
            new.append(chunk)
        reasons = chunk["skip_reason"].to_pylist()
        stats["skipped"].update(r for r in reasons if r)
        stats["labeled"] += reasons.count("")
        log.info("label: %d/%d pending labels done, %.2f pairs/s", len(written), pending.num_rows,
                 len(written) / max(time.perf_counter() - t0, 1e-9))
    return new, stats


def _commit_view(run_dir: RunDir, name: str, table: pa.Table) -> None:
    """Make directory ``name`` hold exactly one part, ``table``: one atomic object write (a rename locally, one PUT
    on an object store), then whatever else is there goes (parts of a run dir from before content keys)."""
    run_dir.write_table(f"{name}/{VIEW_PART}", table)
    for entry in run_dir.listdir(name):
        if entry != VIEW_PART and not entry.startswith("."):  # dot files: temps, cleaned by remove_stale_temps
            run_dir.remove(f"{name}/{entry}")


def write_view(run_dir: RunDir, pairs: pa.Table, cache: pa.Table) -> tuple[pa.Table, pa.Table, int]:
    """The current view of ``pairs`` (qid, pid, fingerprint) from ``cache`` rows: ``utilities/`` and
    ``utilities_skipped/`` committed atomically. Returns (labeled view, skipped view, pairs with no cache row)."""
    index = first_index(cache["fingerprint"].to_pylist())
    rows = [index.get(fp, -1) for fp in pairs["fingerprint"].to_pylist()]
    found = pa.array([r >= 0 for r in rows], pa.bool_())
    cur = pairs.filter(found)
    hit = cache.take(pa.array([r for r in rows if r >= 0], pa.int64()))
    ok = pc.equal(hit["skip_reason"], "")
    good, bad = hit.filter(ok), hit.filter(pc.invert(ok))
    good_pairs, bad_pairs = cur.filter(ok), cur.filter(pc.invert(ok))
    labeled = pa.table({
        "qid": good_pairs["qid"], "pid": good_pairs["pid"], "logp_with": good["logp_with"],
        "logp_without": good["logp_without"], "n_answer_tokens": good["n_answer_tokens"], "utility": good["utility"],
        "generator": good["generator"], "prompt_version": good["prompt_version"], "fingerprint": good["fingerprint"],
    }, schema=UTILITIES_VIEW_SCHEMA)
    skipped = pa.table({
        "qid": bad_pairs["qid"], "pid": bad_pairs["pid"], "reason": bad["skip_reason"], "generator": bad["generator"],
        "prompt_version": bad["prompt_version"], "fingerprint": bad["fingerprint"],
    }, schema=LABEL_SKIPPED_SCHEMA)
    _commit_view(run_dir, UTILITIES, labeled)
    _commit_view(run_dir, LABEL_SKIPPED, skipped)
    return labeled, skipped, pairs.num_rows - cur.num_rows


def run(cfg: LabelConfig, run_dir: RunDir) -> dict[str, Any]:
    """Label every pair whose fingerprint is new, reuse the rest, write the current view; returns the report."""
    dtype = resolve_dtype(cfg.dtype, label_device(cfg))
    ctx = {"settings": settings_key(cfg, dtype), "version": prompt_version_for(cfg), "writer": new_writer_id(),
           "dtype": dtype}
    queries, pairs = select_pairs(run_dir, cfg)
    pairs = attach_fingerprints(pairs, queries, aggregate=cfg.answer_aggregate, settings=ctx["settings"])
    for name in (LABEL_CACHE, LABEL_BASELINE, UTILITIES, LABEL_SKIPPED):  # a killed run can leave its temp parts
        if removed := run_dir.remove_stale_temps(name):
            log.warning("label: removed %d temporary file(s) a killed run left in %s", removed, run_dir.path(name))
    if run_dir.exists(LEGACY_LABEL_BASELINE):
        log.warning("label: %s holds no-passage terms keyed by qid only (before content keys); removed, and labels "
                    "made before content keys are not reused", run_dir.path(LEGACY_LABEL_BASELINE))
        run_dir.remove(LEGACY_LABEL_BASELINE)
    cache = read_parts(run_dir, LABEL_CACHE, LABEL_CACHE_SCHEMA)
    cached = first_index(cache["fingerprint"].to_pylist())
    fps = pairs["fingerprint"].to_pylist()
    seen: set[str] = set()
    todo = []
    for fp in fps:  # one label per fingerprint: pairs with the same content share it
        todo.append(fp not in cached and fp not in seen)
        seen.add(fp)
    pending = pairs.filter(pa.array(todo, pa.bool_()))
    reused = sum(fp in cached for fp in fps)
    log.info("label: %d pairs (%d distinct contents), %d reused from %s, %d to label", pairs.num_rows, len(seen),
             reused, LABEL_CACHE, pending.num_rows)
    t0 = time.perf_counter()
    new, stats = _label_pending(run_dir, cfg, queries, pending, ctx)
    elapsed = time.perf_counter() - t0
    cache = pa.concat_tables([cache, *new])
    labeled, skipped, unaccounted = write_view(run_dir, pairs, cache)
    return _report(run_dir, cfg, ctx, pairs, cache, labeled, skipped, unaccounted, reused, stats, elapsed)


def _report(
    run_dir: RunDir, cfg: LabelConfig, ctx: dict[str, str], pairs: pa.Table, cache: pa.Table, labeled: pa.Table,
    skipped: pa.Table, unaccounted: int, reused: int, stats: dict[str, Any], elapsed: float,
) -> dict[str, Any]:
    current = set(pairs["fingerprint"].to_pylist())
    cache_fp = first_index(cache["fingerprint"].to_pylist())
    settings = cache["settings"].to_pylist()
    orphaned = [fp for fp in cache_fp if fp not in current]
    now = stats["labeled"] + sum(stats["skipped"].values())
    report = {
        "generator": cfg.generator,
        "prompt_version": ctx["version"],
        "settings": ctx["settings"],
        "backend": cfg.backend,
        "dtype": ctx["dtype"],
        "answer_aggregate": cfg.answer_aggregate,
        "splits": list(cfg.splits),
        "pairs": pairs.num_rows,
        "labeled": labeled.num_rows,
        "skipped": dict(Counter(skipped["reason"].to_pylist())),
        "unaccounted": unaccounted,
        "reused": reused,  # pairs whose label (or skip) was in the cache before this run
        "new": pairs.num_rows - reused - unaccounted,  # pairs labeled (or skipped) by this run
        "cache": {
            "rows": len(cache_fp),
            "orphaned": len(orphaned),  # cache rows no current pair uses (old text, answers or settings)
            "orphaned_other_settings": sum(settings[cache_fp[fp]] != ctx["settings"] for fp in orphaned),
        },
        "this_run": {
            "labeled": stats["labeled"],
            "skipped": dict(stats["skipped"]),
            "duplicates_dropped": stats["duplicates_dropped"],
            "baseline": stats["baseline"],
            "seconds": round(elapsed, 2),
            "pairs_per_s": round(now / elapsed, 3) if now and elapsed > 0 else None,
            "tokens": stats["tokens"],
            "tokens_per_s": round(stats["tokens"] / elapsed, 1) if stats["tokens"] and elapsed > 0 else None,
            "actors": [cfg.pool.min_size, cfg.pool.max_size],
            "writer": ctx["writer"],
        },
    }
    if labeled.num_rows:
        report["mean_utility"] = round(float(pc.mean(labeled["utility"]).as_py()), 4)
    run_dir.write_json(LABEL_REPORT, report)
    if report["skipped"]:
        log.warning("label: skipped pairs by reason: %s (listed in %s/)", report["skipped"], LABEL_SKIPPED)
    if unaccounted:
        log.warning("label: %d pairs have no label and no skip (the run was cut short?): rerun label", unaccounted)
    log.info("label: %d labeled (%d reused, %d new), %d orphaned cache rows, %.2f pairs/s this run", labeled.num_rows,
             reused, report["new"], len(orphaned), report["this_run"]["pairs_per_s"] or 0.0)
    return report
