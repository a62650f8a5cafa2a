"""``uae-ray evaluate``: every system in the pool and open-retrieval settings -> eval/report.{json,md} + plots.

Everything is written under ``evaluate.output`` (``eval``; a second evaluation of the run dir, e.g. ``eval_fulldev``,
leaves ``eval/`` alone but reuses the labels and answers cached there, read-only). The systems are the built-in ones
of ``evaluate.systems`` and the extra dense ``students``, each evaluated as the built-in dense students are.

Steps (each resumable: rankings, on-demand labels and answers are stored in the output and reused when current):
rank the split's queries with every system -> label the top-k passages that have no utility yet (ExpUtil) ->
generate answers from the top contexts (Token F1, ROUGE-L) -> metrics per system and setting, paired differences with
intervals against ``compare_to`` (base and the gold-only ablation), the student's expected-utility calibration per
score decile and adaptive k against fixed k -> report and plots.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uae_ray.config import EvaluateConfig, LabelConfig
from uae_ray.data.schema import CANDIDATES, CORPUS, ENCODER, EVAL, MINE_REPORT, QUERIES, UTILITIES
from uae_ray.eval import plots
from uae_ray.eval.calibrate import CalibrationEval, evaluate_calibration, finish_adaptive, load_student_calibration
from uae_ray.eval.report import LLM_SYSTEMS, render_markdown, retrieval_metrics, speedups, summarize, utilities_by_query
from uae_ray.eval.runner import (
    answer_key,
    build_systems,
    check_students,
    fingerprint,
    generate_answers,
    label_missing,
    stable_order,
)
from uae_ray.eval.stats import COMPARED_METRICS, CONFIDENCE, N_RESAMPLES, compare_systems
from uae_ray.eval.systems import Corpus, QueryTask, run_system
from uae_ray.runtime import RunDir

log = logging.getLogger("uae_ray")
# on-demand caches, inside the evaluation's output directory
ON_DEMAND = "utilities_on_demand.parquet"
ANSWERS = "answers.parquet"
ANSWERS_META = "answers.json"  # the settings the answers were generated under (another evaluation reuses them)


def _caches(cfg: EvaluateConfig, name: str) -> list[str]:
    """Where the on-demand cache ``name`` is read: the main evaluation's ``eval/`` (read-only) when this one writes
    elsewhere, then this evaluation's own, the one written."""
    own = f"{cfg.output}/{name}"
    return [own] if cfg.output == EVAL else [f"{EVAL}/{name}", own]


def _open_scope(cfg: EvaluateConfig, run_dir: RunDir, corpus: Corpus) -> str:
    if cfg.open_scope != "auto":
        return cfg.open_scope
    if run_dir.exists(MINE_REPORT):
        scope = run_dir.read_json(MINE_REPORT).get("scope")
        if scope in ("document", "corpus"):
            return str(scope)
    return "document" if any(len(r) > 1 for r in corpus.doc_rows.values()) else "corpus"


def _pools(run_dir: RunDir, corpus: Corpus, qids: set[str]) -> dict[str, np.ndarray]:
    t = run_dir.read_table(CANDIDATES, columns=["qid", "pid", "rank"]).sort_by([("qid", "ascending"),
                                                                                ("rank", "ascending")])
    pools: dict[str, list[str]] = {}
    for q, p in zip(t.column("qid").to_pylist(), t.column("pid").to_pylist(), strict=True):
        if q in qids:
            pools.setdefault(q, []).append(p)
    return {q: corpus.rows(p) for q, p in pools.items()}


def _labels(cfg: EvaluateConfig, label: LabelConfig, run_dir: RunDir) -> tuple[pa.Table | None, dict[str, Any]]:
    """Stored utilities of this generator + prompt (label stage, then earlier on-demand labels)."""
    from uae_ray.labeling.prompts import prompt_version_for

    pv = prompt_version_for(label)
    parts, info = [], {"prompt_version": pv, "generator": label.generator}
    for name in (UTILITIES, *_caches(cfg, ON_DEMAND)):
        if not run_dir.exists(name):
            continue
        t = run_dir.read_table(name, columns=["qid", "pid", "utility", "generator", "prompt_version"])
        keep = np.asarray([g == label.generator and v == pv for g, v in zip(
            t.column("generator").to_pylist(), t.column("prompt_version").to_pylist(), strict=True)], dtype=bool)
        if (~keep).sum():
            info[f"{name}_other_prompt_rows"] = int((~keep).sum())  # counted, never mixed in
        parts.append(t.filter(pa.array(keep)).select(["qid", "pid", "utility"]))
    return (pa.concat_tables(parts) if parts else None), info


