"""Hugging Face ``datasets``: a hub id (online machines) or a folder written by ``Dataset(Dict).save_to_disk``.

After loading, rows go through the same code as the files: ``hf_layout`` says how rows are laid out:

- ``qasper``: one paper per row as on the hub (``allenai/qasper``: id, title, abstract, full_text, qas, where nested
  sequences may come column-wise, ``{"question": [...], "question_id": [...]}``); converted to the official layout
  and passed to the QASPER loader.
- ``squad``: one question per row (id, title, context, question, answers: {text: [...], answer_start: [...]}), as
  ``rajpurkar/squad`` / ``squad_v2``; consecutive rows with the same context form a paragraph. Hub rows carry no
  ``is_impossible``: a question without answers (v2's impossible ones) is skipped as ``no_answer``.
- ``generic``: each row is a generic record (see :mod:`uae_ray.data.loaders.generic`).

Hub split names map to ours: train -> train, validation/dev -> dev, test -> test. A dataset with a single split, or
a split with another name, is divided by document with ``split_ratios``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uae_ray.data.loaders.common import Chunk, DataError, LoadStats
from uae_ray.data.loaders.generic import GenericBuilder
from uae_ray.data.loaders.qasper import paper_to_chunk
from uae_ray.data.loaders.squad import paragraph_to_chunk

SPLIT_NAMES = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}


def load_hf_dataset(dataset: str, config: str | None) -> dict[str, Any]:
    """{hub split name: Dataset} for a saved folder or a hub id; errors name the dataset."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(dataset, None, None, "the `datasets` package is not installed (pip install datasets)") from e
    try:
        if Path(dataset).expanduser().is_dir():
            loaded = datasets.load_from_disk(str(Path(dataset).expanduser()))
        else:
            loaded = datasets.load_dataset(dataset, config)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise DataError(dataset, None, None, f"could not load the dataset: {type(e).__name__}: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded.items())
    return {"train": loaded} if not hasattr(loaded, "items") else dict(loaded.items())


def _records(value: Any) -> list[Any]:
    """A list of records from either a list of dicts or a column-wise dict of equal-length lists."""
    if isinstance(value, dict):
        keys = list(value)
        n = len(value[keys[0]]) if keys else 0
        return [{k: value[k][i] for k in keys} for i in range(n)]
    return list(value or [])


def hub_paper_to_official(row: dict[str, Any]) -> dict[str, Any]:
    """An ``allenai/qasper`` hub row in the official release layout."""
    qas = []
    for qa in _records(row.get("qas")):
        qa = dict(qa)
        anns = []
        for ann in _records(qa.get("answers")):
            ann = dict(ann)
            if isinstance(ann.get("answer"), list):  # column-wise leftovers: one answer per annotation
                ann["answer"] = ann["answer"][0] if ann["answer"] else None
            anns.append(ann)
        qa["answers"] = anns
        qas.append(qa)
    return {**row, "full_text": _records(row.get("full_text")), "qas": qas,
            "figures_and_tables": _records(row.get("figures_and_tables"))}


def _qasper_rows(name: str, rows: Any, split: str | None, stats: LoadStats, source: str) -> Iterator[Chunk]:
    for i, row in enumerate(rows):
        paper_id = row.get("id")
        if not isinstance(paper_id, str) or not paper_id:
            raise DataError(source, f"{name} row {i}", "id", "missing paper id")
        yield paper_to_chunk(paper_id, hub_paper_to_official(row), source=source, where=f"{name} row {i}",
                             split=split, stats=stats)


def _squad_rows(name: str, rows: Any, split: str | None, stats: LoadStats, source: str) -> Iterator[Chunk]:
    para: dict[str, Any] | None = None
    key: tuple[str, str] | None = None
    index: dict[str, int] = {}
    for i, row in enumerate(rows):
        title, context = str(row.get("title") or ""), row.get("context")
        if not isinstance(context, str):
            raise DataError(source, f"{name} row {i}", "context", "missing or not a string")
        ans = row.get("answers") or {}
        answers = [{"text": t, "answer_start": s} for t, s in zip(ans.get("text", []), ans.get("answer_start", []),
                                                                    strict=False)]
        qa = {"id": row.get("id"), "question": row.get("question"), "answers": answers}
        if para is not None and key == (title, context):
            para["qas"].append(qa)
            continue
        if para is not None and key is not None:
            yield _flush(para, key[0], index, name, source, split, stats)
        para, key = {"context": context, "qas": [qa], "first_row": i}, (title, context)
    if para is not None and key is not None:
        yield _flush(para, key[0], index, name, source, split, stats)


def _flush(para: dict[str, Any], title: str, index: dict[str, int], name: str, source: str, split: str | None,
           stats: LoadStats) -> Chunk:
    doc_id = title or "untitled"
    j = index.get(doc_id, 0)
    index[doc_id] = j + 1
    return paragraph_to_chunk(para, doc_id=doc_id, title=title or None, index=j, source=source,
                              where=f"{name} rows from {para['first_row']}", split=split, stats=stats)


def load_hf(dataset: str, config: str | None, layout: str, split: str | None, stats: LoadStats) -> Iterator[Chunk]:
    """Chunks of every split of a hub dataset or a saved folder, laid out as ``layout``."""
    splits = load_hf_dataset(dataset, config)
    for name, rows in splits.items():
        ours = split or (SPLIT_NAMES.get(name) if len(splits) > 1 else None)
        if len(splits) > 1 and ours is None:
            stats.notes[f"hf_split_{name}_assigned_by_document"] += 1
        if layout == "qasper":
            yield from _qasper_rows(name, rows, ours, stats, dataset)
        elif layout == "squad":
            yield from _squad_rows(name, rows, ours, stats, dataset)
        else:
            builder = GenericBuilder(dataset, ours, stats)
            for i, row in enumerate(rows):
                builder.add(f"{name} row {i}", row)
            yield builder.finish()
