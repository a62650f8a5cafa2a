"""The student's utility calibration in a run: fitted on held-out labeled pairs at the end of train-encoder, checked
per score decile in evaluate, and used there to choose k per query (adaptive k against fixed k).

Held-out pairs: the label stage's utilities of the first split in (dev, test, train) that the student did not train
on (``TrainEncoderConfig.splits``, default train; the label stage labels train, dev and test by default, QASPER and
SQuAD configs train and dev). When every labeled split was trained on, the fit falls back to the trained split and the
calibration says ``in_sample`` (the student's scores on its own training pairs are optimistic).

Scores are what serving computes: cosine of the unit query vector (``QUERY_MAX_LENGTH`` tokens) and the unit passage
vector (the model's own passage length, bf16 autocast where the CPU has it, as ``uae-ray index`` encodes).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uae_ray.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    UtilityCalibration,
    choose_k,
    fit_calibration,
    load_calibration,
    save_calibration,
)
from uae_ray.data.schema import CORPUS, QUERIES, UTILITIES
from uae_ray.runtime import SUCCESS_MARKER, RunDir

log = logging.getLogger("uae_ray")

SPLIT_PREFERENCE = ("dev", "test", "train")
MAX_PAIRS = 20_000  # driver-side encoding stays bounded at the GPU-cluster scale (whole queries, stable order)
QUERY_MAX_LENGTH = 64  # as evaluate's DenseSystem and the served QueryEncoder's default


# ------------------------------------------------------------------------------------------------ held-out pairs
@dataclass(frozen=True)
class LabeledPairs:
    """Labeled (qid, pid, utility) pairs of one split, with where they came from."""

    qids: list[str]
    pids: list[str]
    utilities: np.ndarray
    split: str
    in_sample: bool  # the split was trained on (no held-out split is labeled)
    queries_left_out: int = 0  # whole queries beyond MAX_PAIRS


def heldout_pairs(run_dir: RunDir, trained_splits: Sequence[str], *, max_pairs: int = MAX_PAIRS) -> LabeledPairs | None:
    """The labeled pairs to fit on (see the module docstring); None when the run has no utility labels."""
    from uae_ray.eval.runner import stable_order

    if not run_dir.exists(UTILITIES):
        return None
    util = run_dir.read_table(UTILITIES, columns=["qid", "pid", "utility"])
    q = run_dir.read_table(QUERIES, columns=["qid", "split"])
    split_of = dict(zip(q.column("qid").to_pylist(), q.column("split").to_pylist(), strict=True))
    by_split: dict[str, dict[tuple[str, str], float]] = {}
    for qid, pid, u in zip(util.column("qid").to_pylist(), util.column("pid").to_pylist(),
                           util.column("utility").to_pylist(), strict=True):
        if qid in split_of and u is not None and np.isfinite(u):
            by_split.setdefault(split_of[qid], {})[(qid, pid)] = float(u)  # later rows win, as everywhere
    if not by_split:
        return None
    held = [s for s in SPLIT_PREFERENCE if s in by_split and s not in trained_splits]
    split = held[0] if held else next(s for s in SPLIT_PREFERENCE if s in by_split)
    pairs = by_split[split]
    per_q: dict[str, list[tuple[str, float]]] = {}
    for (qid, pid), u in pairs.items():
        per_q.setdefault(qid, []).append((pid, u))
    kept: list[str] = []
    n = 0
    for qid in stable_order(list(per_q), 0):
        if n >= max_pairs:
            break
        kept.append(qid)
        n += len(per_q[qid])
    qids = [qid for qid in kept for _ in per_q[qid]]
    pids = [pid for qid in kept for pid, _ in per_q[qid]]
    utilities = np.asarray([u for qid in kept for _, u in per_q[qid]], dtype=np.float64)
    return LabeledPairs(qids, pids, utilities, split, in_sample=not held, queries_left_out=len(per_q) - len(kept))


def _passage_max_length(model_dir: str) -> int | None:
    cfg = Path(model_dir) / "sentence_bert_config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text()).get("max_seq_length")
        return int(value) if value else None
    return None


def score_pairs(model: Any, questions: Mapping[str, str], texts: Mapping[str, str], qids: Sequence[str],
                pids: Sequence[str], *, passage_max_length: int | None) -> np.ndarray:
    """Cosine of each (qid, pid) pair under ``model`` (each question and passage encoded once). float64 [n]."""
    from uae_ray.models.encoder import encode
    from uae_ray.models.registry import cpu_has_bf16

    uq, up = list(dict.fromkeys(qids)), list(dict.fromkeys(pids))
    # passages first: encode(max_length=...) sets the model's limit, and the passage limit must not be the query's
    pv = encode(model, [texts[p] for p in up], max_length=passage_max_length, bf16=cpu_has_bf16())
    qv = encode(model, [questions[q] for q in uq], max_length=QUERY_MAX_LENGTH)
    qi, pi = {q: i for i, q in enumerate(uq)}, {p: i for i, p in enumerate(up)}
    rows_q = np.asarray([qi[q] for q in qids], dtype=np.int64)
    rows_p = np.asarray([pi[p] for p in pids], dtype=np.int64)
    return np.einsum("nd,nd->n", qv[rows_q].astype(np.float64), pv[rows_p].astype(np.float64))


def fit_for_encoder(run_dir: RunDir, model_dir: str, trained_splits: Sequence[str]) -> UtilityCalibration | str:
    """Fit the calibration of the encoder at ``model_dir`` on the run's held-out labeled pairs; a reason when none."""
    from uae_ray.models.encoder import load_encoder

    pairs = heldout_pairs(run_dir, trained_splits)
    if pairs is None:
        return f"{run_dir.path(UTILITIES)}: no utility labels of this run's queries (run label first)"
    if len(pairs.qids) < 2:
        return f"only {len(pairs.qids)} labeled pair(s) in split {pairs.split!r}: too few to calibrate"
    q = run_dir.read_table(QUERIES, columns=["qid", "question"])
    questions = dict(zip(q.column("qid").to_pylist(), q.column("question").to_pylist(), strict=True))
    need = set(pairs.pids)
    c = run_dir.read_table(CORPUS, columns=["pid", "text"])
    texts = {p: t for p, t in zip(c.column("pid").to_pylist(), c.column("text").to_pylist(), strict=True)
             if p in need}
    missing = sorted(need - set(texts))
    if missing:
        raise CalibrationError(f"{run_dir.path(UTILITIES)}: labeled pids not in {CORPUS}: {missing[:5]}")
    # a fresh model, not load_encoder's per-process cache: a retrain in this process writes new weights to the path
    scores = score_pairs(load_encoder.__wrapped__(model_dir), questions, texts, pairs.qids, pairs.pids,
                         passage_max_length=_passage_max_length(model_dir))
    note = " (in sample: every labeled split was trained on)" if pairs.in_sample else ""
    left = f", {pairs.queries_left_out} queries left out past {MAX_PAIRS} pairs" if pairs.queries_left_out else ""
    source = (f"{pairs.split} split, {len(set(pairs.qids))} queries, {len(pairs.qids)} labeled pairs of "
              f"{UTILITIES}/{left}{note}")
    return fit_calibration(scores, pairs.utilities, score="cosine", source=source)