def _rank_all(cfg: EvaluateConfig, run_dir: RunDir, systems: dict[str, Any], models: dict[str, str],
              tasks: dict[str, list[QueryTask]], corpus: Corpus, depth: int) -> dict[tuple[str, str], pa.Table]:
    from tqdm.auto import tqdm

    out: dict[tuple[str, str], pa.Table] = {}
    for setting, all_tasks in tasks.items():
        for name, system in systems.items():
            sub = all_tasks[: cfg.llm_rerank_max_queries] if name in LLM_SYSTEMS and cfg.llm_rerank_max_queries \
                else all_tasks
            meta = {"system": name, "setting": setting, "qids": fingerprint([t.qid for t in sub]), "depth": depth,
                    "model": models.get(name), "generator": models.get("generator") if name in LLM_SYSTEMS else None,
                    "config": cfg.model_dump(include={"rerank_top_k", "rankgpt_window", "rankgpt_step",
                                                      "rankgpt_passage_tokens", "reward_max_length", "base_encoder",
                                                      "llm_dtype", "encoder_backend"})}
            path = f"{cfg.output}/rankings/{setting}__{name}"
            if run_dir.exists(f"{path}.json") and run_dir.read_json(f"{path}.json") == meta:
                out[(setting, name)] = run_dir.read_table(f"{path}.parquet")
                log.info("evaluate: %s / %s rankings are current, reusing", setting, name)
                continue
            with tqdm(total=len(sub), desc=f"{setting}: {name}") as bar:
                table = run_system(system, sub, corpus, k=depth, progress=bar.update)
            run_dir.write_table(f"{path}.parquet", table)
            run_dir.write_json(f"{path}.json", meta)
            out[(setting, name)] = table
    return out


