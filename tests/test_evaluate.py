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
    from uae_ray.stages import evaluate

    rd, passages, queries, utils = _tiny_run_dir(tmp_path / "run")
    label = LabelConfig(max_passage_tokens=64)
    # labels only for the pool of the first query: the rest must be labeled on demand for ExpUtil
    first = queries[0]["qid"]
    _write_utilities(rd, {k: v for k, v in utils.items() if k[0] == first}, label)
    # a student encoder directory (here: a copy of the base MiniLM, calibrated on the stored labels) so UAE exists
    _student_with_calibration(rd)
    cfg = EvaluateConfig(split="dev", label=label, ks=[1, 3], exp_util_ks=[1, 2], rerank_top_k=3, rankgpt_window=3,
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
    # adaptive k against fixed k: Token F1 on the generated subset; fixed k = 1 is the main table's F1@1 of UAE
    row = report["calibration"]["adaptive_k"]["pool"]["rows"][0]
    assert row["fixed_k"] == 1 and row["f1_n"] == 2
    assert row["f1_fixed"] == pytest.approx(pool["systems"]["uae"]["generation"]["f1@1"])
    assert row["f1_adaptive"] is not None and row["f1_diff"]["n"] == 2
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
    # paired differences against the base encoder, recomputed from the stored rankings; no student: no calibration
    bm25 = rd.read_table(f"{S.EVAL}/rankings/pool__bm25.parquet").to_pylist()
    gold = {q["qid"]: set(q["gold_pids"]) for q in queries}
    diff = np.mean([(b["pids"][0] in gold[b["qid"]]) - (r["pids"][0] in gold[r["qid"]])
                    for b, r in zip(bm25, pool, strict=True)])
    res = report["settings"]["pool"]["comparisons"]["base"]["bm25"]["recall@1"]
    assert res["n"] == len(queries) and res["diff"] == pytest.approx(diff) and res["ci_low"] <= diff <= res["ci_high"]
    assert "infonce" not in report["settings"]["pool"]["comparisons"] and "| bm25 | base |" in md
    assert "encoder" in report["calibration"]["skipped"]


def _student_with_calibration(rd: RunDir) -> dict:
    """A student directory (a committed copy of the base MiniLM) with its calibration fitted by train-encoder's
    step on the run's dev labels."""
    from uae_ray.eval.calibrate import calibrate_encoder
    from uae_ray.models.registry import resolve

    with rd.staged_dir(S.ENCODER) as d:
        shutil.copytree(resolve("all-minilm-l6-v2").path, d, dirs_exist_ok=True)
    return calibrate_encoder(rd, S.ENCODER, ["train"])


def test_evaluate_calibration_adaptive_k_and_intervals(tmp_path: Path):
    """The student's calibration (committed into encoder/), its decile table, adaptive k against fixed k, and the
    paired statistics; the student is a copy of the base encoder, so every difference to base is exactly 0."""
    from uae_ray.calibration import load_calibration
    from uae_ray.stages import evaluate

    rd, _, queries, utils = _tiny_run_dir(tmp_path / "run")
    label = LabelConfig()
    _write_utilities(rd, utils, label)
    summary = _student_with_calibration(rd)
    enc = rd.local_path(S.ENCODER)
    record = json.loads((enc / "_SUCCESS").read_text())
    assert "calibration.json" in record["files"] and (enc / "model.safetensors").exists()  # committed with the model
    cal = load_calibration(enc / "calibration.json")
    assert cal.n_pairs == len(utils) == summary["n_pairs"] and cal.source.startswith("dev split")
    assert np.all(np.diff(cal.expected_utility(np.linspace(-1, 1, 201))) >= 0)

    cfg = EvaluateConfig(split="dev", label=label, systems=["bm25", "base", "uae"], ks=[1, 2], exp_util_ks=[1, 3],
                         generate=False, open_scope="document")
    evaluate.run(cfg, rd)
    report = json.loads((rd.local_path(S.EVAL) / "report.json").read_text())
    c = report["calibration"]
    assert c["calibration"] == "encoder/calibration.json" and c["in_sample"] is True
    assert c["n_pairs"] == len(utils) and sum(r["n"] for r in c["deciles"]) == len(utils) and len(c["deciles"]) == 10
    assert all(r["expected_cv"] is not None for r in c["deciles"])
    # the decile's measured utility is the mean hand-made label of its pairs: gold 2.0, distractors -0.5, others 0.1
    assert all(-0.5 <= r["measured"] <= 2.0 for r in c["deciles"])
    assert np.all(np.diff([r["expected"] for r in c["deciles"]]) >= 0)
    for setting in ("pool", "open"):
        block = c["adaptive_k"][setting]
        assert block["n_queries"] == len(queries) and [r["fixed_k"] for r in block["rows"]] == [1, 2]
        row = block["rows"][0]
        # fixed k = 1 is the ExpUtil@1 of the student in the main table (same queries, same labels)
        assert row["exputil_fixed"] == pytest.approx(report["settings"][setting]["systems"]["uae"]["exputil@1"])
        # the floor's mean k is the closest the calibration's levels allow (exact matching: test_calibration.py)
        assert sum(row["k_hist"].values()) == len(queries) == len(row["per_query_k"])
        assert row["mean_k"] == pytest.approx(sum(int(k) * n for k, n in row["k_hist"].items()) / len(queries))
        assert row["exputil_diff"]["n"] == len(queries) and row["f1_n"] == 0  # no generation in this run
        # adaptive against the fixed budget of the same mean k: fixed-k ExpUtil interpolated from k = 0 (0 nats)
        assert row["exputil_diff"]["mean_b"] == pytest.approx(row["exputil_fixed_at_mean_k"])
        if row["mean_k"] <= 1:
            assert row["exputil_fixed_at_mean_k"] == pytest.approx(row["mean_k"] * row["exputil_fixed"])
    for setting in ("pool", "open"):
        for metric in ("recall@1", "mrr", "map", "exputil@1"):
            res = report["settings"][setting]["comparisons"]["base"]["uae"][metric]
            assert res["diff"] == 0.0 and res["ci_low"] == res["ci_high"] == 0.0 and res["p_value"] == 1.0
    md = (rd.local_path(S.EVAL) / "report.md").read_text()
    assert "| score decile |" in md and "Adaptive k (pool setting)" in md and "| uae | base |" in md
    assert "calibration.png" in report["plots"]
    assert (rd.local_path(S.EVAL) / "calibration.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- paired statistics
def test_paired_difference_known_answers():
    from scipy import stats as sst

    from uae_ray.eval.stats import paired_difference

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 120).astype(float)
    same = paired_difference(a, a.copy())
    assert same["n"] == 120 and same["diff"] == 0.0 and same["ci_low"] <= 0.0 <= same["ci_high"]
    assert same["p_value"] == 1.0
    # a constant gain on 5 queries: the exact sign-flip test gives p = 2 / 2^5, the interval is the gain itself
    five = paired_difference(np.ones(5), np.zeros(5))
    assert five["diff"] == 1.0 and five["ci_low"] == five["ci_high"] == 1.0
    assert five["p_value"] == pytest.approx(2 / 32)
    # a clearly better system: +0.3 on average with noise -> the interval excludes 0 and p is tiny
    b = rng.normal(0.5, 0.2, 200)
    better = b + 0.3 + rng.normal(0, 0.2, 200)
    res = paired_difference(better, b)
    assert res["diff"] == pytest.approx(float(np.mean(better - b)))
    assert 0.0 < res["ci_low"] < res["diff"] < res["ci_high"] and res["p_value"] < 0.001
    # the bootstrap interval agrees with the t interval of the mean difference at this n (within 10% of its width)
    t_lo, t_hi = sst.ttest_rel(better, b).confidence_interval(0.95)
    assert abs(res["ci_low"] - t_lo) < 0.1 * (t_hi - t_lo) and abs(res["ci_high"] - t_hi) < 0.1 * (t_hi - t_lo)
    # a small noisy difference: the p-value of the randomization test is close to the paired t-test's
    c = b + rng.normal(0.02, 0.2, 200)
    assert paired_difference(c, b)["p_value"] == pytest.approx(sst.ttest_rel(c, b).pvalue, abs=0.03)
    with pytest.raises(ValueError, match="one length"):
        paired_difference([1.0, 2.0], [1.0])


def test_compare_systems_pairs_queries_and_skips_absent_references():
    from uae_ray.eval.stats import compare_systems, comparisons_markdown

    per_q = {"base": {"q1": {"recall@1": 0.0, "exputil@1": 0.1}, "q2": {"recall@1": 1.0, "exputil@1": None},
                      "q3": {"recall@1": 0.0, "exputil@1": 0.3}},
             "uae": {"q1": {"recall@1": 1.0, "exputil@1": 0.5}, "q2": {"recall@1": 1.0, "exputil@1": 0.2},
                     "q3": {"recall@1": 1.0, "exputil@1": 0.4}}}
    comps = compare_systems(per_q, metrics=["recall@1", "exputil@1"])
    assert set(comps) == {"base"}  # no gold-only ablation here: no comparison against it
    r1, eu = comps["base"]["uae"]["recall@1"], comps["base"]["uae"]["exputil@1"]
    assert r1["n"] == 3 and r1["diff"] == pytest.approx(2 / 3)
    assert eu["n"] == 2 and eu["diff"] == pytest.approx(0.25)  # q2 has no base ExpUtil: left out, counted in n
    md = comparisons_markdown(comps)
    assert "| uae | base | 2/3 | +66.7 [" in md and "+0.250" in md
    # the benchmark tables (bench_train.py): a column per metric against the first row
    from uae_ray.eval.stats import table_with_intervals

    rows = table_with_intervals([{"encoder": n, "per_query": per_q[n]} for n in ("base", "uae")], "encoder",
                                metrics=["recall@1"])
    assert rows[0] == {"encoder": "base", "Δrecall@1 vs base": "-"}
    assert rows[1]["Δrecall@1 vs base"].startswith("+66.7 [") and "p=" in rows[1]["Δrecall@1 vs base"]


# ------------------------------------------------------------------------ extra students, references, second output
def test_report_orders_extra_students_after_the_dense_students():
    from uae_ray.eval import plots
    from uae_ray.eval.report import SYSTEM_ORDER, markdown_table, ordered_systems
    from uae_ray.eval.stats import comparisons_markdown

    names = ["rankgpt", "kl", "bm25", "uae", "base", "other", "reward_rerank"]
    assert ordered_systems(names) == ["bm25", "base", "uae", "kl", "other", "reward_rerank", "rankgpt"]
    assert ordered_systems(["kl", "base"]) == ["base", "kl"]  # no uae: still after the dense students
    assert ordered_systems(SYSTEM_ORDER) == list(SYSTEM_ORDER)
    block = {"systems": {n: {"n_queries": 2, "recall@1": 0.5, "mrr": 0.5, "map": 0.5, "ndcg@10": 0.5,
                             "latency": {"mean_ms": 1.0}} for n in names}}
    rows = [line.split("|")[1].strip() for line in markdown_table(block, [1], [], []).splitlines()[2:]]
    assert rows == ordered_systems(names)
    res = {"n": 2, "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    comps = {"base": {n: {"recall@1": res} for n in ("rankgpt", "other", "uae")}}
    md = comparisons_markdown(comps, ordered_systems(n for b in comps.values() for n in b))
    assert [line.split("|")[1].strip() for line in md.splitlines()[2:]] == ["uae", "other", "rankgpt"]
    # plots: the built-in systems keep their style, every extra student gets its own colour and marker
    styles = plots._styles({"pool": block, "open": {"systems": {"third": {}}}})
    assert styles["uae"] == plots._STYLE["uae"] and set(styles) == {*names, "third"}
    extra = [styles[n] for n in ("kl", "other", "third")]
    builtin_colours = {c for c, _ in plots._STYLE.values()}
    assert len({c for c, _ in extra}) == 3 and not {c for c, _ in extra} & builtin_colours
    assert len({m for _, m in extra}) == 3


def test_compare_systems_with_configured_references():
    from uae_ray.eval.stats import compare_systems

    per_q = {n: {"q1": {"recall@1": v[0]}, "q2": {"recall@1": v[1]}}
             for n, v in {"base": (0.0, 0.0), "uae": (1.0, 0.0), "kl": (1.0, 1.0)}.items()}
    comps = compare_systems(per_q, metrics=["recall@1"], references=["kl", "uae", "infonce"], n_resamples=100)
    assert list(comps) == ["kl", "uae"]  # infonce not evaluated: skipped
    assert set(comps["kl"]) == {"base", "uae"} and set(comps["uae"]) == {"base", "kl"}
    # reference -> system: the system minus the reference
    assert comps["kl"]["base"]["recall@1"]["diff"] == -1.0 and comps["uae"]["kl"]["recall@1"]["diff"] == 0.5


def test_missing_student_model_is_an_error_naming_it(tmp_path: Path):
    from uae_ray.eval.runner import check_students
    from uae_ray.models.registry import ModelNotFoundError, resolve

    rd = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"evaluate\.students\.kl: .*encoder_kl is missing or incomplete"):
        check_students(EvaluateConfig(students={"kl": "run:encoder_kl"}), rd)
    (tmp_path / "run" / "encoder_kl").mkdir()  # a directory without its commit marker is not a model yet
    with pytest.raises(FileNotFoundError, match=r"students\.kl"):
        check_students(EvaluateConfig(students={"kl": "run:encoder_kl"}), rd)
    gone = str(tmp_path / "other" / "run" / "encoder")
    with pytest.raises(ModelNotFoundError, match=r"evaluate\.students\.other: .*other/run/encoder"):
        check_students(EvaluateConfig(students={"other": gone}), rd)
    with rd.staged_dir("encoder_kl") as d:
        (d / "config.json").write_text("{}")
    found = check_students(EvaluateConfig(students={"kl": "run:encoder_kl", "mini": "all-minilm-l6-v2"}), rd)
    assert found == {"kl": str(rd.local_path("encoder_kl")), "mini": resolve("all-minilm-l6-v2").path}


def test_second_evaluation_reuses_eval_caches_read_only(tmp_path: Path):
    """An evaluation writing eval_x reads the on-demand labels and the answers cached in eval/ (answers only when made
    under the same generator, prompt and decoding), and writes nothing into eval/."""
    from uae_ray.eval.runner import answer_key
    from uae_ray.labeling.prompts import prompt_version_for
    from uae_ray.stages import evaluate

    rd, _, queries, _ = _tiny_run_dir(tmp_path / "run")
    label = LabelConfig()
    main, second = EvaluateConfig(label=label), EvaluateConfig(label=label, output="eval_x")
    pv = prompt_version_for(label)
    q0 = queries[0]
    labeled = [{"qid": q0["qid"], "pid": q0["gold_pids"][0], "logp_with": 0.0, "logp_without": -1.0,
                "n_answer_tokens": 2, "utility": 1.0, "generator": label.generator, "prompt_version": pv}]
    rd.write_table(f"{S.EVAL}/{evaluate.ON_DEMAND}", pa.Table.from_pylist(labeled, schema=S.UTILITIES_SCHEMA))
    for cfg in (main, second):
        table, _ = evaluate._labels(cfg, label, rd)
        assert table.to_pylist() == [{"qid": q0["qid"], "pid": q0["gold_pids"][0], "utility": 1.0}]
    # answers of every (query, top-1) in eval/, under this evaluation's settings: nothing to generate
    qids = [q["qid"] for q in queries]
    rankings = {("pool", "base"): pa.table({"qid": qids, "pids": [q["gold_pids"] for q in queries]})}
    cached = {answer_key(q["qid"], q["gold_pids"][:1]): f"answer {i}" for i, q in enumerate(queries)}
    rd.write_table(f"{S.EVAL}/{evaluate.ANSWERS}", pa.table({"key": list(cached), "answer": list(cached.values())}))
    rd.write_json(f"{S.EVAL}/{evaluate.ANSWERS_META}", evaluate._answer_settings(second, label))
    before = {p: p.stat().st_mtime_ns for p in rd.local_path(S.EVAL).rglob("*")}
    got = evaluate._answers(second, label, rd, Corpus([], [], []), rankings, [q["question"] for q in queries],
                            {q: i for i, q in enumerate(qids)}, qids, extra=[])
    assert got == cached and not rd.exists("eval_x")
    assert {p: p.stat().st_mtime_ns for p in rd.local_path(S.EVAL).rglob("*")} == before
    # answers made under other settings are not reused; eval/ written before answers.json: its report's config says
    meta = f"{S.EVAL}/{evaluate.ANSWERS}"
    assert evaluate._answers_settings_of(rd, meta) == evaluate._answer_settings(second, label)
    rd.write_json(f"{S.EVAL}/{evaluate.ANSWERS_META}", evaluate._answer_settings(
        second.model_copy(update={"max_new_tokens": 7}), label))
    assert evaluate._answers_settings_of(rd, meta) != evaluate._answer_settings(second, label)
    rd.remove(f"{S.EVAL}/{evaluate.ANSWERS_META}")
    assert evaluate._answers_settings_of(rd, meta) is None
    rd.write_json(f"{S.EVAL}/report.json", {"config": main.model_dump(mode="json")})
    assert evaluate._answers_settings_of(rd, meta) == evaluate._answer_settings(second, label)
    rd.write_json(f"{S.EVAL}/report.json", {"config": {**main.model_dump(mode="json"), "llm_dtype": "float16"}})
    assert evaluate._answers_settings_of(rd, meta) != evaluate._answer_settings(second, label)
    rd.write_json(f"{S.EVAL}/report.json", {"config": {"no_such_setting": 1}})
    assert evaluate._answers_settings_of(rd, meta) is None


def test_evaluate_extra_student_into_its_own_output(tmp_path: Path):
    """An extra student (a committed copy of the base MiniLM in the run dir) evaluated beside bm25 and base, both
    settings, compared with compare_to, written to eval_x (eval/ untouched); a missing student fails first."""
    from uae_ray.models.registry import resolve
    from uae_ray.stages import evaluate

    rd, _, queries, utils = _tiny_run_dir(tmp_path / "run")
    label = LabelConfig()
    _write_utilities(rd, utils, label)
    with pytest.raises(FileNotFoundError, match=r"students\.copy"):
        evaluate.run(EvaluateConfig(label=label, students={"copy": "run:encoder_copy"}), rd)
    with rd.staged_dir("encoder_copy") as d:
        shutil.copytree(resolve("all-minilm-l6-v2").path, d, dirs_exist_ok=True)
    cfg = EvaluateConfig(split="dev", label=label, systems=["bm25", "base"], students={"copy": "run:encoder_copy"},
                         compare_to=["base", "copy"], ks=[1, 2], exp_util_ks=[1], generate=False,
                         open_scope="document", output="eval_x")
    summary = evaluate.run(cfg, rd)
    assert summary["report"].endswith("eval_x/report.json") and not rd.exists(S.EVAL)
    report = json.loads((rd.local_path("eval_x") / "report.json").read_text())
    assert report["comparison_method"]["references"] == ["base", "copy"]
    assert report["models"]["copy"].startswith(str(rd.local_path("encoder_copy")))
    for setting in ("pool", "open"):
        block = report["settings"][setting]
        assert list(block["systems"]) == ["bm25", "base", "copy"]
        assert block["systems"]["copy"]["n_queries"] == len(queries)
        assert block["systems"]["copy"]["latency"]["n"] == len(queries)
        assert block["systems"]["copy"]["exputil@1"] is not None
        assert set(block["comparisons"]) == {"base", "copy"}
        assert set(block["comparisons"]["copy"]) == {"bm25", "base"}
        # the student is the base encoder's weights: the same rankings, every difference exactly 0
        res = block["comparisons"]["base"]["copy"]["recall@1"]
        assert res["diff"] == 0.0 and res["p_value"] == 1.0
    base = rd.read_table("eval_x/rankings/pool__base.parquet").column("pids").to_pylist()
    assert rd.read_table("eval_x/rankings/pool__copy.parquet").column("pids").to_pylist() == base
    md = (rd.local_path("eval_x") / "report.md").read_text()
    assert "| copy |" in md and md.index("| base |") < md.index("| copy |") and "| bm25 | copy |" in md
    assert report["plots"] and all((rd.local_path("eval_x") / p).exists() for p in report["plots"])


def test_exp_util_on_a_stated_subset_of_queries(tmp_path: Path):
    """exp_util_max_queries: only the first N queries (seed order) are labeled on demand with the real generator;
    every system's ExpUtil@1 and its paired difference are over exactly those N; retrieval metrics use every query."""
    from uae_ray.eval.runner import stable_order
    from uae_ray.stages import evaluate

    rd, _, queries, _ = _tiny_run_dir(tmp_path / "run")  # no stored utilities: ExpUtil only from on-demand labels
    label = LabelConfig(max_passage_tokens=64)
    cfg = EvaluateConfig(split="dev", label=label, systems=["bm25", "base"], settings=["pool"], ks=[1, 2],
                         exp_util_ks=[1], exp_util_max_queries=2, generate=False, compare_to=["base"])
    evaluate.run(cfg, rd)
    report = json.loads((rd.local_path(S.EVAL) / "report.json").read_text())
    subset = set(stable_order([q["qid"] for q in queries], cfg.seed)[:2])
    tops = {(r["qid"], r["pids"][0]) for name in ("bm25", "base")
            for r in rd.read_table(f"{S.EVAL}/rankings/pool__{name}.parquet").to_pylist()}
    assert report["labels"]["exp_util_subset"] == 2
    assert report["labels"]["labeled_on_demand"] == len({t for t in tops if t[0] in subset}) > 0
    on_demand = rd.read_table(f"{S.EVAL}/{evaluate.ON_DEMAND}")  # only the subset's pairs were labeled
    assert set(on_demand.column("qid").to_pylist()) <= subset
    block = report["settings"]["pool"]
    for m in block["systems"].values():
        assert m["n_queries"] == len(queries) and m["exputil@1_n"] == 2 and m["recall@1"] is not None
    assert block["comparisons"]["base"]["bm25"]["exputil@1"]["n"] == 2
    assert block["comparisons"]["base"]["bm25"]["recall@1"]["n"] == len(queries)
    assert "ExpUtil on a stated subset: the first 2 of" in (rd.local_path(S.EVAL) / "report.md").read_text()