def calibrate_encoder(run_dir: RunDir, name: str, trained_splits: Sequence[str]) -> dict[str, Any]:
    """Fit the calibration of the run-dir encoder ``name`` and commit it into that directory as ``calibration.json``
    (the directory is committed again with the file added: on an object store too, it is part of the version every
    reader fetches). Returns a summary for the train-encoder report; {"skipped": reason} when it cannot be fitted."""
    model_dir = run_dir.fetch_dir(name)
    cal = fit_for_encoder(run_dir, str(model_dir), trained_splits)
    if isinstance(cal, str):
        log.warning("train-encoder: no utility calibration for %s: %s", run_dir.path(name), cal)
        return {"skipped": cal}
    with run_dir.staged_dir(name) as out:
        shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(SUCCESS_MARKER))
        save_calibration(cal, out / CALIBRATION_FILE)
    log.info("train-encoder: utility calibration of %s fitted on %s -> %s", name, cal.source,
             run_dir.path(f"{name}/{CALIBRATION_FILE}"))
    return {"file": f"{name}/{CALIBRATION_FILE}", "n_pairs": cal.n_pairs, "source": cal.source,
            "knots": len(cal.score_knots), "utility_range": [cal.utility_knots[0], cal.utility_knots[-1]]}


# ------------------------------------------------------------------------------------------------ evaluation
def decile_table(scores: np.ndarray, measured: np.ndarray, expected: np.ndarray,
                 expected_cv: np.ndarray | None, n_bins: int = 10) -> list[dict[str, Any]]:
    """Pairs sorted by score and cut into ``n_bins`` near-equal groups: per group the score range, n, the mean
    expected utility (stored calibration; cross-fitted) and the mean measured utility."""
    order = np.argsort(np.asarray(scores), kind="stable")
    rows = []
    for i, part in enumerate(np.array_split(order, min(n_bins, len(order)))):
        if part.size == 0:
            continue
        rows.append({"decile": i + 1, "n": int(part.size), "score_min": float(scores[part].min()),
                     "score_max": float(scores[part].max()), "expected": float(expected[part].mean()),
                     "expected_cv": None if expected_cv is None else float(expected_cv[part].mean()),
                     "measured": float(measured[part].mean())})
    return rows


