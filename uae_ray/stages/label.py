"""``uae-ray label``: utility labels for every candidate pair, on a Ray Data actor pool, content-keyed and resumable.

Every label is keyed by a fingerprint of what determined it (:mod:`uae_ray.labeling.fingerprint`): the question,
the scored answers, the passage text and every setting that changes the numbers (generator, backend, the dtype
actually used, ``max_model_len``, ``max_passage_tokens``, answer aggregate, prompt). Labels are kept in an
append-only cache; the stage's product is the *current view* built from it.

Sequence:
1. pairs = candidates.parquet of the configured splits, within the LLM budget (``max_docs_per_split``: the pools of
   the first N documents of each split, :func:`budget_mask`), joined with their passage text (errors name missing
   ids), each with its baseline and pair fingerprints;
2. pairs whose fingerprint is in ``label_cache/`` (labeled or skipped, by any earlier run) are reused; then those
   whose fingerprint is in the ``label_cache/`` of a ``reuse_from`` run dir (read only), whose rows are copied into
   this run dir's ``label_cache/`` as new parts first (the run dir stays self-contained);
3. the no-passage terms the pending pairs need and ``label_baseline/`` lacks (once per question + answers);
4. pending pairs (one per fingerprint, sorted by length) -> ``map_batches(LabelPairsBatch)`` on an actor pool; the
   driver writes the output ``rows_per_part`` rows at a time as atomic parts
   ``label_cache/part-<writer id>-NNNNNN.parquet`` (the writer id is unique per run, so writers never collide);
5. the current view: ``utilities/`` (one row per labeled current (qid, pid)) and ``utilities_skipped/`` (one per
   skipped pair, with the reason), each committed atomically;
6. ``label_report.json``: pairs, reused / new pairs (and those reused from other run dirs), the budget (documents,
   queries, pairs per split in it and in all), orphaned cache rows, skips, pairs/s, tokens/s.

A setting that does not change the numbers (actor pool, batch sizes, ``rows_per_part``, splits) relabels nothing;
one that does makes new fingerprints, so every pair it touches is labeled again and never mixed with the old rows.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
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
from uae_ray.storage import display_uri, resolve_uri

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


def _part_names(fs: pafs.FileSystem, path: str) -> list[str]:
    """Base names of the parts in directory ``path`` (none when it does not exist)."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if _PART.match(i.base_name))


def _read_parts_at(fs: pafs.FileSystem, path: str, schema: pa.Schema, fingerprints: Iterable[str] | None = None
                   ) -> pa.Table:
    """Every part in directory ``path`` as one table in ``schema``, optionally only the rows of ``fingerprints``."""
    if not _part_names(fs, path):
        return schema.empty_table()
    where = None if fingerprints is None else pc.field("fingerprint").isin(pa.array(list(fingerprints), pa.string()))
    return pq.read_table(path, filesystem=fs, schema=schema, filters=where)  # dot files (temps) are skipped


def read_parts(run_dir: RunDir, name: str, schema: pa.Schema) -> pa.Table:
    """Every part in directory ``name`` as one table in ``schema`` (empty when there is none)."""
    return _read_parts_at(run_dir.fs, run_dir.path(name), schema)


def other_uri(uri: str, like: RunDir | None = None) -> str:
    """``reuse_from`` entry ``uri`` resolved as :class:`RunDir` resolves a run dir; an object-store URI takes the store
    location (endpoint, region, addressing) of run dir ``like`` on the same scheme where it names none itself."""
    text = resolve_uri(uri)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if like is None or scheme is None or not like.uri.startswith(f"{scheme}://"):
        return text
    parts = urlsplit(text)
    own = dict(parse_qsl(urlsplit(uri).query))  # options written in the entry win, then this run dir's, then the env
    query = dict(parse_qsl(parts.query)) | dict(parse_qsl(urlsplit(like.uri).query)) | own
    return urlunsplit(parts._replace(query=urlencode(sorted(query.items()))))


