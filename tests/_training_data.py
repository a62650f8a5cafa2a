"""A tiny run directory for the training tests: fictional documents, questions, pools, utilities, teacher scores.

The utilities and teacher scores follow the shape real labels have (gold passage clearly useful, same-document
passages a little, other documents not at all, plus noise), so the models have something real to learn.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from uae_ray.data import schema
from uae_ray.runtime import RunDir

THINGS = ["Zorblat", "Quimble", "Frandor", "Velloch", "Truxby", "Ostrenn", "Palquin", "Hemsley", "Drovik", "Salvane",
          "Korrim", "Ytterfel", "Blensow", "Carvath", "Munderlo", "Gessaly"]
COLORS = ["blue", "green", "amber", "violet", "crimson", "silver", "ochre", "teal"]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Perth", "Tunis", "Lima", "Riga"]


def build_tiny_run(root: str, n_docs: int = 16, seed: int = 0) -> RunDir:
    """Write corpus, queries, candidates, utilities/ and teacher_scores.parquet into ``root``; return its RunDir."""
    rng = np.random.default_rng(seed)
    rd = RunDir(root)
    corpus: dict[str, list] = {"pid": [], "doc_id": [], "title": [], "text": [], "n_tokens": []}
    queries: dict[str, list] = {"qid": [], "doc_id": [], "question": [], "answers": [], "gold_pids": [], "split": []}
    for d in range(n_docs):
        name, doc = THINGS[d % len(THINGS)] + (str(d // len(THINGS)) if d >= len(THINGS) else ""), f"doc{d:02d}"
        color, city, year = COLORS[d % len(COLORS)], CITIES[(d * 3) % len(CITIES)], 1800 + 7 * d
        texts = [
            f"The {name} is a rare creature whose feathers are {color} in every season.",
            f"The {name} was first described by explorers near {city}.",
            f"Scientists catalogued the {name} in the year {year} after a long expedition.",
        ]
        for i, t in enumerate(texts):
            corpus["pid"].append(f"{doc}#{i}")
            corpus["doc_id"].append(doc)
            corpus["title"].append(name)
            corpus["text"].append(t)
            corpus["n_tokens"].append(len(t.split()))
        split = "dev" if d % 8 == 7 else "train"
        for j, (q, a) in enumerate([(f"What color are the feathers of the {name}?", color),
                                    (f"Near which city was the {name} first described?", city)]):
            queries["qid"].append(f"{doc}-q{j}")
            queries["doc_id"].append(doc)
            queries["question"].append(q)
            queries["answers"].append([a])
            queries["gold_pids"].append([f"{doc}#{j}"])
            queries["split"].append(split)
    rd.write_table(schema.CORPUS, pa.Table.from_pydict(corpus, schema=schema.CORPUS_SCHEMA))
    rd.write_table(schema.QUERIES, pa.Table.from_pydict(queries, schema=schema.QUERIES_SCHEMA))

    cand: dict[str, list] = {"qid": [], "pid": [], "rank": [], "base_score": [], "is_gold": []}
    util: dict[str, list] = {k: [] for k in schema.UTILITIES_SCHEMA.names}
    teach: dict[str, list] = {"qid": [], "pid": [], "teacher_score": []}
    pids = corpus["pid"]
    for qid, doc, gold in zip(queries["qid"], queries["doc_id"], queries["gold_pids"], strict=True):
        own = [p for p in pids if p.startswith(doc + "#")]
        others = [p for p in rng.choice(pids, size=6, replace=False) if not p.startswith(doc + "#")][:4]
        pool = own + others
        base = [0.6 + 0.1 * rng.random() if p.startswith(doc) else 0.3 + 0.2 * rng.random() for p in pool]
        order = np.argsort(-np.array(base))
        for rank, k in enumerate(order):
            p = pool[k]
            is_gold = p in gold
            u = 2.0 if is_gold else (0.3 if p.startswith(doc) else -0.1)
            u += 0.1 * rng.standard_normal()
            cand["qid"].append(qid)
            cand["pid"].append(p)
            cand["rank"].append(rank)
            cand["base_score"].append(base[k])
            cand["is_gold"].append(is_gold)
            util["qid"].append(qid)
            util["pid"].append(p)
            util["logp_with"].append(-1.0 + u)
            util["logp_without"].append(-1.0)
            util["n_answer_tokens"].append(2)
            util["utility"].append(u)
            util["generator"].append("test")
            util["prompt_version"].append("v1")
            teach["qid"].append(qid)
            teach["pid"].append(p)
            teach["teacher_score"].append(u + 0.2 * rng.standard_normal())
    rd.write_table(schema.CANDIDATES, pa.Table.from_pydict(cand, schema=schema.CANDIDATES_SCHEMA))
    rd.write_table(f"{schema.UTILITIES}/part-00000.parquet", pa.Table.from_pydict(util, schema=schema.UTILITIES_SCHEMA))
    rd.write_table(schema.TEACHER_SCORES, pa.Table.from_pydict(teach, schema=schema.TEACHER_SCORES_SCHEMA))
    return rd