def crossfit_expected(scores: np.ndarray, utilities: np.ndarray, groups: Sequence[str],
                      n_folds: int = 5) -> np.ndarray | None:
    """Out-of-sample expected utility of every pair: an isotonic fit on the other folds' queries (grouped k-fold,
    so no query is on both sides). None with fewer than 2 queries."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(set(groups))
    if n_groups < 2:
        return None
    out = np.empty(len(scores), dtype=np.float64)
    for train, test in GroupKFold(n_splits=min(n_folds, n_groups)).split(scores, utilities, groups=list(groups)):
        if len(train) < 2:
            return None  # a fold too small to fit on
        out[test] = fit_calibration(scores[train], utilities[train]).expected_utility(scores[test])
    return out


def match_floor(eu: np.ndarray, target: float) -> float:
    """The utility floor whose adaptive k (``choose_k`` per query over the rows of ``eu`` [n_queries, k_max]) has the
    mean closest to ``target`` (the highest such floor on ties). Chosen to match a number of passages, never by the
    outcome."""
    cands = np.unique(eu)
    cands = np.append(cands, np.nextafter(cands[-1], np.inf))  # above every value: k = 0 everywhere
    best, best_gap = float(cands[-1]), np.inf
    for f in cands[::-1]:
        mean_k = np.cumprod(eu >= f, axis=1).sum(axis=1).mean()
        gap = abs(mean_k - target)
        if gap < best_gap - 1e-12:
            best, best_gap = float(f), gap
    return best


@dataclass
class CalibrationEval:
    """Evaluate's calibration section (report-ready) and the contexts whose answers it needs (Token F1)."""

    report: dict[str, Any]
    contexts: list[tuple[str, list[str]]]  # (qid, pids) to answer: fixed and adaptive top-k


