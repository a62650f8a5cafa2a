"""The generic JSONL / Parquet format, for bringing your own data (documented in the README).

Each record (a JSON line, or a Parquet row) is either

- a QUERY: ``{"qid", "question", "answers": [str], "doc_id"?, "split"?: "train"|"dev"|"test"}`` plus EITHER
  ``"gold_pids": [pid]`` (passages given as PASSAGE records anywhere in the file) OR
  ``"passages": [{"text", "title"?, "pid"?, "gold"?: bool}]`` (inline); or
- a PASSAGE (no ``"question"`` key, or a null one in Parquet): ``{"pid", "text", "doc_id"?, "title"?}``.

doc_id defaults: a passage record's pid; a query with inline passages: its qid (its passages share it); a query with
gold_pids: the doc_id of its first gold passage. Inline passages without pid get ``{qid}#{i}``. The same inline
passage (same pid and text) may appear under several queries; a pid reused with another text is an error.

Fatal (:class:`DataError`): bad JSON / non-UTF-8, missing or mistyped fields, empty question, both or neither of
gold_pids and passages, a bad split, duplicate qid or passage pid, a gold pid that names no passage. Counted skips:
``no_answer`` (empty answers), ``no_gold_marked`` (inline passages, none gold; a skip only when gold is required).
The whole file becomes one chunk (gold pids may point anywhere in it), so it is held in memory once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from uae_ray.data.loaders.common import (
    Chunk,
    DataError,
    LoadStats,
    Passage,
    Query,
    dedup,
    get_field,
    get_question,
    get_str_list,
    iter_jsonl,
)

SPLITS = ("train", "dev", "test")


def iter_parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row dict) of a Parquet file, batch by batch."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise DataError(path, None, None, f"not a readable Parquet file: {e}") from e
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield row, rec
            row += 1


def iter_generic_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) of a generic JSONL(.gz) or Parquet (``.parquet``/``.pq``) file."""
    if path.suffix in (".parquet", ".pq"):
        for row, rec in iter_parquet_rows(path):
            yield f"row {row}", rec
    else:
        for lineno, rec in iter_jsonl(path):
            yield f"line {lineno}", rec


class GenericBuilder:
    """Accumulates generic records (from a file or hub rows) into one :class:`Chunk`, validating as it goes."""

    def __init__(self, source: str | Path, split: str | None, stats: LoadStats) -> None:
        self.source, self.split, self.stats = source, split, stats
        self.passages: dict[str, Passage] = {}
        self.passage_where: dict[str, str] = {}
        self.queries: list[tuple[Query, str | None]] = []  # (query, explicit doc_id)
        self.qids: dict[str, str] = {}

    def add(self, where: str, rec: dict[str, Any]) -> None:
        """Validate and add one record."""
        if rec.get("question") is None:
            self._add_passage_record(where, rec)
        else:
            self._add_query(where, rec)

    def _passage(self, where: str, rec: Any, *, pid: str | None, doc_id: str | None, prefix: str = "",
                 inline: bool = False) -> Passage:
        s = self.source
        pid = pid or get_field(rec, "pid", str, source=s, where=where, prefix=prefix)
        text = get_field(rec, "text", str, source=s, where=where, prefix=prefix)
        if not text.strip():
            raise DataError(s, where, f"{prefix}text", "empty passage text")
        title = get_field(rec, "title", str, source=s, where=where, required=False, prefix=prefix)
        doc = get_field(rec, "doc_id", str, source=s, where=where, required=False, prefix=prefix) or doc_id or pid
        p = Passage(pid=pid, doc_id=doc, title=title, text=text)
        old = self.passages.get(pid)
        if old is not None:
            if inline and old == p:
                self.stats.notes["generic_inline_passage_repeated"] += 1
                return p
            first = self.passage_where[pid]
            raise DataError(s, where, f"{prefix}pid", f"duplicate passage pid {pid!r} (first at {first})")
        self.stats.passages_read += 1
        self.passages[pid] = p
        self.passage_where[pid] = where
        return p

    def _add_passage_record(self, where: str, rec: dict[str, Any]) -> None:
        self._passage(where, rec, pid=None, doc_id=None)

    def _add_query(self, where: str, rec: dict[str, Any]) -> None:
        s = self.source
        self.stats.queries_read += 1
        qid = get_field(rec, "qid", str, source=s, where=where)
        if qid in self.qids:
            raise DataError(s, where, "qid", f"duplicate qid {qid!r} (first at {self.qids[qid]})")
        self.qids[qid] = where
        question = get_question(rec, "question", source=s, where=where)
        answers = dedup(get_str_list(rec, "answers", source=s, where=where))
        doc_id = get_field(rec, "doc_id", str, source=s, where=where, required=False)
        split = get_field(rec, "split", str, source=s, where=where, required=False)
        if split is not None and split not in SPLITS:
            raise DataError(s, where, "split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
        has_gold, has_inline = rec.get("gold_pids") is not None, rec.get("passages") is not None
        if has_gold == has_inline:
            raise DataError(s, where, "gold_pids/passages", "give exactly one of gold_pids and passages")
        gold: tuple[str, ...]
        reason = None
        if has_gold:
            gold = dedup(get_str_list(rec, "gold_pids", source=s, where=where))
            if not gold:
                raise DataError(s, where, "gold_pids", "empty list (use inline passages for queries without gold)")
        else:
            own_doc = doc_id or qid
            marked: list[str] = []
            for i, item in enumerate(get_field(rec, "passages", list, source=s, where=where)):
                prefix = f"passages[{i}]."
                pid = get_field(item, "pid", str, source=s, where=where, required=False, prefix=prefix)
                p = self._passage(where, item, pid=pid or f"{qid}#{i}", doc_id=own_doc, prefix=prefix, inline=True)
                if get_field(item, "gold", bool, source=s, where=where, required=False, default=False, prefix=prefix):
                    marked.append(p.pid)
            gold = tuple(marked)
            reason = None if gold else "no_gold_marked"
            doc_id = own_doc
        if not answers:
            self.stats.skipped["no_answer"] += 1
            return
        q = Query(qid=qid, doc_id=doc_id or "", question=question, answers=answers, gold_pids=gold,
                  match_texts=answers, split=self.split or split, no_gold_reason=reason, where=where)
        self.queries.append((q, doc_id))

    def finish(self) -> Chunk:
        """The chunk; resolves default doc_ids and checks that every gold pid names a passage."""
        queries: list[Query] = []
        for q, doc_id in self.queries:
            for pid in q.gold_pids:
                if pid not in self.passages:
                    raise DataError(self.source, q.where, "gold_pids", f"unknown passage pid {pid!r}")
            if not doc_id:
                q = Query(**{**q.__dict__, "doc_id": self.passages[q.gold_pids[0]].doc_id})
            queries.append(q)
        return Chunk(passages=list(self.passages.values()), queries=queries, split=self.split)


def load_generic(path: Path, split: str | None, stats: LoadStats) -> Iterator[Chunk]:
    """The whole generic JSONL/Parquet file as one :class:`Chunk`."""
    builder = GenericBuilder(path, split, stats)
    for where, rec in iter_generic_records(path):
        builder.add(where, rec)
    yield builder.finish()
