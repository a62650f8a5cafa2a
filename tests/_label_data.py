"""A tiny label run directory shared by the label-stage tests: real questions and passages, every query x passage."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from uae_ray.data.schema import CANDIDATES, CANDIDATES_SCHEMA, CORPUS, CORPUS_SCHEMA, QUERIES, QUERIES_SCHEMA
from uae_ray.runtime import RunDir

FACTS = [
    ("Marie Curie", "Who won Nobel prizes in both physics and chemistry?",
     "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911."),
    ("Canberra", "What is the capital of Australia?", "Canberra is the capital city of Australia."),
    ("Mount Everest", "What is the highest mountain on Earth?",
     "Mount Everest, in the Himalayas, is the highest mountain above sea level."),
    ("Jupiter", "Which is the largest planet in the Solar System?",
     "Jupiter is the largest planet in the Solar System, a gas giant."),
    ("Shakespeare", "Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("oxygen", "Which gas do plants release during photosynthesis?",
     "During photosynthesis plants take in carbon dioxide and release oxygen."),
]


def write_label_run(root: Path, n_queries: int, *, filler: int = 0, n_passages: int = 4) -> tuple[RunDir, int]:
    """Run dir with corpus, queries (the last has only empty answers) and candidates: every query x the first
    ``n_passages`` passages. Query i asks FACTS[i % 6]: q0 and q6 have the same content."""
    rd = RunDir(root)
    pad = " It is a well known fact." * filler
    corpus = [{"pid": f"p{i}", "doc_id": f"d{i}", "title": "", "text": text + pad, "n_tokens": 20}
              for i, (_, _, text) in enumerate(FACTS)]
    rd.write_table(CORPUS, pa.Table.from_pylist(corpus, schema=CORPUS_SCHEMA))
    queries = []
    for i in range(n_queries):
        answer, question, _ = FACTS[i % len(FACTS)]
        answers = ["", " "] if i == n_queries - 1 else [answer]
        queries.append({"qid": f"q{i}", "doc_id": f"d{i % len(FACTS)}", "question": question, "answers": answers,
                        "gold_pids": [f"p{i % len(FACTS)}"], "split": "train"})
    rd.write_table(QUERIES, pa.Table.from_pylist(queries, schema=QUERIES_SCHEMA))
    cands = [{"qid": q["qid"], "pid": c["pid"], "rank": r, "base_score": 0.0, "is_gold": c["pid"] in q["gold_pids"]}
             for q in queries for r, c in enumerate(corpus[:n_passages])]
    rd.write_table(CANDIDATES, pa.Table.from_pylist(cands, schema=CANDIDATES_SCHEMA))
    return rd, len(cands)
