"""Evaluation on a tiny hand-built run dir with the real embedded models (BM25, MiniLM, SmolLM2 re-rankers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from uae_ray.config import EvaluateConfig, LabelConfig
from uae_ray.data import schema as S
from uae_ray.eval.rerankers import parse_permutation
from uae_ray.eval.systems import BM25System, Corpus, QueryTask, RerankSystem, run_system
from uae_ray.runtime import RunDir

DEMO = Path(__file__).resolve().parent.parent / "uae_ray" / "assets" / "demo.jsonl"


def _demo_records(n_docs: int) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in DEMO.read_text().splitlines()]
    docs = sorted({r["doc_id"] for r in recs})[:n_docs]
    passages = [r for r in recs if "question" not in r and r["doc_id"] in docs]
    queries = [r for r in recs if "question" in r and r["doc_id"] in docs]
    return passages, queries


def _tiny_run_dir(root: Path) -> tuple[RunDir, list[dict], list[dict], dict[tuple[str, str], float]]:
    passages, queries = _demo_records(2)
    rd = RunDir(root)
    rd.write_table(S.CORPUS, pa.Table.from_pylist(
        [{"pid": p["pid"], "doc_id": p["doc_id"], "title": p["title"], "text": p["text"],
          "n_tokens": len(p["text"].split())} for p in passages], schema=S.CORPUS_SCHEMA))
    rd.write_table(S.QUERIES, pa.Table.from_pylist(
        [{"qid": q["qid"], "doc_id": q["doc_id"], "question": q["question"], "answers": q["answers"],
          "gold_pids": q["gold_pids"], "split": "dev"} for q in queries], schema=S.QUERIES_SCHEMA))
    cands, utils = [], {}
    for q in queries:
        pool = [p for p in passages if p["doc_id"] == q["doc_id"]]
        for rank, p in enumerate(pool):
            cands.append({"qid": q["qid"], "pid": p["pid"], "rank": rank, "base_score": 0.0,
                          "is_gold": p["pid"] in q["gold_pids"]})
            # hand-made labels: gold 2.0, distractors -0.5, others 0.1 (the evaluation only reads them)
            utils[(q["qid"], p["pid"])] = 2.0 if p["pid"] in q["gold_pids"] else (
                -0.5 if "#d" in p["pid"] else 0.1)
    rd.write_table(S.CANDIDATES, pa.Table.from_pylist(cands, schema=S.CANDIDATES_SCHEMA))
    return rd, passages, queries, utils


def _write_utilities(rd: RunDir, utils: dict[tuple[str, str], float], label: LabelConfig) -> None:
    from uae_ray.labeling.prompts import prompt_version_for

    rows = [{"qid": q, "pid": p, "logp_with": u - 1.0, "logp_without": -1.0, "n_answer_tokens": 2, "utility": u,
             "generator": label.generator, "prompt_version": prompt_version_for(label)}
            for (q, p), u in utils.items()]
    rd.write_table(f"{S.UTILITIES}/part-00000.parquet", pa.Table.from_pylist(rows, schema=S.UTILITIES_SCHEMA))


def test_parse_permutation_is_robust():
    assert parse_permutation("[2] > [1] > [3]", 3) == ([1, 0, 2], "ok")
    assert parse_permutation("2 > 2 > 9 > [3]", 3) == ([1, 2, 0], "partial")  # repeat and out-of-range dropped
    assert parse_permutation("I cannot rank these.", 3) == ([0, 1, 2], "failed")


def test_bm25_ranks_within_candidates():
    corpus = Corpus.from_table(pa.table({"pid": ["a", "b", "c"], "doc_id": ["x", "x", "y"],
                                         "text": ["red apples grow", "blue sky today", "red red red cars"]}))
    bm = BM25System(corpus)
    assert bm.rank("red", None, 3)[0] == 2
    assert bm.rank("red", np.array([0, 1]), 2) == [0, 1]


@pytest.mark.slow
class _ReverseReranker:
    """A deterministic re-ranker that takes a known time: reverses the order, counts its calls."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def rerank(self, question: str, passages: list[str]) -> list[int]:
        import time

        time.sleep(self.seconds)
        self.calls += 1
        return list(range(len(passages)))[::-1]


