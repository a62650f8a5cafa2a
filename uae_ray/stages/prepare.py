"""``uae-ray prepare``: raw QA data -> corpus.parquet + queries.parquet + prepare_report.json + prepare_lengths.png.

Chunks stream from the loader; passages are windowed in batches with the fast tokenizer and appended to Arrow
record batches, so the input is never held as Python objects more than a chunk at a time (the generic format is
one chunk). Rerunning with the same config and unchanged inputs does nothing; the report is written last and
marks completion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from uae_ray.config import PrepareConfig
from uae_ray.data import schema
from uae_ray.data.chunking import Windower, gold_windows
from uae_ray.data.loaders import FILE_LOADERS, Chunk, DataError, LoadStats, Query, load_hf
from uae_ray.data.splits import split_for_document
from uae_ray.runtime import RunDir
from uae_ray.storage import file_sha256

log = logging.getLogger("uae_ray")

#: Passages tokenised per batch call.
TOKENIZE_BATCH = 2048
#: Rows per Arrow record batch while building the corpus.
ARROW_BATCH = 8192
#: Histogram of passage lengths (tokens, before windowing) with the window size marked.
PLOT = "prepare_lengths.png"


def iter_chunks(cfg: PrepareConfig, stats: LoadStats) -> Iterator[tuple[str, Chunk]]:
    """(source, chunk) for every input of ``cfg``, in order."""
    if cfg.format == "hf":
        assert cfg.hf_dataset is not None  # guaranteed by PrepareConfig validation
        for chunk in load_hf(cfg.hf_dataset, cfg.hf_config, cfg.hf_layout, None, stats):
            yield cfg.hf_dataset, chunk
        return
    loader = FILE_LOADERS[cfg.format]
    for spec in cfg.inputs:
        path = Path(spec.path).expanduser()
        for chunk in loader(path, spec.split, stats):
            yield str(path), chunk


class _Columns:
    """Column lists flushed into Arrow record batches every ``ARROW_BATCH`` rows."""

    def __init__(self, arrow_schema: pa.Schema) -> None:
        self.schema = arrow_schema
        self.cols: dict[str, list[Any]] = {name: [] for name in arrow_schema.names}
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0

    def append(self, **row: Any) -> None:
        for k, v in row.items():
            self.cols[k].append(v)
        self.rows += 1
        if len(self.cols[self.schema.names[0]]) >= ARROW_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.cols[self.schema.names[0]]:
            self.batches.append(pa.RecordBatch.from_pydict(self.cols, schema=self.schema))
            self.cols = {name: [] for name in self.schema.names}

    def table(self) -> pa.Table:
        self.flush()
        return pa.Table.from_batches(self.batches, schema=self.schema)


@dataclass
class _State:
    """Everything accumulated across chunks."""

    corpus: _Columns = field(default_factory=lambda: _Columns(schema.CORPUS_SCHEMA))
    queries: _Columns = field(default_factory=lambda: _Columns(schema.QUERIES_SCHEMA))
    pids: set[str] = field(default_factory=set)
    qids: dict[str, str] = field(default_factory=dict)
    doc_split: dict[str, str] = field(default_factory=dict)
    dropped_docs: set[str] = field(default_factory=set)
    docs_per_split: Counter[str] = field(default_factory=Counter)
    queries_per_split: Counter[str] = field(default_factory=Counter)
    queries_per_doc: Counter[str] = field(default_factory=Counter)
    passages_kept: int = 0
    windows_written: int = 0
    passages_windowed: int = 0
    gold_passages_windowed: int = 0  # (query, gold passage) pairs whose passage was cut into windows
    gold_all_windows_fallback: int = 0  # ... of which no window held an answer span, so all windows stay gold
    max_tokens_seen: int = 0
    passage_tokens: list[int] = field(default_factory=list)  # length of every kept passage before windowing


def _admit_docs(cfg: PrepareConfig, source: str, chunk: Chunk, st: _State) -> None:
    """Assign each new document of ``chunk`` its split; drop documents over ``max_docs_per_split``."""
    explicit: dict[str, tuple[str, str]] = {}
    for q in chunk.queries:
        if q.split is None:
            continue
        prev = explicit.setdefault(q.doc_id, (q.split, q.qid))
        if prev[0] != q.split:
            raise DataError(source, q.where, "split", f"{q.split!r} but query {prev[1]!r} of the same document "
                            f"{q.doc_id!r} is in {prev[0]!r}; splits are by document")
    doc_ids = dict.fromkeys([*(p.doc_id for p in chunk.passages), *(q.doc_id for q in chunk.queries)])
    for doc in doc_ids:
        want = chunk.split or explicit.get(doc, (None, ""))[0]
        have = st.doc_split.get(doc)
        if have is not None:
            if want is not None and want != have:
                raise DataError(source, None, "split", f"document {doc!r} appears in {want!r} and {have!r}")
            continue
        split = want or split_for_document(doc, cfg.split_ratios, cfg.seed)
        st.doc_split[doc] = split
        cap = cfg.doc_cap(split)
        if cap is not None and st.docs_per_split[split] >= cap:
            st.dropped_docs.add(doc)
        else:
            st.docs_per_split[split] += 1


def _process(cfg: PrepareConfig, windower: Windower, pending: list[tuple[str, Chunk]], st: _State,
             stats: LoadStats) -> None:
    """Window the passages of ``pending`` chunks in one tokenizer call, then write passages and queries."""
    texts = [p.text for _, c in pending for p in c.passages if p.doc_id not in st.dropped_docs]
    all_windows = iter(windower.split(texts))
    for source, chunk in pending:
        windows_of: dict[str, list[str]] = {}  # base pid -> window pids
        texts_of: dict[str, list[str]] = {}
        for p in chunk.passages:
            if p.doc_id in st.dropped_docs:
                stats.passages_skipped["max_docs_per_split"] += 1
                continue
            windows = next(all_windows)
            wpids = [p.pid] if len(windows) == 1 else [f"{p.pid}.{i}" for i in range(len(windows))]
            for wpid, w in zip(wpids, windows, strict=True):
                if wpid in st.pids:
                    raise DataError(source, None, "pid", f"duplicate passage id {wpid!r} (document {p.doc_id!r})")
                st.pids.add(wpid)
                st.corpus.append(pid=wpid, doc_id=p.doc_id, title=p.title, text=w.text, n_tokens=w.n_tokens)
                st.max_tokens_seen = max(st.max_tokens_seen, w.n_tokens)
            st.passages_kept += 1
            st.windows_written += len(windows)
            st.passages_windowed += len(windows) > 1
            st.passage_tokens.append(sum(w.n_tokens for w in windows) - windower.overlap * (len(windows) - 1))
            windows_of[p.pid] = wpids
            texts_of[p.pid] = [w.text for w in windows]
        for q in chunk.queries:
            _write_query(cfg, source, q, windows_of, texts_of, st, stats)


def _write_query(cfg: PrepareConfig, source: str, q: Query, windows_of: dict[str, list[str]],
                 texts_of: dict[str, list[str]], st: _State, stats: LoadStats) -> None:
    """Resolve ``q``'s gold windows and append it, or count why it is skipped."""
    if q.qid in st.qids:
        raise DataError(source, q.where, "qid", f"duplicate question id {q.qid!r} (first in {st.qids[q.qid]})")
    st.qids[q.qid] = source
    if q.doc_id in st.dropped_docs:
        stats.skipped["max_docs_per_split"] += 1
        return
    gold: list[str] = []
    for pid in q.gold_pids:
        if pid not in windows_of:
            raise DataError(source, q.where, "gold_pids", f"gold passage {pid!r} is not among the passages")
        idx, fallback = gold_windows(texts_of[pid], q.match_texts)
        if len(windows_of[pid]) > 1:
            st.gold_passages_windowed += 1
            st.gold_all_windows_fallback += fallback
        gold.extend(windows_of[pid][i] for i in idx)
    if not gold and cfg.require_gold:
        stats.skipped[q.no_gold_reason or "no_gold_passage"] += 1
        return
    if cfg.max_queries_per_doc is not None and st.queries_per_doc[q.doc_id] >= cfg.max_queries_per_doc:
        stats.skipped["max_queries_per_doc"] += 1
        return
    st.queries_per_doc[q.doc_id] += 1
    split = st.doc_split[q.doc_id]
    st.queries_per_split[split] += 1
    st.queries.append(qid=q.qid, doc_id=q.doc_id, question=q.question, answers=list(q.answers),
                      gold_pids=list(dict.fromkeys(gold)), split=split)