def load_student_calibration(run_dir: RunDir, name: str, model_dir: str,
                             trained_splits: Sequence[str]) -> tuple[UtilityCalibration | None, str]:
    """The encoder's stored calibration; else one fitted now in memory by the same rule (an encoder trained before
    calibrations existed; not written: the encoder directory is train-encoder's). (calibration, where from)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if path.exists():
        return load_calibration(path), f"{name}/{CALIBRATION_FILE}"
    cal = fit_for_encoder(run_dir, model_dir, trained_splits)
    if isinstance(cal, str):
        return None, cal
    return cal, f"fitted in evaluate ({name}/ has no {CALIBRATION_FILE}; not stored)"


def evaluate_calibration(*, system: Any, calibration: UtilityCalibration, origin: str, eval_split: str,
                         corpus: Any, rankings: Mapping[tuple[str, str], pa.Table],
                         labels: Mapping[str, Mapping[str, float]], questions: Mapping[str, str], qids: Sequence[str],
                         exp_util_ks: Sequence[int], gen_qids: set[str], name: str = "uae") -> CalibrationEval:
    """Calibration per score decile on the evaluated queries' labeled pairs, and adaptive k against fixed k.

    Args:
        system: the student's DenseSystem (its model and corpus vectors: pairs whose passage has no vector are
            counted and left out).
        labels: qid -> pid -> utility (stored and on-demand labels of the evaluation).
        exp_util_ks: the evaluation's ExpUtil cut-offs; adaptive k ranges over 0..max of them (those are labeled).
        gen_qids: queries that get generated answers (Token F1 for fixed and adaptive contexts).
    """
    from uae_ray.models.encoder import encode

    qids = [q for q in qids if q in questions]
    qv = encode(system.model, [questions[q] for q in qids], max_length=system.max_query_length)
    qrow = {q: i for i, q in enumerate(qids)}
    has_vec = np.linalg.norm(system.vectors, axis=1) > 0

    def scores_of(q: str, pids: Sequence[str]) -> np.ndarray:
        rows = corpus.rows(pids)
        return system.vectors[rows].astype(np.float64) @ qv[qrow[q]].astype(np.float64)

    # --- per decile, on every labeled pair of the evaluated queries
    pq, pp, pu, no_vec = [], [], [], 0
    for q in qids:
        for p, u in labels.get(q, {}).items():
            if p not in corpus.row_of or not has_vec[corpus.row_of[p]]:
                no_vec += 1
                continue
            pq.append(q)
            pp.append(p)
            pu.append(u)
    section: dict[str, Any] = {"system": name, "calibration": origin, "fit_source": calibration.source,
                               "fit_pairs": calibration.n_pairs,
                               "in_sample": calibration.source.startswith(f"{eval_split} split")
                               or "in sample" in calibration.source,
                               "pairs_without_vector": no_vec}
    if len(pq) >= 2:
        from scipy.stats import spearmanr

        s = np.einsum("nd,nd->n", system.vectors[corpus.rows(pp)].astype(np.float64),
                      qv[[qrow[q] for q in pq]].astype(np.float64))
        u = np.asarray(pu, dtype=np.float64)
        expected = calibration.expected_utility(s)
        cv = crossfit_expected(s, u, pq)
        section.update({
            "n_pairs": len(pq), "n_queries": len(set(pq)),
            "spearman_score_utility": float(spearmanr(s, u).statistic) if np.ptp(s) > 0 and np.ptp(u) > 0 else None,
            "mae_expected": float(np.abs(expected - u).mean()),
            "mae_expected_cv": None if cv is None else float(np.abs(cv - u).mean()),
            "deciles": decile_table(s, u, expected, cv)})
    else:
        section["deciles"] = []
        section["n_pairs"] = len(pq)
    # --- adaptive k against fixed k, per setting, on the queries whose top k_max are all labeled
    k_max = max(exp_util_ks)
    adaptive: dict[str, Any] = {}
    contexts: list[tuple[str, list[str]]] = []
    for (setting, sys_name), table in rankings.items():
        if sys_name != name:
            continue
        ranks = {q: list(p) for q, p in zip(table.column("qid").to_pylist(), table.column("pids").to_pylist(),
                                            strict=True)}
        ok = [q for q in qids if q in ranks and len(ranks[q]) >= k_max
              and all(p in labels.get(q, {}) and has_vec[corpus.row_of[p]] for p in ranks[q][:k_max])]
        block: dict[str, Any] = {"k_max": k_max, "n_queries": len(ok),
                                 "left_out_unlabeled": len([q for q in qids if q in ranks]) - len(ok), "rows": []}
        if ok:
            eu = np.stack([calibration.expected_utility(scores_of(q, ranks[q][:k_max])) for q in ok])
            util = np.asarray([[labels[q][p] for p in ranks[q][:k_max]] for q in ok], dtype=np.float64)
            # each query's fixed-k curve, k = 0..k_max (no passage: 0 nats); an isotonic calibration has plateaus, so
            # an achievable mean k can miss the integer k: the fixed budget of the *same* mean k is the curve
            # interpolated there (a fixed k drawn between its two neighbours)
            curve = np.concatenate([np.zeros((len(ok), 1)), np.cumsum(util, axis=1) / np.arange(1, k_max + 1)], 1)
            for k in range(1, k_max):
                floor = match_floor(eu, float(k))
                ks = np.asarray([choose_k(eu[i], min_expected_utility=floor) for i in range(len(ok))])
                fixed = util[:, :k].mean(axis=1)
                same = np.asarray([np.interp(ks.mean(), np.arange(k_max + 1), c) for c in curve])
                adapt = np.asarray([util[i, : ks[i]].mean() if ks[i] else 0.0 for i in range(len(ok))])
                block["rows"].append({
                    "fixed_k": k, "floor": floor, "mean_k": float(ks.mean()), "k0_share": float((ks == 0).mean()),
                    "k_hist": {str(j): int((ks == j).sum()) for j in range(k_max + 1)},
                    "exputil_fixed": float(fixed.mean()), "exputil_fixed_at_mean_k": float(same.mean()),
                    "exputil_adaptive": float(adapt.mean()),
                    "per_query_k": dict(zip(ok, ks.tolist(), strict=True)),
                    "_exputil_fixed_q": same.tolist(), "_exputil_adaptive_q": adapt.tolist()})
                for q, kq in zip(ok, ks.tolist(), strict=True):
                    if q in gen_qids:
                        contexts += [(q, ranks[q][:k]), (q, ranks[q][:kq])]
            block["_ranks"] = {q: ranks[q][:k_max] for q in ok}
        adaptive[setting] = block
    section["adaptive_k"] = adaptive
    return CalibrationEval(section, contexts)


def finish_adaptive(section: dict[str, Any], answers: Mapping[str, str], gold_answers: Mapping[str, list[str]],
                    gen_qids: set[str]) -> None:
    """Token F1 of fixed and adaptive contexts (queries with both answers), paired intervals; drops the work columns.
    """
    from uae_ray.eval.runner import answer_key
    from uae_ray.eval.stats import paired_difference
    from uae_ray.metrics import token_f1

    for block in section.get("adaptive_k", {}).values():
        ranks = block.pop("_ranks", {})
        for row in block["rows"]:
            fixed_q, adapt_q = row.pop("_exputil_fixed_q"), row.pop("_exputil_adaptive_q")
            row["exputil_diff"] = paired_difference(adapt_q, fixed_q)  # against the fixed budget of the same mean k
            k = row["fixed_k"]
            f_fixed, f_adapt = [], []
            for q, kq in row["per_query_k"].items():
                if q not in gen_qids:
                    continue
                a_f = answers.get(answer_key(q, ranks[q][:k]))
                a_a = answers.get(answer_key(q, ranks[q][:kq]))
                if a_f is not None and a_a is not None:
                    f_fixed.append(token_f1(a_f, gold_answers[q]))
                    f_adapt.append(token_f1(a_a, gold_answers[q]))
            row["f1_n"] = len(f_fixed)
            row["f1_fixed"] = float(np.mean(f_fixed)) if f_fixed else None
            row["f1_adaptive"] = float(np.mean(f_adapt)) if f_adapt else None
            row["f1_diff"] = paired_difference(f_adapt, f_fixed) if f_fixed else None
