"""SQuAD v1.1 / v2.0 JSON: ``{data: [{title, paragraphs: [{context, qas: [{id, question, is_impossible,
answers: [{text, answer_start}]}]}]}]}``.

- The article is the document (doc_id = its title, else ``article{i}``); each paragraph is a passage with pid
  ``{doc_id}#{j}``.
- Answers are the answer texts (de-duplicated). Offsets are not trusted: spans are located by text, which is what
  marks gold windows; an ``answer_start`` that does not point at its text is counted
  (``squad_answer_offset_wrong``), an answer absent from the context too (``squad_answer_not_in_context``).
- v2.0 ``is_impossible`` questions are skipped (``impossible``), answerable ones without answers too (``no_answer``).
The file is read whole (SQuAD train is 40 MB of JSON; official files are single documents, not streams).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uae_ray.data.loaders.common import (
    Chunk,
    LoadStats,
    Passage,
    Query,
    dedup,
    get_field,
    get_question,
    load_json,
)


def load_squad(path: Path, split: str | None, stats: LoadStats) -> Iterator[Chunk]:
    """One :class:`Chunk` per paragraph of a SQuAD JSON file."""
    data = get_field(load_json(path), "data", list, source=path, where="top level")
    for ai, article in enumerate(data):
        where = f"data[{ai}]"
        title = get_field(article, "title", str, source=path, where=where, required=False, default="").strip()
        doc_id = title or f"article{ai}"
        for pj, para in enumerate(get_field(article, "paragraphs", list, source=path, where=where)):
            yield paragraph_to_chunk(para, doc_id=doc_id, title=title or None, index=pj, source=path,
                                     where=f"{where}.paragraphs[{pj}]", split=split, stats=stats)


def _answers(qa: Any, context: str, *, source: str | Path, where: str, stats: LoadStats) -> tuple[str, ...]:
    texts: list[str] = []
    for k, ans in enumerate(get_field(qa, "answers", list, source=source, where=where, required=False, default=[])):
        text = get_field(ans, "text", str, source=source, where=where, prefix=f"answers[{k}].")
        start = get_field(ans, "answer_start", int, source=source, where=where, required=False,
                          prefix=f"answers[{k}].")
        if start is not None and context[start : start + len(text)] != text:
            stats.notes["squad_answer_offset_wrong"] += 1
        texts.append(text)
    answers = dedup(texts)
    if answers and not any(a in context for a in answers):
        stats.notes["squad_answer_not_in_context"] += 1
    return answers


def paragraph_to_chunk(
    para: Any, *, doc_id: str, title: str | None, index: int, source: str | Path, where: str, split: str | None,
    stats: LoadStats,
) -> Chunk:
    """The passage and usable questions of one SQuAD paragraph (also used for hub rows, grouped by context)."""
    context = get_field(para, "context", str, source=source, where=where)
    pid = f"{doc_id}#{index}"
    chunk = Chunk(split=split)
    chunk.add_passage(Passage(pid=pid, doc_id=doc_id, title=title, text=context), stats)
    for qi, qa in enumerate(get_field(para, "qas", list, source=source, where=where)):
        qwhere = f"{where}.qas[{qi}]"
        stats.queries_read += 1
        qid = get_field(qa, "id", str, source=source, where=qwhere)
        question = get_question(qa, "question", source=source, where=qwhere)
        if get_field(qa, "is_impossible", bool, source=source, where=qwhere, required=False, default=False):
            stats.skipped["impossible"] += 1
            continue
        answers = _answers(qa, context, source=source, where=qwhere, stats=stats)
        if not answers:
            stats.skipped["no_answer"] += 1
            continue
        if not context.strip():
            stats.skipped["empty_context"] += 1
            continue
        chunk.queries.append(Query(qid=qid, doc_id=doc_id, question=question, answers=answers, gold_pids=(pid,),
                                   match_texts=answers, split=split, where=qwhere))
    return chunk
