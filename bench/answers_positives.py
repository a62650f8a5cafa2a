"""How well each annotation-free positive rule finds the annotated evidence on the *train* pools (issue #15).

UAE from answers alone trains the student on a positive picked without any passage annotation: the teacher's top
passage of the base encoder's pool, or (distant supervision) a passage that contains an answer string. This script
reads one run dir's train pools (``candidates.parquet``), utility labels (``utilities``), teacher scores (where
``score-reward`` ran) and the queries' annotated evidence, and reports for each rule how many train questions get a
positive (coverage) and how many of those positives are annotated evidence (precision): the annotation is read only
here, as the yardstick, never by a rule. Writes ``<out>.json`` and prints a markdown table.

    python bench/answers_positives.py --run-dir runs/qasper_answers --out bench/results/answers_positives
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from uae_ray.data.schema import CANDIDATES, QUERIES, TEACHER_SCORES, UTILITIES
from uae_ray.storage import RunDir
from uae_ray.training.data import answer_patterns, contains_answer

#: One rule: (pool pids in rank order, their utilities, teacher scores or None, passage texts, answer patterns)
#: -> the chosen positive pid or None (no positive: the question is skipped).
Rule = Callable[[list[str], np.ndarray, np.ndarray | None, list[str], list[str]], str | None]


def _top(pids: list[str], scores: np.ndarray) -> str:
    return pids[int(np.argmax(scores))]


def _matching(texts: list[str], patterns: list[str]) -> list[int]:
    return [i for i, t in enumerate(texts) if patterns and contains_answer(t, patterns)]


def _margin_rule(margin: float) -> Rule:
    def rule(pids, util, teacher, texts, patterns):
        order = np.argsort(-util)
        gap = util[order[0]] - util[order[1]] if len(util) > 1 else np.inf
        return pids[int(order[0])] if gap >= margin else None
    return rule


def _hybrid(pids, util, teacher, texts, patterns):
    """Among passages that contain an answer string, the highest-utility one; none contains one: utility top."""
    m = _matching(texts, patterns)
    if m:
        return pids[max(m, key=lambda i: util[i])]
    return _top(pids, util)


RULES: dict[str, Rule] = {
    "base_top": lambda pids, util, teacher, texts, patterns: pids[0],
    "answer_match_first": lambda pids, util, teacher, texts, patterns: (
        pids[_matching(texts, patterns)[0]] if _matching(texts, patterns) else None),
    "utility_top": lambda pids, util, teacher, texts, patterns: _top(pids, util),
    "teacher_top": lambda pids, util, teacher, texts, patterns: _top(pids, teacher) if teacher is not None else None,
    "answer_match_then_utility": _hybrid,
    "utility_top_margin_0.1": _margin_rule(0.1),
    "utility_top_margin_0.3": _margin_rule(0.3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True, help="output path without suffix")
    args = ap.parse_args()
    rd = RunDir(args.run_dir)
    q = rd.read_table(QUERIES).to_pydict()
    from uae_ray.data.schema import CORPUS
    corpus = rd.read_table(CORPUS, columns=["pid", "text"]).to_pydict()
    text = dict(zip(corpus["pid"], corpus["text"], strict=True))
    cand = rd.read_table(CANDIDATES, columns=["qid", "pid", "rank"]).to_pydict()
    util_t = rd.read_table(UTILITIES, columns=["qid", "pid", "utility"]).to_pydict()
    utility = {(a, b): float(u) for a, b, u in zip(util_t["qid"], util_t["pid"], util_t["utility"], strict=True)}
    teacher: dict[tuple[str, str], float] = {}
    if rd.exists(TEACHER_SCORES):
        t = rd.read_table(TEACHER_SCORES, columns=["qid", "pid", "teacher_score"]).to_pydict()
        teacher = {(a, b): float(s) for a, b, s in zip(t["qid"], t["pid"], t["teacher_score"], strict=True)}
    pools: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for qid, pid, rank in zip(cand["qid"], cand["pid"], cand["rank"], strict=True):
        pools[qid].append((int(rank), pid))
    counts = {name: {"positive": 0, "evidence": 0} for name in RULES}
    n = gold_in_pool = unlabeled = 0
    for qid, split, golds, answers in zip(q["qid"], q["split"], q["gold_pids"], q["answers"], strict=True):
        if split != args.split or qid not in pools:
            continue
        pids = [p for _, p in sorted(pools[qid])]
        if not all((qid, p) in utility for p in pids):
            unlabeled += 1
            continue
        n += 1
        gold = set(golds or [])
        gold_in_pool += bool(gold & set(pids))
        util = np.array([utility[(qid, p)] for p in pids])
        tch = np.array([teacher[(qid, p)] for p in pids]) if all((qid, p) in teacher for p in pids) else None
        texts = [text[p] for p in pids]
        patterns = answer_patterns(answers)
        for name, rule in RULES.items():
            chosen = rule(pids, util, tch, texts, patterns)
            if chosen is not None:
                counts[name]["positive"] += 1
                counts[name]["evidence"] += chosen in gold
    result = {"run_dir": args.run_dir, "split": args.split, "questions": n, "gold_in_pool": gold_in_pool,
              "skipped_unlabeled_pool": unlabeled, "rules": counts}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
    print(f"{args.run_dir} {args.split}: {n} questions with fully labeled pools ({unlabeled} skipped: pool not fully "
          f"labeled), annotated evidence in the pool for {gold_in_pool}")
    print("| rule | questions with a positive | positive is evidence | precision |")
    print("|---|---:|---:|---:|")
    for name, c in counts.items():
        prec = c["evidence"] / c["positive"] if c["positive"] else float("nan")
        print(f"| {name} | {c['positive']} | {c['evidence']} | {prec:.2f} |")


if __name__ == "__main__":
    main()