def test_rerank_reuses_identical_top_k_and_charges_its_time():
    corpus = Corpus.from_table(pa.table({"pid": ["a", "b", "c", "d"], "doc_id": ["x", "x", "x", "y"],
                                         "text": ["red apple pie", "apple tart", "green pear", "blue sky"]}))
    reranker = _ReverseReranker(0.05)
    system = RerankSystem("rr", BM25System(corpus), reranker, corpus, top_k=2)
    doc_x = corpus.doc_rows["x"]
    first = run_system(system, [QueryTask("q1", "apple pie", doc_x)], corpus, k=3)
    # the same question over the same first-stage top 2 (another candidate set, as in the open setting): reused
    again = run_system(system, [QueryTask("q1", "apple pie", np.arange(4)), QueryTask("q2", "blue sky", None)],
                       corpus, k=3)
    assert reranker.calls == 2  # q1 once, q2 once
    assert first.column("pids").to_pylist() == [["b", "a", "c"]]  # BM25 a > b, reversed, c keeps its place
    assert again.column("pids").to_pylist()[0] == ["b", "a", "c"]
    assert again.column("reused").to_pylist() == [True, False] and first.column("reused").to_pylist() == [False]
    # the reused query is charged the measured re-ranking time, not the ~0 s of a dictionary lookup
    assert again.column("latency_s").to_pylist()[0] >= 0.05
    assert system.pop_replayed_seconds() == 0.0


def test_evaluate_tiny_run_dir(tmp_path: Path):
    from uae_ray.models.registry import resolve
    from uae_ray.stages import evaluate

    rd, passages, queries, utils = _tiny_run_dir(tmp_path / "run")
    label = LabelConfig(max_passage_tokens=64)
    # labels only for the pool of the first query: the rest must be labeled on demand for ExpUtil
    first = queries[0]["qid"]
    _write_utilities(rd, {k: v for k, v in utils.items() if k[0] == first}, label)
    # a student encoder directory (here: a copy of the base MiniLM) so the UAE system exists
    enc = rd.local_path(S.ENCODER)
    shutil.copytree(resolve("all-minilm-l6-v2").path, enc)
    (enc / "_SUCCESS").write_text("ok\n")
    cfg = EvaluateConfig(split="dev", label=label, ks=[1, 3], exp_util_ks=[1], rerank_top_k=3, rankgpt_window=3,
                         rankgpt_step=2, llm_rerank_max_queries=1, generate_max_queries=2, max_new_tokens=4,
                         open_scope="corpus", llm_dtype="float32")
    summary = evaluate.run(cfg, rd)

    report = json.loads((rd.local_path(S.EVAL) / "report.json").read_text())
    pool = report["settings"]["pool"]
    assert set(pool["systems"]) == {"bm25", "base", "uae", "upr", "rankgpt"}
    assert "train-encoder" in pool["skipped"]["infonce"] and "train-reward" in pool["skipped"]["reward_rerank"]
    assert pool["systems"]["upr"]["n_queries"] == 1 and pool["systems"]["bm25"]["n_queries"] == len(queries)
    # Recall@1 of the base encoder, recomputed independently from MiniLM vectors
    from uae_ray.models.encoder import encode, load_encoder

    m = load_encoder("all-minilm-l6-v2")
    hits = []
    for q in queries:
        pool_p = [p for p in passages if p["doc_id"] == q["doc_id"]]
        s = encode(m, [p["text"] for p in pool_p]) @ encode(m, [q["question"]])[0]
        hits.append(pool_p[int(np.argmax(s))]["pid"] in q["gold_pids"])
    assert pool["systems"]["base"]["recall@1"] == pytest.approx(float(np.mean(hits)))
    # ExpUtil@1 of the base system = mean hand-made utility of its top-1 passages (others labeled on demand)
    ranks = rd.read_table(f"{S.EVAL}/rankings/pool__base.parquet").to_pylist()
    assert report["labels"]["labeled_on_demand"] > 0
    on_demand = rd.read_table(f"{S.EVAL}/utilities_on_demand.parquet").to_pylist()
    stored = {k for k in utils if k[0] == first}
    assert not stored & {(r["qid"], r["pid"]) for r in on_demand}  # stored labels are never relabeled
    known = {**{(r["qid"], r["pid"]): r["utility"] for r in on_demand}, **{k: v for k, v in utils.items()
                                                                         if k[0] == first}}
    expected = np.mean([known[(r["qid"], r["pids"][0])] for r in ranks])
    assert pool["systems"]["base"]["exputil@1"] == pytest.approx(expected, abs=1e-5)
    # latency and speed-up are measured; generation metrics exist; plots written
    assert pool["systems"]["upr"]["latency"]["mean_ms"] > pool["systems"]["base"]["latency"]["mean_ms"]
    assert set(summary["speedup_vs_llm"]["pool"]) == {"upr", "rankgpt"}
    assert pool["systems"]["base"]["generation"]["f1@1"] is not None
    assert sum(pool["rankgpt_parse"].values()) > 0
    for png in report["plots"]:
        assert (rd.local_path(S.EVAL) / png).read_bytes()[:4] == b"\x89PNG"
    assert "| uae |" in (rd.local_path(S.EVAL) / "report.md").read_text()
    # open setting over the whole corpus exists too; a rerun reuses stored rankings
    assert report["settings"]["open"]["systems"]["bm25"]["n_queries"] == len(queries)
    before = (rd.local_path(S.EVAL) / "rankings" / "pool__upr.parquet").stat().st_mtime_ns
    evaluate.run(cfg, rd)
    assert (rd.local_path(S.EVAL) / "rankings" / "pool__upr.parquet").stat().st_mtime_ns == before


