"""Training data: reward groups from utilities, student groups with utility-aware hard negatives, batching.

Everything here is plain Python / NumPy on Arrow tables. The builders run on one query's rows at a time inside Ray
Data (:mod:`uae_ray.training.dataset`), which also counts every skip by reason; the Ray Train workers batch and
collate.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


# ------------------------------------------------------------------------------------------------------------ splits
def _unit_hash(key: str, seed: int) -> float:
    h = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def heldout_documents(doc_ids: list[str], fraction: float, seed: int) -> set[str]:
    """Documents held out (deterministic by hash); at least one when ``fraction > 0`` and there are >= 2 documents."""
    docs = sorted(set(doc_ids))
    if fraction <= 0 or len(docs) < 2:
        return set()
    held = {d for d in docs if _unit_hash(d, seed) < fraction}
    if not held:
        held = {min(docs, key=lambda d: _unit_hash(d, seed))}
    if len(held) == len(docs):
        held.discard(max(docs, key=lambda d: _unit_hash(d, seed)))
    return held


# ------------------------------------------------------------------------------------------------------ reward model
@dataclass(frozen=True)
class RewardGroup:
    """One query's labeled candidates (aligned lists)."""

    qid: str
    doc_id: str
    split: str
    question: str
    pids: list[str]
    passages: list[str]
    utilities: list[float]


def build_reward_groups(
    queries: pa.Table, corpus: pa.Table, utilities: pa.Table
) -> tuple[list[RewardGroup], dict[str, int]]:
    """Group utility rows by query, with question and passage texts.

    Returns:
        (groups sorted by qid, skip counts by reason). Reasons: ``unknown_qid`` / ``unknown_pid`` (rows whose query
        or passage is not in queries/corpus), ``duplicate_pair`` (same (qid, pid) labeled twice: first kept),
        ``non_finite_utility``, ``fewer_than_2_candidates`` (queries: a listwise loss needs 2).
    """
    q = queries.select(["qid", "doc_id", "split", "question"]).to_pydict()
    qinfo = {
        qid: (d, s, text) for qid, d, s, text in zip(q["qid"], q["doc_id"], q["split"], q["question"], strict=True)
    }
    c = corpus.select(["pid", "text"]).to_pydict()
    texts = dict(zip(c["pid"], c["text"], strict=True))
    u = utilities.select(["qid", "pid", "utility"]).to_pydict()
    skips: Counter[str] = Counter()
    per_q: dict[str, dict[str, float]] = defaultdict(dict)
    for qid, pid, val in zip(u["qid"], u["pid"], u["utility"], strict=True):
        if qid not in qinfo:
            skips["unknown_qid"] += 1
        elif pid not in texts:
            skips["unknown_pid"] += 1
        elif val is None or not np.isfinite(val):
            skips["non_finite_utility"] += 1
        elif pid in per_q[qid]:
            skips["duplicate_pair"] += 1
        else:
            per_q[qid][pid] = float(val)
    groups = []
    for qid in sorted(per_q):
        cands = per_q[qid]
        if len(cands) < 2:
            skips["fewer_than_2_candidates"] += 1
            continue
        doc, split, question = qinfo[qid]
        pids = sorted(cands)
        groups.append(RewardGroup(qid, doc, split, question, pids, [texts[p] for p in pids], [cands[p] for p in pids]))
    return groups, dict(skips)


