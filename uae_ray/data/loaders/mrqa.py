"""MRQA 2019 shared-task JSON lines (SQuAD, NewsQA, TriviaQA, HotpotQA, ...), gzipped or not.

Line 1 may be a header ``{"header": {"dataset", "split"}}``; every other line is a context
``{id, context, qas: [{qid, question, answers: [str], detected_answers}]}``.

- The context is the document and its only passage: doc_id = the line's ``id`` when non-empty, else
  ``{dataset}-{sha1(context)[:16]}`` (the official files leave ``id`` empty); pid = ``{doc_id}#0``. A repeated
  context gets ``-dup{n}`` appended (counted as ``mrqa_duplicate_context``).
- Gold answers are ``answers`` (``detected_answers`` texts are sometimes normalised and absent from the context);
  a question without answers is skipped (``no_answer``). The gold passage is the question's own context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

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


def load_mrqa(path: Path, split: str | None, stats: LoadStats) -> Iterator[Chunk]:
    """One :class:`Chunk` per context line of an MRQA JSONL(.gz) file."""
    dataset = "mrqa"
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"line {lineno}"
        if "header" in obj:
            if lineno != 1:
                raise DataError(path, where, "header", "a header is only allowed on line 1")
            header = get_field(obj, "header", dict, source=path, where=where)
            name = get_field(header, "dataset", str, source=path, where=where, required=False, prefix="header.")
            dataset = (name or dataset).strip().lower() or "mrqa"
            continue
        context = get_field(obj, "context", str, source=path, where=where)
        line_id = get_field(obj, "id", str, source=path, where=where, required=False, default="")
        doc_id = line_id.strip() or f"{dataset}-{hashlib.sha1(context.encode('utf-8')).hexdigest()[:16]}"
        n = seen.get(doc_id, 0)
        seen[doc_id] = n + 1
        if n:
            stats.notes["mrqa_duplicate_context"] += 1
            doc_id = f"{doc_id}-dup{n}"
        pid = f"{doc_id}#0"
        chunk = Chunk(split=split)
        chunk.add_passage(Passage(pid=pid, doc_id=doc_id, title=None, text=context), stats)
        for qi, qa in enumerate(get_field(obj, "qas", list, source=path, where=where)):
            qwhere = f"{where} / qas[{qi}]"
            stats.queries_read += 1
            qid = get_field(qa, "qid", str, source=path, where=qwhere, required=False) or get_field(
                qa, "id", str, source=path, where=qwhere, prefix="qid or ")
            question = get_question(qa, "question", source=path, where=qwhere)
            answers = dedup(get_str_list(qa, "answers", source=path, where=qwhere))
            if not answers:
                stats.skipped["no_answer"] += 1
                continue
            if not context.strip():
                stats.skipped["empty_context"] += 1
                continue
            chunk.queries.append(Query(qid=qid, doc_id=doc_id, question=question, answers=answers, gold_pids=(pid,),
                                       match_texts=answers, split=split, where=qwhere))
        yield chunk