def test_evaluate_retrievers_only_report_and_skips(tmp_path: Path):
    """BM25 + base + UAE (missing: skipped with the reason) in both settings; no generator needed."""
    from uae_ray.stages import evaluate

    rd, _, queries, utils = _tiny_run_dir(tmp_path / "run")
    label = LabelConfig()
    _write_utilities(rd, utils, label)
    cfg = EvaluateConfig(split="dev", label=label, systems=["bm25", "base", "uae"], ks=[1, 2], exp_util_ks=[1],
                         generate=False, open_scope="document")
    evaluate.run(cfg, rd)
    report = json.loads((rd.local_path(S.EVAL) / "report.json").read_text())
    for setting in ("pool", "open"):
        block = report["settings"][setting]
        assert set(block["systems"]) == {"bm25", "base"}
        assert "encoder" in block["skipped"]["uae"]
        for m in block["systems"].values():
            assert m["n_queries"] == len(queries)
            assert 0.0 <= m["recall@1"] <= m["recall@2"] <= 1.0
            assert m["latency"]["n"] == len(queries)
    # document-scoped open retrieval ranks the same passages as the pool here: identical rankings
    pool = rd.read_table(f"{S.EVAL}/rankings/pool__base.parquet").to_pylist()
    open_ = rd.read_table(f"{S.EVAL}/rankings/open__base.parquet").to_pylist()
    assert [r["pids"] for r in pool] == [r["pids"] for r in open_]
    # every top-1 passage is labeled: ExpUtil@1 is the mean hand-made utility of the top-1 passages
    expected = np.mean([utils[(r["qid"], r["pids"][0])] for r in pool])
    assert report["settings"]["pool"]["systems"]["base"]["exputil@1"] == pytest.approx(expected, abs=1e-5)
    md = (rd.local_path(S.EVAL) / "report.md").read_text()
    assert "## pool setting" in md and "skipped `uae`" in md
    assert all((rd.local_path(S.EVAL) / p).exists() for p in report["plots"])