def run(cfg: EvaluateConfig, run_dir: RunDir) -> dict[str, Any]:
    """Evaluate every available system; returns the headline numbers (the full report is in
    ``<output>/report.json``)."""
    label = cfg.label or LabelConfig()
    students = check_students(cfg, run_dir)  # a missing student model fails here, before any heavy work
    corpus_t = run_dir.read_table(CORPUS, columns=["pid", "doc_id", "text"])
    queries_t = run_dir.read_table(QUERIES)
    queries_t = queries_t.filter(pc.equal(queries_t.column("split"), cfg.split))
    if queries_t.num_rows == 0:
        raise ValueError(f"{run_dir.path(QUERIES)}: no queries in split {cfg.split!r} to evaluate")
    corpus = Corpus.from_table(corpus_t)
    q_rows = {q: i for i, q in enumerate(queries_t.column("qid").to_pylist())}
    qids = stable_order(list(q_rows), cfg.seed)[: cfg.max_queries]
    questions = queries_t.column("question").to_pylist()
    gold = {q: set(queries_t.column("gold_pids")[q_rows[q]].as_py()) for q in qids}
    scope = _open_scope(cfg, run_dir, corpus)

    tasks: dict[str, list[QueryTask]] = {}
    skipped_settings: dict[str, str] = {}
    if "pool" in cfg.settings:
        if run_dir.exists(CANDIDATES):
            pools = _pools(run_dir, corpus, set(qids))
            tasks["pool"] = [QueryTask(q, questions[q_rows[q]], pools[q]) for q in qids if q in pools]
            if len(tasks["pool"]) < len(qids):
                skipped_settings["pool_queries_without_pool"] = str(len(qids) - len(tasks["pool"]))
        else:
            skipped_settings["pool"] = f"{run_dir.path(CANDIDATES)} missing (run mine first)"
    if "open" in cfg.settings:
        doc_of = queries_t.column("doc_id").to_pylist()
        tasks["open"] = [QueryTask(q, questions[q_rows[q]], corpus.doc_rows.get(doc_of[q_rows[q]], np.zeros(0, int))
                                   if scope == "document" else None) for q in qids]
    open_corpus = "open" in tasks and scope == "corpus"
    if open_corpus:
        needed = np.arange(len(corpus.pids))
    else:
        parts = [t.candidates for ts in tasks.values() for t in ts if t.candidates is not None]
        needed = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    built = build_systems(cfg, label, run_dir, corpus, needed, open_corpus=open_corpus, students=students)
    depth = max([*cfg.ks, 10, cfg.rerank_top_k, *cfg.exp_util_ks, *cfg.generate_ks])
    rankings = _rank_all(cfg, run_dir, built.systems, built.models, tasks, corpus, depth)

    # ExpUtil: label the top-k passages that have no utility yet, with the run's generator and prompt.
    stored, label_info = _labels(cfg, label, run_dir)
    labels = utilities_by_query(stored)
    kmax = max(cfg.exp_util_ks)
    util_q = set(qids[: cfg.exp_util_max_queries])  # the stated ExpUtil subset (every query when None)
    missing = sorted({(q, p) for t in rankings.values() for q, ps in zip(t.column("qid").to_pylist(),
                      t.column("pids").to_pylist(), strict=True) if q in util_q
                      for p in ps[:kmax] if p not in labels.get(q, {})})
    label_info["labeled_on_demand"] = 0
    label_info["exp_util_subset"] = len(util_q)
    if missing and cfg.label_on_demand:
        log.info("evaluate: labeling %d unlabeled top-%d pairs on demand", len(missing), kmax)
        new = label_missing(label, queries_t, corpus, missing)
        own = f"{cfg.output}/{ON_DEMAND}"
        old = run_dir.read_table(own) if run_dir.exists(own) else None
        run_dir.write_table(own, pa.concat_tables([old, new]) if old is not None else new)
        label_info["labeled_on_demand"] = new.num_rows
        label_info["on_demand_skipped"] = len(missing) - new.num_rows
        stored, _ = _labels(cfg, label, run_dir)
        labels = utilities_by_query(stored)
    elif missing:
        label_info["unlabeled_top_pairs"] = len(missing)
    if cfg.exp_util_max_queries is not None:  # every system's ExpUtil on the same stated subset, none elsewhere
        labels = {q: u for q, u in labels.items() if q in util_q}

    gen_q = set(qids[: cfg.generate_max_queries]) if cfg.generate else set()
    calib = _calibration(cfg, run_dir, built, corpus, rankings, labels, questions, q_rows, qids, gen_q)
    answers = _answers(cfg, label, run_dir, corpus, rankings, questions, q_rows, qids,
                       extra=calib.contexts if calib is not None else [])
    answers_q = queries_t.column("answers").to_pylist()
    if calib is not None:
        finish_adaptive(calib.report, answers, {q: answers_q[q_rows[q]] for q in qids}, gen_q)
    report = _report(cfg, run_dir, rankings, labels, gold, answers, answers_q, q_rows, built, scope,
                     corpus, len(qids), label_info, skipped_settings,
                     calibration=calib.report if calib is not None else built.skipped.get(
                         "uae", "the student (uae) is not among evaluate.systems"))
    return {"report": run_dir.path(f"{cfg.output}/report.json"), "speedup_vs_llm": {
        s: b.get("speedup_vs_llm") for s, b in report["settings"].items()}, "skipped": built.skipped}


def _calibration(cfg: EvaluateConfig, run_dir: RunDir, built: Any, corpus: Corpus,
                 rankings: dict[tuple[str, str], pa.Table], labels: dict[str, dict[str, float]], questions: list[str],
                 q_rows: dict[str, int], qids: list[str], gen_q: set[str]) -> CalibrationEval | None:
    """The student's expected-utility calibration per score decile and adaptive k (None without a student)."""
    system = built.systems.get("uae")
    if system is None:
        return None
    trained, encoder_report = ["train"], f"{ENCODER}_report.json"  # train-encoder's report: the splits it trained on
    if run_dir.exists(encoder_report):
        trained = run_dir.read_json(encoder_report).get("config", {}).get("splits", trained)
    cal, origin = load_student_calibration(run_dir, ENCODER, str(run_dir.fetch_dir(ENCODER)), trained)
    if cal is None:
        return CalibrationEval({"skipped": origin}, [])
    return evaluate_calibration(system=system, calibration=cal, origin=origin, eval_split=cfg.split, corpus=corpus,
                                rankings=rankings, labels=labels, questions={q: questions[q_rows[q]] for q in qids},
                                qids=qids, exp_util_ks=cfg.exp_util_ks, gen_qids=gen_q)