def other_cache(uri: str, like: RunDir | None = None) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path of the run dir, display name) of the ``reuse_from`` run dir ``uri`` (a path or a URI, as
    :class:`RunDir` takes it; see :func:`other_uri`), checked to hold labels in ``label_cache/`` and opened read only:
    unlike ``RunDir(uri)`` this creates nothing there.

    Raises:
        FileNotFoundError: naming ``uri`` when the run dir does not exist or its ``label_cache/`` holds no part.
    """
    text = other_uri(uri, like)
    shown = display_uri(text)
    try:
        fs, root = (pafs.LocalFileSystem(), text) if "://" not in text else pafs.FileSystem.from_uri(text)
        root_type = fs.get_file_info(root).type
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"label.reuse_from: cannot open run dir {shown!r}: {e}") from e
    if root_type != pafs.FileType.Directory:
        raise FileNotFoundError(f"label.reuse_from: run dir {shown!r} does not exist")
    path = f"{root.rstrip('/')}/{LABEL_CACHE}"
    if not _part_names(fs, path):
        raise FileNotFoundError(f"label.reuse_from: run dir {shown!r} has no labels in {LABEL_CACHE}/ (run label "
                                "there first, or drop it from reuse_from)")
    return fs, root.rstrip("/"), shown


_SCHEMAS = {LABEL_CACHE: LABEL_CACHE_SCHEMA, LABEL_BASELINE: LABEL_BASELINE_SCHEMA}


def read_other_cache(uri: str, fingerprints: Iterable[str] | None = None, like: RunDir | None = None,
                     name: str = LABEL_CACHE) -> pa.Table:
    """The rows of directory ``name`` (``label_cache/``, or ``label_baseline/``: the no-passage terms) of another run
    dir (all, or those of ``fingerprints``), read the way this run dir's own are read (empty when it has none);
    nothing there is written or leased. Errors as :func:`other_cache`."""
    fs, root, _ = other_cache(uri, like)
    return _read_parts_at(fs, f"{root}/{name}", _SCHEMAS[name], fingerprints)


def other_run_dirs(run_dir: RunDir, uris: Sequence[str]) -> list[str]:
    """The ``reuse_from`` entries that name another run dir than ``run_dir`` (this one's own cache is read anyway),
    each checked (:func:`other_cache`): a wrong entry fails before anything is read, written or started."""
    out = [u for u in dict.fromkeys(uris) if display_uri(other_uri(u, run_dir)) != run_dir.display]
    for uri in out:
        other_cache(uri, run_dir)
    return out


def first_index(fingerprints: list[str]) -> dict[str, int]:
    """fingerprint -> its first row (rows made twice by concurrent writers are identical: one is used)."""
    out: dict[str, int] = {}
    for i, fp in enumerate(fingerprints):
        out.setdefault(fp, i)
    return out


def budget_mask(queries: pa.Table, corpus_doc_ids: Sequence[str], cfg: LabelConfig) -> pa.BooleanArray:
    """Which rows of ``queries`` (doc_id, split) are in the LLM budget: those whose document is among the first
    ``cfg.doc_cap(split)`` documents of their split (every row when the split has no cap).

    Documents are counted in prepare's order (the order its own ``max_docs_per_split`` admits them in): their first
    appearance in ``corpus_doc_ids`` (corpus.parquet's doc_id column, written in input order), documents with no
    passage after those, by first appearance in ``queries``. Only documents with a query of the split count (a
    document without questions has no pool to label).
    """
    rank = {d: i for i, d in enumerate(dict.fromkeys(corpus_doc_ids))}
    docs, splits = queries["doc_id"].to_pylist(), queries["split"].to_pylist()
    per_split: dict[str, dict[str, None]] = {}  # split -> its documents, in first-appearance order of the queries
    for d, s in zip(docs, splits, strict=True):
        per_split.setdefault(s, {})[d] = None
    kept: set[tuple[str, str]] = set()
    for split, split_docs in per_split.items():
        keys = [rank.get(d, len(rank) + i) for i, d in enumerate(split_docs)]  # distinct: no ties
        order = [d for _, d in sorted(zip(keys, split_docs, strict=True))]
        cap = cfg.doc_cap(split)
        kept.update((split, d) for d in (order if cap is None else order[:cap]))
    return pa.array([(s, d) in kept for d, s in zip(docs, splits, strict=True)], pa.bool_())


def _budget_report(cfg: LabelConfig, queries: pa.Table, keep: pa.BooleanArray, cand_qids: list[str]
                   ) -> dict[str, Any]:
    """The budget as configured and, per split, the documents, queries and pairs in it and in all."""
    qids, docs, splits = (queries[c].to_pylist() for c in ("qid", "doc_id", "split"))
    kept = keep.to_pylist()
    split_of, in_budget = dict(zip(qids, splits, strict=True)), dict(zip(qids, kept, strict=True))
    docs_in: dict[str, set[str]] = {s: set() for s in splits}
    docs_all: dict[str, set[str]] = {s: set() for s in splits}
    queries_in, queries_all, pairs_in, pairs_all = Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    for d, s, k in zip(docs, splits, kept, strict=True):
        docs_all[s].add(d)
        queries_all[s] += 1
        if k:
            docs_in[s].add(d)
            queries_in[s] += 1
    for q in cand_qids:
        if q in split_of:
            pairs_all[split_of[q]] += 1
            pairs_in[split_of[q]] += in_budget[q]
    max_docs = cfg.max_docs_per_split
    return {
        "max_docs_per_split": dict(max_docs) if isinstance(max_docs, dict) else max_docs,
        "splits": {s: {"documents": len(docs_in[s]), "documents_total": len(docs_all[s]),
                       "queries": queries_in[s], "queries_total": queries_all[s],
                       "pairs": pairs_in[s], "pairs_total": pairs_all[s]} for s in sorted(docs_all)},
    }


def select_pairs(run_dir: RunDir, cfg: LabelConfig) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """(queries of cfg.splits in the budget, pairs qid/pid/text of their candidates, the budget report); errors name
    the missing qid / pid."""
    queries = run_dir.read_table(QUERIES)
    known = set(queries["qid"].to_pylist())
    queries = queries.filter(pc.is_in(queries["split"], pa.array(cfg.splits)))
    cands = run_dir.read_table(CANDIDATES, columns=["qid", "pid"])
    cand_qids = cands["qid"].to_pylist()
    stray = next((q for q in cand_qids if q not in known), None)
    if stray is not None:
        raise ValueError(f"{run_dir.path(CANDIDATES)}: qid {stray!r} is not in {QUERIES}: re-run mine")
    corpus = run_dir.read_table(CORPUS, columns=["pid", "doc_id", "text"])
    keep = budget_mask(queries, corpus["doc_id"].to_pylist(), cfg)
    budget = _budget_report(cfg, queries, keep, cand_qids)
    queries = queries.filter(keep)
    cands = cands.filter(pc.is_in(cands["qid"], queries["qid"]))
    pid_row = {p: i for i, p in enumerate(corpus["pid"].to_pylist())}
    missing = next((p for p in cands["pid"].to_pylist() if p not in pid_row), None)
    if missing is not None:
        raise ValueError(f"{run_dir.path(CANDIDATES)}: pid {missing!r} is not in {CORPUS}: re-run mine")
    text = corpus["text"].take(pa.array([pid_row[p] for p in cands["pid"].to_pylist()], pa.int64()))
    return queries, cands.append_column("text", text), budget


def _ensure_baseline(
    run_dir: RunDir, cfg: LabelConfig, queries: pa.Table, pending: pa.Table, ctx: dict[str, str],
    vllm_pass: Any = None, others: Sequence[str] = (),
) -> tuple[pa.Table, dict[str, int], int, dict[str, str]]:
    """The baseline rows the ``pending`` pairs need (computing only the fingerprints that neither ``label_baseline/``
    nor the ``reuse_from`` run dirs ``others`` hold; those are copied here), counts {needed, reused, new,
    from_other_run_dirs} (reused counts the copied ones too), tokens used, and {baseline fingerprint: error} of the
    terms the vLLM engine failed on (their pairs are skipped this run, not cached). ``vllm_pass``: the vllm backend's
    one engine pass (:class:`~uae_ray.labeling.vllm_scorer.VLLMPass`), which scores these terms first."""
    have = read_parts(run_dir, LABEL_BASELINE, LABEL_BASELINE_SCHEMA)
    have_fp = first_index(have["fingerprint"].to_pylist())
    need = first_index(pending["baseline_fp"].to_pylist())  # baseline fp -> first pending pair needing it
    parts = PartWriter(run_dir, LABEL_BASELINE, ctx["writer"])
    copied, _ = reuse_other_caches(run_dir, others, [fp for fp in need if fp not in have_fp], parts,
                                   cfg.rows_per_part, LABEL_BASELINE)
    if copied.num_rows:
        have = pa.concat_tables([have, copied])
        have_fp = first_index(have["fingerprint"].to_pylist())
    todo_fp = [fp for fp in need if fp not in have_fp]
    counts = {"needed": len(need), "reused": len(need) - len(todo_fp), "new": len(todo_fp),
              "from_other_run_dirs": copied.num_rows}
    tokens, tables, failed = 0, [have], {}
    if todo_fp:
        q_row = {q: i for i, q in enumerate(queries["qid"].to_pylist())}
        pending_qid = pending["qid"].to_pylist()
        rows = pa.array([q_row[pending_qid[need[fp]]] for fp in todo_fp], pa.int64())
        todo = queries.select(["qid", "question", "answers"]).take(rows)
        log.info("label: no-passage terms for %d question/answer sets (%d reused)", len(todo_fp), counts["reused"])
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
    run_dir: RunDir, cfg: LabelConfig, queries: pa.Table, pending: pa.Table, ctx: dict[str, str], parts: PartWriter,
    others: Sequence[str] = (),
) -> tuple[list[pa.Table], dict[str, Any]]:
    """Label the ``pending`` pairs (one per fingerprint) into new cache parts written by ``parts``, no-passage terms
    taken from this run dir or the ``reuse_from`` run dirs ``others`` where they exist; (new tables, this run's
    counts)."""
    stats: dict[str, Any] = {"labeled": 0, "skipped": Counter(), "duplicates_dropped": 0, "tokens": 0,
                             "baseline": {"needed": 0, "reused": 0, "new": 0, "from_other_run_dirs": 0}}
    if not pending.num_rows:
        return [], stats
    pending_q = queries.filter(pc.is_in(queries["qid"], pending["qid"]))
    vllm_pass = None
    if cfg.backend == "vllm":  # one engine pass: the missing no-passage terms first, then the pairs
        from uae_ray.labeling.vllm_scorer import VLLMPass, pair_requests

        vllm_pass = VLLMPass(cfg, ctx, pair_requests(pending, pending_q, cfg.answer_aggregate))
    baseline, stats["baseline"], stats["tokens"], failed = _ensure_baseline(run_dir, cfg, pending_q, pending, ctx,
                                                                            vllm_pass, others)
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


def reuse_other_caches(
    run_dir: RunDir, uris: Sequence[str], missing: Sequence[str], parts: PartWriter, rows_per_part: int,
    name: str = LABEL_CACHE,
) -> tuple[pa.Table, dict[str, set[str]]]:
    """The rows of directory ``name`` (``label_cache/`` or ``label_baseline/``) of the fingerprints ``missing``
    (wanted, not in this run dir's) that the other run dirs ``uris`` hold (:func:`other_run_dirs`), the first dir that
    has one winning, copied into this run dir's ``name`` by ``parts``, so the run dir stays self-contained when the
    other one goes. Returns (the copied rows, {dir: the fingerprints taken from it})."""
    wanted = list(dict.fromkeys(missing))
    taken: dict[str, set[str]] = {}
    tables: list[pa.Table] = []
    for uri in uris:
        shown = display_uri(other_uri(uri, run_dir))
        taken[shown] = set()
        if not wanted:
            continue
        other = read_other_cache(uri, wanted, run_dir, name)
        index = first_index(other["fingerprint"].to_pylist())  # one row per fingerprint, as in this run dir's
        rows = other.take(pa.array(list(index.values()), pa.int64()))
        for i in range(0, rows.num_rows, rows_per_part):
            parts.write(rows.slice(i, rows_per_part))
        if rows.num_rows:
            tables.append(rows)
            taken[shown].update(index)
            log.info("label: %d row(s) of %s/ copied from %s", rows.num_rows, name, shown)
        wanted = [fp for fp in wanted if fp not in index]
    return (pa.concat_tables(tables) if tables else _SCHEMAS[name].empty_table()), taken


def run(cfg: LabelConfig, run_dir: RunDir) -> dict[str, Any]:
    """Label every pair whose fingerprint is new, reuse the rest, write the current view; returns the report."""
    others = other_run_dirs(run_dir, cfg.reuse_from)  # a wrong entry fails here, before any work
    dtype = resolve_dtype(cfg.dtype, label_device(cfg))
    ctx = {"settings": settings_key(cfg, dtype), "version": prompt_version_for(cfg), "writer": new_writer_id(),
           "dtype": dtype}
    queries, pairs, budget = select_pairs(run_dir, cfg)
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
    cache_parts = PartWriter(run_dir, LABEL_CACHE, ctx["writer"])  # one writer: copied and new parts never collide
    copied, taken = reuse_other_caches(run_dir, others, [fp for fp in fps if fp not in cached], cache_parts,
                                       cfg.rows_per_part)
    if copied.num_rows:
        cache = pa.concat_tables([cache, copied])
        cached = first_index(cache["fingerprint"].to_pylist())
    seen: set[str] = set()
    todo = []
    for fp in fps:  # one label per fingerprint: pairs with the same content share it
        todo.append(fp not in cached and fp not in seen)
        seen.add(fp)
    pending = pairs.filter(pa.array(todo, pa.bool_()))
    reused = sum(fp in cached for fp in fps)
    from_others = {d: sum(fp in got for fp in fps) for d, got in taken.items()}
    log.info("label: %d pairs (%d distinct contents), %d reused from %s (%d of them from other run dirs), %d to "
             "label", pairs.num_rows, len(seen), reused, LABEL_CACHE, sum(from_others.values()), pending.num_rows)
    t0 = time.perf_counter()
    new, stats = _label_pending(run_dir, cfg, queries, pending, ctx, cache_parts, others)
    elapsed = time.perf_counter() - t0
    cache = pa.concat_tables([cache, *new])
    labeled, skipped, unaccounted = write_view(run_dir, pairs, cache)
    stats["budget"], stats["reused_from_other_run_dirs"] = budget, from_others
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
        "reused": reused,  # pairs whose label (or skip) was in the cache before this run, or in a reuse_from one
        "reused_from_other_run_dirs": stats["reused_from_other_run_dirs"],  # {reuse_from dir: pairs taken from it}
        "new": pairs.num_rows - reused - unaccounted,  # pairs labeled (or skipped) by this run
        "budget": stats["budget"],  # max_docs_per_split, and per split documents/queries/pairs in it vs in total
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