def input_stamps(cfg: PrepareConfig) -> list[Any]:
    """What the pipeline's marker records of the input files, so that an edited input makes prepare stale: each
    file's size and SHA-256 (every file of a local ``hf_dataset`` folder, with its path inside it; a hub id counts by
    name only; a missing file by its path as configured).

    By content, not by path and mtime: the same run directory is read from other machines (a Ray job's driver runs
    in the unpacked working-dir package, the user's laptop in its checkout) where the same file has another absolute
    path and mtime; neither is a change. The configured paths themselves are part of the config."""
    stamps: list[Any] = []
    if cfg.hf_dataset and Path(cfg.hf_dataset).expanduser().is_dir():
        root = Path(cfg.hf_dataset).expanduser()
        files = [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()]
    else:
        if cfg.hf_dataset:
            stamps.append(cfg.hf_dataset)
        files = [(None, Path(spec.path).expanduser()) for spec in cfg.inputs]
    for name, p in files:
        if not p.is_file():
            stamps.append([str(p), None])
            continue
        stamps.append([name, p.stat().st_size, file_sha256(p)])
    return stamps


def fingerprint(cfg: PrepareConfig) -> str:
    """Config plus :func:`input_stamps` (recorded in the report)."""
    parts: list[Any] = [cfg.model_dump(mode="json", exclude_defaults=True), *input_stamps(cfg)]
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(cfg: PrepareConfig, run_dir: RunDir) -> dict[str, Any]:
    """Prepare the run directory's corpus and queries, write and print the report; returns a short summary.

    Raises:
        DataError: unusable input (file, line/record and field in the message); nothing is written then.
    """
    fp = fingerprint(cfg)  # recorded in the report; whether to run at all is the pipeline's rule (run_stage)
    t0 = time.perf_counter()
    windower = Windower(cfg.tokenizer, cfg.max_passage_tokens, cfg.window_overlap)
    stats, st = LoadStats(), _State()
    pending: list[tuple[str, Chunk]] = []
    n_pending = 0
    bar = tqdm(desc="prepare", unit=" doc", mininterval=2.0)
    for source, chunk in iter_chunks(cfg, stats):
        _admit_docs(cfg, source, chunk, st)
        pending.append((source, chunk))
        n_pending += len(chunk.passages)
        bar.update(1)
        if n_pending >= TOKENIZE_BATCH:
            _process(cfg, windower, pending, st, stats)
            pending, n_pending = [], 0
            bar.set_postfix(passages=st.passages_kept, queries=len(st.qids))
    _process(cfg, windower, pending, st, stats)
    bar.close()
    corpus, queries = st.corpus.table(), st.queries.table()
    if queries.num_rows == 0:  # every later stage needs questions: fail here, with the reasons, writing nothing
        sources = ", ".join(s.path for s in cfg.inputs) or str(cfg.hf_dataset)
        raise DataError(sources, None, None, f"no usable questions: {stats.queries_read} read, skipped "
                        f"{dict(stats.skipped) or 'none'}")
    report = _report(cfg, fp, stats, st, corpus, queries, time.perf_counter() - t0)
    run_dir.write_table(schema.CORPUS, corpus)
    run_dir.write_table(schema.QUERIES, queries)
    run_dir.write_bytes(PLOT, plot_lengths(st.passage_tokens, windower.size, cfg.format))
    run_dir.write_json(schema.PREPARE_REPORT, report)
    _print_report(report)
    return summary(report, run_dir)