def _answers(cfg: EvaluateConfig, label: LabelConfig, run_dir: RunDir, corpus: Corpus,
             rankings: dict[tuple[str, str], pa.Table], questions: list[str], q_rows: dict[str, int],
             qids: list[str], extra: list[tuple[str, list[str]]]) -> dict[str, str]:
    """Answers from every system's top-``generate_ks`` contexts and the ``extra`` (qid, pids) contexts; those cached
    in this evaluation's output, or in ``eval/`` under the same generator, prompt and decoding, are not generated
    again."""
    if not cfg.generate:
        return {}
    gen_q = set(qids[: cfg.generate_max_queries])
    settings = _answer_settings(cfg, label)
    own_path = f"{cfg.output}/{ANSWERS}"
    own: dict[str, str] = {}
    cached: dict[str, str] = {}
    for path in _caches(cfg, ANSWERS):
        if not run_dir.exists(path) or (path != own_path and _answers_settings_of(run_dir, path) != settings):
            continue
        t = run_dir.read_table(path)
        rows = dict(zip(t.column("key").to_pylist(), t.column("answer").to_pylist(), strict=True))
        cached.update(rows)
        if path == own_path:
            own = rows
    requests, seen = [], set(cached)
    for t in rankings.values():
        for q, ps in zip(t.column("qid").to_pylist(), t.column("pids").to_pylist(), strict=True):
            for g in cfg.generate_ks:
                key = answer_key(q, ps[:g])
                if q in gen_q and key not in seen:
                    seen.add(key)
                    requests.append((q, questions[q_rows[q]], ps[:g]))
    for q, ps in extra:
        key = answer_key(q, ps)
        if q in gen_q and key not in seen:
            seen.add(key)
            requests.append((q, questions[q_rows[q]], list(ps)))
    if requests:
        new = generate_answers(label, corpus, requests, max_new_tokens=cfg.max_new_tokens,
                               dtype=cfg.llm_dtype or label.dtype)
        cached.update(new)
        own.update(new)
        run_dir.write_table(own_path, pa.table({"key": list(own), "answer": list(own.values())}))
        run_dir.write_json(f"{cfg.output}/{ANSWERS_META}", settings)
    return cached


