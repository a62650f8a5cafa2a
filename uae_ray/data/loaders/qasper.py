"""QASPER (AI2's official release JSON): paragraphs are passages, the paper is the document.

Layout: ``{paper_id: {title, abstract, full_text: [{section_name, paragraphs: [str]}], figures_and_tables,
qas: [{question, question_id, answers: [{annotation_id, worker_id, answer: {unanswerable, extractive_spans,
yes_no, free_form_answer, evidence, highlighted_evidence}}]}]}}``.

- pid = ``{paper_id}#{k}``, k the position of the paragraph in the paper's flattened ``full_text`` (empty paragraphs
  keep their number but are skipped, counted as ``empty_text``). The abstract is not a passage.
- Answers (one per answerable annotation, de-duplicated): the extractive spans joined with ", ", else the
  free-form answer, else "Yes"/"No". Unanswerable annotations give none; a question with no answer is skipped
  (``no_answerable_annotation``).
- Gold passages: the evidence of answerable annotations, matched to paragraphs exactly, else after whitespace
  normalisation. Evidence starting with "FLOAT SELECTED" is a figure/table, not a passage. A question with no
  resolved evidence gets ``no_gold_reason`` ``no_text_evidence`` (only figure/table or no evidence) or
  ``evidence_not_found`` (text evidence that matches no paragraph, e.g. a section name).
- ``match_texts`` are the extractive spans: of a gold paragraph split into windows, those containing a span stay gold.
Optional fields (abstract, highlighted_evidence, worker_id, figures_and_tables, question-writer fields) may be
empty or absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    normalize_ws,
)
from uae_ray.data.loaders.jsonstream import iter_json_object

FLOAT_PREFIX = "FLOAT SELECTED"


def load_qasper(path: Path, split: str | None, stats: LoadStats) -> Iterator[Chunk]:
    """One :class:`Chunk` per paper of a QASPER JSON file (streamed member by member)."""
    for paper_id, paper, line in iter_json_object(path):
        yield paper_to_chunk(paper_id, paper, source=path, where=f"paper {paper_id} (line {line})", split=split,
                             stats=stats)


def _paragraphs(paper: dict[str, Any], source: str | Path, where: str) -> list[str]:
    sections = get_field(paper, "full_text", list, source=source, where=where)
    out: list[str] = []
    for i, section in enumerate(sections):
        out.extend(get_str_list(section, "paragraphs", source=source, where=where, prefix=f"full_text[{i}]."))
    return out


def _annotation(ann: Any, source: str | Path, where: str, prefix: str) -> tuple[str | None, list[str], list[str]]:
    """(answer or None, extractive spans, evidence) of one annotation."""
    answer = get_field(ann, "answer", dict, source=source, where=where, prefix=prefix)
    p = f"{prefix}answer."
    unanswerable = get_field(answer, "unanswerable", bool, source=source, where=where, required=False,
                             default=False, prefix=p)
    spans = get_str_list(answer, "extractive_spans", source=source, where=where, required=False, prefix=p)
    free = get_field(answer, "free_form_answer", str, source=source, where=where, required=False, default="", prefix=p)
    yes_no = get_field(answer, "yes_no", bool, source=source, where=where, required=False, prefix=p)
    evidence = get_str_list(answer, "evidence", source=source, where=where, required=False, prefix=p)
    get_str_list(answer, "highlighted_evidence", source=source, where=where, required=False, prefix=p)
    if unanswerable:
        return None, [], []
    spans = [s.strip() for s in spans if s.strip()]
    if spans:
        return ", ".join(spans), spans, evidence
    if free.strip():
        return free.strip(), [], evidence
    if yes_no is not None:
        return ("Yes" if yes_no else "No"), [], evidence
    return None, [], evidence


def _resolve_evidence(
    evidence: list[str], exact: dict[str, list[str]], normalized: dict[str, list[str]], stats: LoadStats
) -> tuple[tuple[str, ...], str | None]:
    """Gold pids for evidence strings, and the reason when there are none."""
    text_evidence = [e for e in evidence if e.strip() and not e.startswith(FLOAT_PREFIX)]
    if not text_evidence:
        return (), "no_text_evidence"
    stats.notes["qasper_questions_with_text_evidence"] += 1
    gold: list[str] = []
    for e in text_evidence:
        pids = exact.get(e)
        if pids is None:
            pids = normalized.get(normalize_ws(e))
            if pids is not None:
                stats.notes["qasper_evidence_matched_after_whitespace_normalisation"] += 1
        if pids is None:
            stats.notes["qasper_evidence_strings_unmatched"] += 1
            continue
        gold.extend(pids)
    if not gold:
        return (), "evidence_not_found"
    stats.notes["qasper_text_evidence_resolved"] += 1
    return tuple(dict.fromkeys(gold)), None


def paper_to_chunk(
    paper_id: str, paper: Any, *, source: str | Path, where: str, split: str | None, stats: LoadStats
) -> Chunk:
    """Passages and usable queries of one paper in the official layout (also used for hub rows, converted)."""
    if not isinstance(paper, dict):
        raise DataError(source, where, None, f"expected a paper object, got {type(paper).__name__}")
    title = get_field(paper, "title", str, source=source, where=where, required=False, default="")
    chunk = Chunk(split=split)
    exact: dict[str, list[str]] = {}
    normalized: dict[str, list[str]] = {}
    for k, text in enumerate(_paragraphs(paper, source, where)):
        pid = f"{paper_id}#{k}"
        if not chunk.add_passage(Passage(pid=pid, doc_id=paper_id, title=title or None, text=text), stats):
            continue
        exact.setdefault(text, []).append(pid)
        normalized.setdefault(normalize_ws(text), []).append(pid)
    for qi, qa in enumerate(get_field(paper, "qas", list, source=source, where=where)):
        qwhere = f"{where} / qas[{qi}]"
        stats.queries_read += 1
        qid = get_field(qa, "question_id", str, source=source, where=qwhere)
        question = get_question(qa, "question", source=source, where=qwhere)
        answers: list[str] = []
        spans: list[str] = []
        evidence: list[str] = []
        for ai, ann in enumerate(get_field(qa, "answers", list, source=source, where=qwhere)):
            answer, a_spans, a_evidence = _annotation(ann, source, qwhere, f"answers[{ai}].")
            if answer is None:
                continue
            answers.append(answer)
            spans.extend(a_spans)
            evidence.extend(a_evidence)
        if not answers:
            stats.skipped["no_answerable_annotation"] += 1
            continue
        gold, reason = _resolve_evidence(evidence, exact, normalized, stats)
        chunk.queries.append(
            Query(qid=qid, doc_id=paper_id, question=question, answers=dedup(answers), gold_pids=gold,
                  match_texts=dedup(spans), split=split, no_gold_reason=reason, where=qwhere)
        )
    return chunk