def plot_lengths(lengths: list[int], window: int, title: str) -> bytes:
    """PNG histogram of passage lengths in tokens, with the window size (text tokens) as a vertical line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    cap = 4 * window
    ax.hist([min(n, cap) for n in lengths], bins=60, range=(0, cap), color="#4C72B0")
    over = sum(n > window for n in lengths)
    ax.axvline(window, color="#C44E52", linestyle="--", label=f"window: {window} text tokens ({over} passages longer)")
    ax.set(xlabel="passage length in tokens (longer ones in the last bin)", ylabel="passages",
           title=f"prepare ({title}): {len(lengths)} passages")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def summary(report: dict[str, Any], run_dir: RunDir) -> dict[str, Any]:
    """The small summary the CLI prints (the full report is in prepare_report.json)."""
    return {
        "questions_read": report["questions"]["read"],
        "questions_kept": report["questions"]["kept"],
        "corpus_rows": report["windows"]["rows"],
        "queries_per_split": {s: v["queries"] for s, v in report["splits"].items()},
        "report": run_dir.path(schema.PREPARE_REPORT),
        "plot": run_dir.path(PLOT),
    }


def _report(cfg: PrepareConfig, fp: str, stats: LoadStats, st: _State, corpus: pa.Table, queries: pa.Table,
            seconds: float) -> dict[str, Any]:
    kept = queries.num_rows
    skipped = dict(sorted(stats.skipped.items()))
    if stats.queries_read != kept + sum(skipped.values()):  # internal invariant: every question accounted for
        raise RuntimeError(f"prepare: {stats.queries_read} questions read but {kept} kept + {skipped} skipped")
    return {
        "format": cfg.format,
        "inputs": [s.model_dump() for s in cfg.inputs] or [{"hf_dataset": cfg.hf_dataset, "layout": cfg.hf_layout}],
        "fingerprint": fp,
        "questions": {"read": stats.queries_read, "kept": kept, "skipped": skipped},
        "passages": {"read": stats.passages_read, "kept": st.passages_kept,
                     "skipped": dict(sorted(stats.passages_skipped.items()))},
        "windows": {"rows": corpus.num_rows, "passages_split": st.passages_windowed,
                    "gold_pairs_in_split_passages": st.gold_passages_windowed,
                    "gold_pairs_all_windows_fallback": st.gold_all_windows_fallback,
                    "max_passage_tokens": cfg.max_passage_tokens, "window_overlap": cfg.window_overlap,
                    "max_n_tokens": st.max_tokens_seen, "tokenizer": cfg.tokenizer},
        "splits": {s: {"queries": st.queries_per_split[s], "documents": st.docs_per_split[s]} for s in schema.SPLITS},
        "notes": dict(sorted(stats.notes.items())),
        "seconds": round(seconds, 2),
    }


def _print_report(r: dict[str, Any]) -> None:
    q, p, w = r["questions"], r["passages"], r["windows"]
    lines = [
        f"prepare ({r['format']}): {q['read']} questions read, {q['kept']} kept, {sum(q['skipped'].values())} skipped",
        *(f"  skipped {reason}: {n}" for reason, n in q["skipped"].items()),
        f"passages: {p['read']} read, {p['kept']} kept -> {w['rows']} corpus rows ({w['passages_split']} split into "
        f"windows of <= {w['max_passage_tokens']} tokens)",
        *(f"  passages skipped {reason}: {n}" for reason, n in p["skipped"].items()),
        "splits: " + ", ".join(f"{s} {v['queries']} queries / {v['documents']} docs" for s, v in r["splits"].items()),
        *(f"  {k}: {v}" for k, v in r["notes"].items()),
        f"time {r['seconds']} s",
    ]
    print("\n".join(lines))