def collate_reward(
    groups: list[RewardGroup], group_size: int, rng: np.random.Generator
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Sample up to ``group_size`` candidates per query and pad.

    Returns:
        (questions [n_valid], passages [n_valid] in row-major order of the valid entries, utilities [B, G] float32,
        mask [B, G] bool).
    """
    b = len(groups)
    utils = np.zeros((b, group_size), dtype=np.float32)
    mask = np.zeros((b, group_size), dtype=bool)
    questions: list[str] = []
    passages: list[str] = []
    for i, g in enumerate(groups):
        n = len(g.pids)
        idx = rng.choice(n, size=group_size, replace=False) if n > group_size else np.arange(n)
        for j, k in enumerate(idx):
            utils[i, j] = g.utilities[k]
            mask[i, j] = True
            questions.append(g.question)
            passages.append(g.passages[k])
    return questions, passages, utils, mask


# -------------------------------------------------------------------------------------------------------- bi-encoder
@dataclass(frozen=True)
class EncoderExample:
    """One query's group: gold passage first, then hard negatives (``teacher`` aligned with ``passages``)."""

    qid: str
    question: str
    pids: list[str]
    passages: list[str]
    teacher: list[float]
    gold: list[bool]


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def select_hard_negatives(
    pids: list[str], base_scores: np.ndarray, teacher: np.ndarray | None, exclude: set[str], n: int,
    useful_quantile: float,
) -> list[str]:
    """Utility-aware hard negatives from one query's pool.

    With teacher scores: drop candidates whose teacher score is at or above the pool's ``useful_quantile`` quantile
    (likely useful: false negatives), then rank the rest by ``z(base) - z(teacher)`` (similar to the query, yet
    useless to the generator). Without: the highest base similarity. ``exclude`` (the golds) is never chosen.

    Args:
        pids: the pool's passage ids.
        base_scores: [len(pids)] base-encoder similarities.
        teacher: [len(pids)] teacher scores or None.
        exclude: pids never to return.
        n: how many negatives.
        useful_quantile: in (0, 1]; 1 keeps every candidate but the maximum-teacher one.
    """
    keep = np.array([p not in exclude for p in pids], dtype=bool)
    if teacher is not None and len(pids) > 0:
        threshold = np.quantile(teacher, useful_quantile)
        keep &= teacher < threshold
        hardness = _z(base_scores) - _z(teacher)
    else:
        hardness = base_scores.astype(np.float64)
    order = [i for i in np.argsort(-hardness, kind="stable") if keep[i]]
    return [pids[i] for i in order[:n]]


#: What a student's group takes as its positives (the ``train-encoder`` config's ``positives``).
POSITIVES = ("gold", "gold_and_useful", "teacher_top", "answer_match")
#: Answers a passage cannot be matched on: QASPER's boolean answers and the like.
_UNMATCHABLE = {"", "yes", "no", "unanswerable", "none"}


def answer_patterns(answers: list[str] | None) -> list[str]:
    """The normalised answer strings a passage is matched on (SQuAD normalisation; empty and yes/no-like answers
    dropped: every passage "contains" them)."""
    from uae_ray.metrics import normalize_answer

    out = []
    for a in answers or []:
        norm = normalize_answer(a or "")
        if norm not in _UNMATCHABLE and norm not in out:
            out.append(norm)
    return out


def contains_answer(text: str, patterns: list[str]) -> bool:
    """Whether the normalised ``text`` holds one of ``patterns`` as whole words (distant supervision)."""
    from uae_ray.metrics import normalize_answer

    padded = f" {normalize_answer(text)} "
    return any(f" {p} " in padded for p in patterns)


def _positives(
    kind: str, pids: list[str], golds: list[str], teacher: np.ndarray | None, useful_quantile: float,
    texts: dict[str, str], patterns: list[str],
) -> list[str]:
    """One query's positive pids by ``kind`` (see :data:`POSITIVES`), the first one first, then in pool order; empty
    when the query has none."""
    if kind == "gold":
        return golds[:1]
    if kind == "teacher_top":
        return [pids[int(np.argmax(teacher))]] if teacher is not None and len(pids) else []
    if kind == "gold_and_useful":
        if not golds:
            return []
        useful = []
        if teacher is not None and len(pids):
            threshold = np.quantile(teacher, useful_quantile)
            useful = [p for p, t in zip(pids, teacher, strict=True) if t >= threshold and p not in golds]
        return [golds[0], *useful]
    return [p for p in pids if contains_answer(texts[p], patterns)]  # answer_match


def build_encoder_examples(
    queries: pa.Table,
    corpus: pa.Table,
    candidates: pa.Table,
    teacher_scores: pa.Table | None,
    *,
    n_hard_negatives: int,
    useful_quantile: float,
    splits: tuple[str, ...] = ("train",),
    positives: str = "gold",
    min_teacher_margin: float = 0.0,
) -> tuple[list[EncoderExample], dict[str, int]]:
    """One :class:`EncoderExample` per query of ``splits`` that has positives: the group holds them first (marked
    in ``gold``), then hard negatives, ``1 + n_hard_negatives`` passages in all.

    ``positives``: ``gold`` (the first annotated gold passage), ``gold_and_useful`` (it plus the pool passages the
    teacher scores at or above the pool's ``useful_quantile`` quantile), ``teacher_top`` (the teacher's top passage
    of the pool: no passage annotation read) or ``answer_match`` (pool passages containing an answer string, whole
    words after SQuAD normalisation: distant supervision, ``queries`` needs an ``answers`` column). Several
    positives take at most half of the group (in pool order). ``min_teacher_margin`` (``teacher_top`` only): a
    query whose teacher top score leads the pool's second best by less is skipped (a positive the teacher is unsure
    of: fewer, cleaner positives).

    Returns:
        (examples sorted by qid, counts). Skip reasons: ``no_gold`` (gold positives: no gold pid in the corpus),
        ``no_pool`` (no candidates), ``no_teacher_scores`` (teacher table given but nothing for this query's pool),
        ``no_matchable_answer`` / ``no_answer_match`` (answer_match: no answer to match on, e.g. yes/no, or no pool
        passage contains one), ``low_teacher_margin`` (teacher_top: below ``min_teacher_margin``); also counts
        ``gold_teacher_imputed`` (gold not scored by the teacher: it gets the pool's maximum), ``short_group``
        (fewer negatives than asked; the group is padded) and ``positives`` (all positives of the examples).
    """
    if positives not in POSITIVES:
        raise ValueError(f"positives={positives!r}: expected one of {POSITIVES}")
    if positives in ("teacher_top", "gold_and_useful") and teacher_scores is None:
        raise ValueError(f"positives={positives!r} needs teacher scores")
    if min_teacher_margin < 0:
        raise ValueError(f"min_teacher_margin={min_teacher_margin}: must be >= 0")
    if min_teacher_margin > 0 and positives != "teacher_top":
        raise ValueError(f"min_teacher_margin applies to positives='teacher_top' only (positives={positives!r})")
    c = corpus.select(["pid", "text"]).to_pydict()
    texts = dict(zip(c["pid"], c["text"], strict=True))
    pools: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    cd = candidates.select(["qid", "pid", "rank", "base_score"]).to_pydict()
    for qid, pid, rank, score in zip(cd["qid"], cd["pid"], cd["rank"], cd["base_score"], strict=True):
        pools[qid].append((int(rank), pid, float(score)))
    teacher: dict[str, dict[str, float]] = defaultdict(dict)
    if teacher_scores is not None:
        td = teacher_scores.select(["qid", "pid", "teacher_score"]).to_pydict()
        for qid, pid, s in zip(td["qid"], td["pid"], td["teacher_score"], strict=True):
            teacher[qid][pid] = float(s)
    if positives == "answer_match" and "answers" not in queries.column_names:
        raise ValueError("positives='answer_match' needs the queries' answers column")
    qd = queries.select(["qid", "question", "gold_pids", "split"]).to_pydict()
    answers = queries["answers"].to_pylist() if "answers" in queries.column_names else [None] * queries.num_rows
    group_size = 1 + n_hard_negatives
    cap = max(1, group_size // 2)
    counts: Counter[str] = Counter()
    examples: list[EncoderExample] = []
    rows = zip(qd["qid"], qd["question"], qd["gold_pids"], qd["split"], answers, strict=True)
    for qid, question, gold_pids, split, q_answers in rows:
        if split not in splits:
            continue
        golds = [p for p in (gold_pids or []) if p in texts]
        if positives in ("gold", "gold_and_useful") and not golds:
            counts["no_gold"] += 1
            continue
        patterns = answer_patterns(q_answers) if positives == "answer_match" else []
        if positives == "answer_match" and not patterns:
            counts["no_matchable_answer"] += 1
            continue
        pool = sorted(pools.get(qid, []))
        pool = [(r, p, s) for r, p, s in pool if p in texts]
        if not pool:
            counts["no_pool"] += 1
            continue
        pids = [p for _, p, _ in pool]
        base = np.array([s for _, _, s in pool], dtype=np.float64)
        t_q = teacher.get(qid, {})
        t_arr = None
        if teacher_scores is not None:
            if not any(p in t_q for p in pids):
                counts["no_teacher_scores"] += 1
                continue
            fill = min(t_q.values())
            t_arr = np.array([t_q.get(p, fill) for p in pids], dtype=np.float64)
        if min_teacher_margin > 0 and t_arr is not None and len(t_arr) > 1:
            top2 = np.sort(t_arr)[-2:]
            if top2[1] - top2[0] < min_teacher_margin:
                counts["low_teacher_margin"] += 1
                continue
        found = _positives(positives, pids, golds, t_arr, useful_quantile, texts, patterns)
        if not found:
            counts["no_answer_match"] += 1
            continue
        pos = found[:cap]
        n_neg = group_size - len(pos)
        # never a negative: any positive (also those beyond the cap); the golds only where positives read them
        exclude = set(found) | (set(golds) if positives in ("gold", "gold_and_useful") else set())
        negs = select_hard_negatives(pids, base, t_arr, exclude, n_neg, useful_quantile)
        if len(negs) < n_neg:
            counts["short_group"] += 1
        group = [*pos, *negs]
        if t_arr is None:
            tvals = [0.0] * len(group)
        else:
            if any(p not in t_q for p in pos):
                counts["gold_teacher_imputed"] += 1
            tvals = [t_q.get(p, float(t_arr.max())) for p in group]
        counts["positives"] += len(pos)
        examples.append(EncoderExample(qid, question, group, [texts[p] for p in group], tvals,
                                       [True] * len(pos) + [False] * len(negs)))
    counts["examples"] = len(examples)
    return sorted(examples, key=lambda e: e.qid), dict(counts)


def collate_encoder(
    examples: list[EncoderExample], group_size: int
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Pad groups to ``group_size``.

    Returns:
        (questions [B], passages [n_valid] row-major over valid entries, teacher [B, G] float32, gold [B, G] bool,
        valid [B, G] bool).
    """
    b = len(examples)
    teacher = np.zeros((b, group_size), dtype=np.float32)
    gold = np.zeros((b, group_size), dtype=bool)
    valid = np.zeros((b, group_size), dtype=bool)
    passages: list[str] = []
    for i, e in enumerate(examples):
        n = min(len(e.passages), group_size)
        teacher[i, :n] = e.teacher[:n]
        gold[i, :n] = e.gold[:n]
        valid[i, :n] = True
        passages.extend(e.passages[:n])
    return [e.question for e in examples], passages, teacher, gold, valid


# ---------------------------------------------------------------------------------------------------------- batching
def steps_per_epoch(n_examples: int, world: int, per_worker: int) -> int:
    """Full global batches per epoch (the last partial one is dropped so every worker steps together)."""
    return n_examples // (world * per_worker)


def epoch_permutation(n_examples: int, epoch: int, seed: int) -> np.ndarray:
    """The order of an epoch's examples (indices into the examples sorted by query id): seeded, epoch-dependent."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def worker_batch(
    n_examples: int, *, epoch: int, step: int, rank: int, world: int, per_worker: int, seed: int
) -> list[int]:
    """Example indices of ``rank``'s batch at ``step`` of ``epoch``: a deterministic per-epoch permutation, so a
    resumed run sees exactly the batches it would have seen."""
    perm = epoch_permutation(n_examples, epoch, seed)
    start = (step * world + rank) * per_worker
    return [int(i) for i in perm[start : start + per_worker]]
