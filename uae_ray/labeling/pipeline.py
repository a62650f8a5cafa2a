"""Utility labels from a scorer: the shared per-batch logic, the in-process path, and the Ray Data UDFs.

u(q, d) = mean log p(a | prompt(q, d)) - mean log p(a | prompt(q)) over the answer's tokens.

The no-passage term log p(a | prompt(q)) is computed once per (query, answer) (:func:`baseline_logprobs`) and handed
to the pair scoring as columns, never recomputed per pair.

Several gold answers (``aggregate``), with u_j = with_j - without_j the utility of answer j:

- ``first``: only the first non-empty answer is scored; stored values are its own.
- ``max``: every answer is scored; the pair keeps the answer with the largest u_j, and stores that answer's
  ``logp_with``, ``logp_without`` and ``n_answer_tokens`` (the answer the passage helps most).
- ``mean``: every answer is scored; ``logp_with`` and ``logp_without`` are the means over answers, so
  ``utility`` = mean_j u_j; ``n_answer_tokens`` is the rounded mean answer length.

In all three, ``utility == logp_with - logp_without`` exactly (float32). Empty answers are removed first (counted);
a query with none left is skipped (``empty_answer``); a pair whose prompt + answer exceeds ``max_model_len`` even
after cutting the passage is skipped (``prompt_too_long``). Skips are returned with their reason, never dropped.

Every baseline row and every pair row carries its content fingerprint (:mod:`uae_ray.labeling.fingerprint`): the
label stage caches rows by it, so a label is reused exactly when its question, answers, passage and settings are the
same.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from uae_ray.data.schema import (
    LABEL_BASELINE_SCHEMA,
    LABEL_CACHE_SCHEMA,
    LABEL_SKIPPED_SCHEMA,
    UTILITIES_SCHEMA,
    UTILITIES_VIEW_SCHEMA,
)
from uae_ray.labeling.fingerprint import AGGREGATES, baseline_fingerprint, pair_fingerprint, usable_answers
from uae_ray.labeling.scorers import SKIP_EMPTY_ANSWER, SKIP_TOO_LONG, ScoreItem, Scorer

if TYPE_CHECKING:
    from uae_ray.config import LabelConfig

log = logging.getLogger("uae_ray")

__all__ = ["AGGREGATES", "usable_answers"]  # re-exported: they live in fingerprint.py (the keys use them)

#: Columns of the pair rows handed to :func:`score_pair_rows` / :class:`LabelPairsBatch`.
PAIR_INPUT_COLUMNS = ("qid", "pid", "question", "text", "answers", "base_logp", "base_n", "fingerprint")


def aggregate_answers(
    with_passage: list[tuple[float, int]], without_passage: list[tuple[float, int]], aggregate: str
) -> tuple[float, float, int]:
    """(logp_with, logp_without, n_answer_tokens) of one pair from per-answer (mean log-prob, n tokens) lists.

    Args:
        with_passage: per answer, (mean log p(a_j | q, d), tokens of a_j).
        without_passage: per answer, (mean log p(a_j | q), tokens of a_j); same order and length.
        aggregate: ``first``, ``max`` or ``mean`` (see the module docstring).
    """
    if not with_passage or len(with_passage) != len(without_passage):
        raise ValueError(f"need one with/without pair per answer, got {len(with_passage)}/{len(without_passage)}")
    if aggregate == "first":
        (lw, n), (lo, _) = with_passage[0], without_passage[0]
        return lw, lo, n
    if aggregate == "max":
        j = max(range(len(with_passage)), key=lambda i: with_passage[i][0] - without_passage[i][0])
        return with_passage[j][0], without_passage[j][0], with_passage[j][1]
    if aggregate == "mean":
        lw = float(np.mean([x[0] for x in with_passage]))
        lo = float(np.mean([x[0] for x in without_passage]))
        n = round(float(np.mean([x[1] for x in with_passage])))
        return lw, lo, n
    raise ValueError(f"unknown answer aggregate {aggregate!r}; use one of {AGGREGATES}")


def baseline_logprobs(
    scorer: Scorer, queries: pa.Table, aggregate: str, *, generator: str, prompt_version: str, settings: str
) -> pa.Table:
    """No-passage log-probs, once per (query, usable answer): a table in ``LABEL_BASELINE_SCHEMA``.

    Args:
        queries: columns ``qid``, ``question``, ``answers`` (list<str>).
        settings: the settings key (:func:`~uae_ray.labeling.fingerprint.settings_key`) the rows are keyed under.
    Answers too long for the model get NaN (their pairs are skipped as ``prompt_too_long``).
    """
    qids = queries.column("qid").to_pylist()
    questions = queries.column("question").to_pylist()
    answers = [usable_answers(a, aggregate) for a in queries.column("answers").to_pylist()]
    items: list[ScoreItem] = []
    where: list[tuple[int, int]] = []
    for qi, (question, ans) in enumerate(zip(questions, answers, strict=True)):
        for aj, a in enumerate(ans):
            item = ScoreItem(question, a, None)
            if scorer.skip_reason(item) is None:
                items.append(item)
                where.append((qi, aj))
    logp = [[math.nan] * len(a) for a in answers]
    ntok = [[0] * len(a) for a in answers]
    for (qi, aj), (lp, n) in zip(where, scorer.answer_logprobs(items) if items else [], strict=True):
        logp[qi][aj], ntok[qi][aj] = lp, n
    n_rows = len(qids)
    return pa.Table.from_pydict(
        {
            "fingerprint": [baseline_fingerprint(settings, q, a) for q, a in zip(questions, answers, strict=True)],
            "qid": qids,
            "answers": answers,
            "logp": logp,
            "n_tokens": ntok,
            "generator": [generator] * n_rows,
            "prompt_version": [prompt_version] * n_rows,
            "settings": [settings] * n_rows,
        },
        schema=LABEL_BASELINE_SCHEMA,
    )


@dataclass(frozen=True)
class PairResults:
    """Labeled rows (``UTILITIES_VIEW_SCHEMA``), skipped rows (skip schema), and prompt+answer tokens processed."""

    labeled: pa.Table
    skipped: pa.Table
    tokens: int


def score_pair_rows(scorer: Scorer, rows: pa.Table, aggregate: str, *, generator: str, prompt_version: str) -> (
    PairResults
):
    """Label a batch of pairs whose no-passage terms are given.

    Args:
        rows: columns :data:`PAIR_INPUT_COLUMNS`: ``answers`` are the usable answers (as in the baseline table),
            ``base_logp``/``base_n`` their no-passage (mean log-prob, tokens), ``fingerprint`` the pair's key
            (carried to the output rows).
    """
    cols = {c: rows.column(c).to_pylist() for c in PAIR_INPUT_COLUMNS}
    items: list[ScoreItem] = []
    spans: list[tuple[int, int] | None] = []  # per row: slice of items, or None when skipped
    reasons: list[str] = []
    for i in range(rows.num_rows):
        answers, base = cols["answers"][i] or [], cols["base_logp"][i] or []
        reason = None
        if not answers:
            reason = SKIP_EMPTY_ANSWER
        elif any(b is None or math.isnan(b) for b in base):
            reason = SKIP_TOO_LONG
        row_items = [ScoreItem(cols["question"][i], a, cols["text"][i]) for a in answers]
        if reason is None:
            reason = next((r for r in (scorer.skip_reason(it) for it in row_items) if r is not None), None)
        if reason is not None:
            spans.append(None)
            reasons.append(reason)
            continue
        spans.append((len(items), len(items) + len(row_items)))
        reasons.append("")
        items.extend(row_items)
    before = getattr(scorer, "tokens_processed", 0)
    scores = scorer.answer_logprobs(items) if items else []
    tokens = getattr(scorer, "tokens_processed", 0) - before
    out: dict[str, list] = {f.name: [] for f in UTILITIES_VIEW_SCHEMA}
    skipped: dict[str, list] = {f.name: [] for f in LABEL_SKIPPED_SCHEMA}
    for i, span in enumerate(spans):
        if span is None:
            skipped["qid"].append(cols["qid"][i])
            skipped["pid"].append(cols["pid"][i])
            skipped["reason"].append(reasons[i])
            skipped["fingerprint"].append(cols["fingerprint"][i])
            continue
        without = list(zip(cols["base_logp"][i], cols["base_n"][i], strict=True))
        lw, lo, n = aggregate_answers(scores[span[0] : span[1]], without, aggregate)
        lw32, lo32 = np.float32(lw), np.float32(lo)
        out["qid"].append(cols["qid"][i])
        out["pid"].append(cols["pid"][i])
        out["logp_with"].append(float(lw32))
        out["logp_without"].append(float(lo32))
        out["n_answer_tokens"].append(int(n))
        out["utility"].append(float(np.float32(lw32 - lo32)))
        out["fingerprint"].append(cols["fingerprint"][i])
    out["generator"] = [generator] * len(out["qid"])
    out["prompt_version"] = [prompt_version] * len(out["qid"])
    skipped["generator"] = [generator] * len(skipped["qid"])
    skipped["prompt_version"] = [prompt_version] * len(skipped["qid"])
    return PairResults(
        pa.Table.from_pydict(out, schema=UTILITIES_VIEW_SCHEMA),
        pa.Table.from_pydict(skipped, schema=LABEL_SKIPPED_SCHEMA),
        int(tokens),
    )


def attach_fingerprints(pairs: pa.Table, queries: pa.Table, *, aggregate: str, settings: str) -> pa.Table:
    """``pairs`` (qid, pid, text, ...) with two more columns: ``baseline_fp`` (of the pair's question and scored
    answers) and ``fingerprint`` (of that and the passage text), under ``settings``.

    Raises ValueError naming a qid that is missing from ``queries``.
    """
    q_index = {q: i for i, q in enumerate(queries.column("qid").to_pylist())}
    questions, answers = queries.column("question").to_pylist(), queries.column("answers").to_pylist()
    q_fp: dict[str, str] = {}
    base_fps = []
    for q in pairs.column("qid").to_pylist():
        fp = q_fp.get(q)
        if fp is None:
            if q not in q_index:
                raise ValueError(f"pair with qid {q!r}: no such query in queries")
            i = q_index[q]
            fp = q_fp[q] = baseline_fingerprint(settings, questions[i], usable_answers(answers[i], aggregate))
        base_fps.append(fp)
    fps = [pair_fingerprint(b, t) for b, t in zip(base_fps, pairs.column("text").to_pylist(), strict=True)]
    return pairs.append_column("baseline_fp", pa.array(base_fps, pa.string())).append_column(
        "fingerprint", pa.array(fps, pa.string()))


def join_pair_inputs(pairs: pa.Table, queries: pa.Table, baseline: pa.Table) -> pa.Table:
    """Pair rows (qid, pid, text, baseline_fp, fingerprint: see :func:`attach_fingerprints`) joined with their
    question and their no-passage terms (``baseline`` rows matched by fingerprint) -> :data:`PAIR_INPUT_COLUMNS`.

    Raises ValueError naming a qid that is missing from ``queries`` or whose baseline is missing.
    """
    q_index = {q: i for i, q in enumerate(queries.column("qid").to_pylist())}
    b_index = {f: i for i, f in enumerate(baseline.column("fingerprint").to_pylist())}
    qids = pairs.column("qid").to_pylist()
    base_fps = pairs.column("baseline_fp").to_pylist()
    for q, b in zip(qids, base_fps, strict=True):
        if q not in q_index or b not in b_index:
            where = "queries" if q not in q_index else f"the no-passage baseline (fingerprint {b})"
            raise ValueError(f"pair with qid {q!r}: no such query in {where}")
    qi = pa.array([q_index[q] for q in qids], pa.int64())
    bi = pa.array([b_index[b] for b in base_fps], pa.int64())
    return pa.table(
        {
            "qid": pairs.column("qid"),
            "pid": pairs.column("pid"),
            "question": queries.column("question").take(qi),
            "text": pairs.column("text"),
            "answers": baseline.column("answers").take(bi),
            "base_logp": baseline.column("logp").take(bi),
            "base_n": baseline.column("n_tokens").take(bi),
            "fingerprint": pairs.column("fingerprint"),
        }
    )


def label_pairs_with_skips(
    scorer: Scorer, queries: pa.Table, pairs: pa.Table, *, aggregate: str, generator: str, prompt_version: str,
    settings: str = "",
) -> PairResults:
    """In-process labeling (no Ray) returning labeled rows, skipped rows with reasons, and tokens processed.

    ``settings``: the settings key the rows' fingerprints are made under (pass
    ``settings_key(cfg, scorer.dtype)`` for keys that match the label stage's; the default keys rows by content
    only).
    """
    for name, table, need in (("queries", queries, ("qid", "question", "answers")), ("pairs", pairs, ("qid", "pid",
                                                                                                       "text"))):
        absent = [c for c in need if c not in table.column_names]
        if absent:
            raise ValueError(f"{name} table lacks column(s) {absent}; it needs {list(need)}")
    wanted = set(pairs.column("qid").to_pylist())
    sub = queries.filter(pa.array([q in wanted for q in queries.column("qid").to_pylist()], pa.bool_()))
    keyed = attach_fingerprints(pairs.select(["qid", "pid", "text"]), sub, aggregate=aggregate, settings=settings)
    base = baseline_logprobs(scorer, sub, aggregate, generator=generator, prompt_version=prompt_version,
                             settings=settings)
    return score_pair_rows(
        scorer, join_pair_inputs(keyed, sub, base), aggregate, generator=generator, prompt_version=prompt_version
    )


def label_pairs_local(
    scorer: Scorer, queries: pa.Table, pairs: pa.Table, *, aggregate: str, generator: str, prompt_version: str
) -> pa.Table:
    """Label (query, passage) pairs in this process: a table in ``UTILITIES_SCHEMA`` (skipped pairs are logged).

    Args:
        scorer: any :class:`~uae_ray.labeling.scorers.Scorer` (e.g. ``make_scorer(cfg)``).
        queries: columns ``qid``, ``question``, ``answers`` (list<str>); extra columns are ignored.
        pairs: columns ``qid``, ``pid``, ``text`` (the passage); one output row per labelable pair.
        aggregate: ``first``, ``max`` or ``mean`` over several gold answers.
        generator, prompt_version: stored on every row (see :func:`~uae_ray.labeling.prompts.prompt_version_for`).
    """
    res = label_pairs_with_skips(
        scorer, queries, pairs, aggregate=aggregate, generator=generator, prompt_version=prompt_version
    )
    if res.skipped.num_rows:
        counts = Counter(res.skipped.column("reason").to_pylist())
        log.warning("label_pairs_local: %d of %d pairs skipped: %s", res.skipped.num_rows, pairs.num_rows,
                    dict(counts))
    return res.labeled.select(UTILITIES_SCHEMA.names).cast(UTILITIES_SCHEMA)


# ------------------------------------------------------------------------------------------------ Ray Data UDFs
class ScorerSettingsError(RuntimeError):
    """An actor would label under other settings than the driver keyed the pairs with (e.g. ``dtype: auto``
    resolved differently on a worker node than on the driver): its rows would carry wrong fingerprints."""


class _ScorerActor:
    """A scorer loaded once per actor; it checks that its settings key (with the dtype it actually loaded) is the
    one the driver fingerprinted the rows with."""

    def __init__(self, cfg: LabelConfig, generator: str, prompt_version: str, settings: str) -> None:
        import socket

        from uae_ray.labeling.fingerprint import settings_key
        from uae_ray.labeling.scorers import make_scorer

        self.cfg = cfg
        self.generator = generator
        self.prompt_version = prompt_version
        self.settings = settings
        self.scorer = make_scorer(cfg)
        mine = settings_key(cfg, self.scorer.dtype)
        if mine != settings:
            raise ScorerSettingsError(
                f"label actor on {socket.gethostname()}: scorer loaded with dtype {self.scorer.dtype!r} (label.dtype="
                f"{cfg.dtype!r}), which gives settings key {mine}, not the driver's {settings}: the driver resolved "
                "the dtype for another device. Set label.dtype explicitly (float32 or bfloat16)."
            )


class BaselineBatch(_ScorerActor):
    """Ray Data callable class: (qid, question, answers) -> ``LABEL_BASELINE_SCHEMA`` rows + ``tokens`` column."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        before = getattr(self.scorer, "tokens_processed", 0)
        out = baseline_logprobs(
            self.scorer, batch, self.cfg.answer_aggregate, generator=self.generator, prompt_version=self.prompt_version,
            settings=self.settings,
        )
        tokens = getattr(self.scorer, "tokens_processed", 0) - before
        return out.append_column("tokens", pa.array([tokens] + [0] * (out.num_rows - 1), pa.int64()))