def _answer_settings(cfg: EvaluateConfig, label: LabelConfig) -> dict[str, Any]:
    """What an answer depends on besides its question and passages: generator, prompt, decoding."""
    from uae_ray.labeling.prompts import prompt_version_for

    return {"generator": label.generator, "prompt_version": prompt_version_for(label),
            "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.llm_dtype or label.dtype}


def _answers_settings_of(run_dir: RunDir, answers: str) -> dict[str, Any] | None:
    """The settings the cached ``answers`` were generated under: their ``answers.json``, else (written before it
    existed) the config in that evaluation's report.json; None when neither says."""
    directory = answers.rsplit("/", 1)[0]
    if run_dir.exists(f"{directory}/{ANSWERS_META}"):
        return run_dir.read_json(f"{directory}/{ANSWERS_META}")
    if not run_dir.exists(f"{directory}/report.json"):
        return None
    try:
        other = EvaluateConfig.model_validate(run_dir.read_json(f"{directory}/report.json").get("config") or {})
    except ValueError:  # a config of another uae-ray version: not comparable
        return None
    return _answer_settings(other, other.label or LabelConfig())


def _report(cfg: EvaluateConfig, run_dir: RunDir, rankings: dict[tuple[str, str], pa.Table],
            labels: dict[str, dict[str, float]], gold: dict[str, set[str]], answers: dict[str, str],
            answers_q: list[list[str]], q_rows: dict[str, int], built: Any, scope: str, corpus: Corpus,
            n_queries: int, label_info: dict[str, Any], skipped_settings: dict[str, str], *,
            calibration: dict[str, Any] | str) -> dict[str, Any]:
    from uae_ray import metrics as M

    names = [f"recall@{k}" for k in cfg.ks] + ["mrr", "map", "ndcg@10", "ndcg@10_gold"] + \
        [f"exputil@{k}" for k in cfg.exp_util_ks]
    gen_cols = [f"{m}@{g}" for g in cfg.generate_ks for m in ("f1", "rougeL")] if cfg.generate else []
    settings: dict[str, Any] = {}
    for setting in dict.fromkeys(s for s, _ in rankings):
        block: dict[str, Any] = {"systems": {}, "skipped": dict(built.skipped)}
        per_q: dict[str, dict[str, dict[str, Any]]] = {}
        lat: dict[str, dict[str, float]] = {}
        for (s, name), t in rankings.items():
            if s != setting:
                continue
            rows = {}
            for q, ps, sec in zip(t.column("qid").to_pylist(), t.column("pids").to_pylist(),
                                  t.column("latency_s").to_pylist(), strict=True):
                r = retrieval_metrics(ps, gold[q], labels.get(q), ks=cfg.ks, exp_util_ks=cfg.exp_util_ks)
                for g in cfg.generate_ks:
                    a = answers.get(answer_key(q, ps[:g]))
                    if a is not None:
                        r[f"f1@{g}"] = M.token_f1(a, answers_q[q_rows[q]])
                        r[f"rougeL@{g}"] = M.rouge_l(a, answers_q[q_rows[q]])
                rows[q] = r
                lat.setdefault(name, {})[q] = sec
            per_q[name] = rows
            block["systems"][name] = _system_block(list(rows.values()), names, gen_cols, list(lat[name].values()))
            if name in built.index_used:
                block["systems"][name]["search"] = built.index_used[name]
            if "reused" in t.column_names:  # rankings written before this column existed have none
                block["systems"][name]["reranks_reused"] = int(sum(t.column("reused").to_pylist()))
        llm = [n for n in LLM_SYSTEMS if n in per_q]
        if llm:
            shared = set.intersection(*(set(per_q[n]) for n in llm))
            block["llm_subset"] = {"n_queries": len(shared), "systems": {
                n: _system_block([r for q, r in per_q[n].items() if q in shared], names, gen_cols,
                                 [lat[n][q] for q in shared]) for n in per_q}}
        # paired differences with 95% bootstrap intervals and randomization-test p-values, on shared queries
        block["comparisons"] = compare_systems(per_q, metrics=[m for m in COMPARED_METRICS if m in names],
                                               references=cfg.compare_to)
        block["speedup_vs_llm"] = speedups(block.get("llm_subset", block))
        # the base encoder has the student's architecture and cost: its ratio stands in when no student exists
        block["speedup_base_vs_llm"] = speedups(block.get("llm_subset", block), student="base")
        rg = built.systems.get("rankgpt")
        if rg is not None:
            block["rankgpt_parse"] = dict(rg.reranker.parse_counts)
        settings[setting] = block
    report: dict[str, Any] = {
        "dataset": {"run_dir": run_dir.display, "queries": n_queries, "passages": len(corpus.pids),
                    "documents": len(corpus.doc_rows)},
        "split": cfg.split, "open_scope": scope, "ks": cfg.ks, "exp_util_ks": cfg.exp_util_ks,
        "generation_columns": gen_cols, "models": {**built.models, "base": cfg.base_encoder},
        "labels": label_info, "seed": cfg.seed, "skipped_settings": skipped_settings,
        "config": cfg.model_dump(mode="json"), "settings": settings, "plots": [],
        "comparison_method": {"interval": f"{int(100 * CONFIDENCE)}% paired bootstrap (scipy.stats.bootstrap, "
                              f"percentile, {N_RESAMPLES} resamples of queries)",
                              "p_value": f"two-sided paired randomization test (scipy.stats.permutation_test, sign "
                              f"flips, {N_RESAMPLES} resamples)", "references": list(cfg.compare_to)},
        "calibration": {"skipped": calibration} if isinstance(calibration, str) else calibration,
    }
    if settings:  # drawn locally, then written into the run dir atomically (a local path or an object store)
        with tempfile.TemporaryDirectory(prefix="uae_ray_plots-") as tmp:
            out = Path(tmp)
            drawn = [plots.recall_curves(settings, cfg.ks, out / "recall_at_k.png"),
                     plots.quality_vs_latency(settings, "recall@1", out / "recall1_vs_latency.png"),
                     plots.quality_vs_latency(settings, f"exputil@{cfg.exp_util_ks[0]}",
                                              out / "exputil_vs_latency.png")]
            if report["calibration"].get("deciles"):
                drawn.append(plots.calibration_deciles(report["calibration"], out / "calibration.png"))
            for png in drawn:
                run_dir.write_bytes(f"{cfg.output}/{png.name}", png.read_bytes())
            report["plots"] = [png.name for png in drawn]
    run_dir.write_json(f"{cfg.output}/report.json", report)
    md = render_markdown(report)
    run_dir.write_text(f"{cfg.output}/report.md", md)
    print(md)
    return report


def _system_block(rows: list[dict[str, Any]], names: list[str], gen_cols: list[str],
                  latencies: list[float]) -> dict[str, Any]:
    from uae_ray.metrics import latency_summary

    m = summarize(rows, names)
    gen = summarize([r for r in rows if gen_cols and gen_cols[0] in r], gen_cols) if gen_cols else {}
    m["generation"] = gen
    m["latency"] = latency_summary(latencies)
    return m