class LabelPairsBatch(_ScorerActor):
    """Ray Data callable class: :data:`PAIR_INPUT_COLUMNS` rows -> ``LABEL_CACHE_SCHEMA`` rows + ``tokens``.

    Skipped pairs come back as rows with a non-empty ``skip_reason`` (NaN values).
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        res = score_pair_rows(
            self.scorer, batch, self.cfg.answer_aggregate, generator=self.generator, prompt_version=self.prompt_version
        )
        return cache_rows(res, self.settings)


def cache_rows(res: PairResults, settings: str) -> pa.Table:
    """Labeled + skipped rows as one ``LABEL_CACHE_SCHEMA`` table (``skip_reason`` "" for labeled) plus a
    ``tokens`` column (the batch's tokens in the first row)."""
    n_ok, n_skip = res.labeled.num_rows, res.skipped.num_rows
    nan = pa.array([math.nan] * n_skip, pa.float32())
    skipped = pa.table(
        {
            "fingerprint": res.skipped.column("fingerprint"),
            "qid": res.skipped.column("qid"),
            "pid": res.skipped.column("pid"),
            "logp_with": nan,
            "logp_without": nan,
            "n_answer_tokens": pa.array([0] * n_skip, pa.int32()),
            "utility": nan,
            "skip_reason": res.skipped.column("reason"),
            "generator": res.skipped.column("generator"),
            "prompt_version": res.skipped.column("prompt_version"),
            "settings": pa.array([settings] * n_skip, pa.string()),
        },
        schema=LABEL_CACHE_SCHEMA,
    )
    labeled = res.labeled.append_column("skip_reason", pa.array([""] * n_ok, pa.string())).append_column(
        "settings", pa.array([settings] * n_ok, pa.string())).select(LABEL_CACHE_SCHEMA.names).cast(LABEL_CACHE_SCHEMA)
    both = pa.concat_tables([labeled, skipped])
    tokens = [res.tokens] + [0] * (both.num_rows - 1) if both.num_rows else []
    return both.append_column("tokens", pa.array(tokens, pa.int64()))
