"""Building the systems from a run directory, and the on-demand steps of an evaluation (labels, answers).

The ``evaluate`` stage only sequences these; each function reads what it needs and returns tables or dicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from uae_ray.config import EvaluateConfig, LabelConfig
from uae_ray.data.schema import ENCODER, ENCODER_INFONCE, INDEX, REWARD_MODEL
from uae_ray.eval.systems import BM25System, Corpus, DenseSystem, RerankSystem, RewardReranker, System
from uae_ray.index.versions import fetch_index, has_index
from uae_ray.models.registry import RUN_PREFIX
from uae_ray.runtime import RunDir

log = logging.getLogger("uae_ray")


def stable_order(qids: Sequence[str], seed: int) -> list[str]:
    """``qids`` in a deterministic pseudo-random order (subsets taken from its head mix documents)."""
    return sorted(qids, key=lambda q: hashlib.sha1(f"{seed}:{q}".encode()).hexdigest())


def fingerprint(obj: Any) -> str:
    """sha1 of the JSON of ``obj`` (sorted keys)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_rows(model: Any, corpus: Corpus, rows: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """float32 [n_corpus, d] with the vectors of ``rows`` filled in (the other rows stay 0: never ranked)."""
    from tqdm.auto import tqdm

    from uae_ray.models.encoder import encode
    from uae_ray.models.registry import cpu_has_bf16

    dim = model.get_embedding_dimension()
    out = np.zeros((len(corpus.pids), dim), dtype=np.float32)
    rows = np.unique(rows)
    for start in tqdm(range(0, len(rows), 1024), desc="encode passages", leave=False):
        part = rows[start : start + 1024]
        out[part] = encode(model, [corpus.texts[r] for r in part], batch_size=batch_size, bf16=cpu_has_bf16())
    return out


@dataclass
class SystemSet:
    """The systems that could be built, the reasons the others could not, and their model fingerprints."""

    systems: dict[str, System] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    index_used: dict[str, str] = field(default_factory=dict)


def _model_dir(run_dir: RunDir, name: str) -> str | None:
    return str(run_dir.fetch_dir(name)) if run_dir.dir_complete(name) else None


def dense_specs(cfg: EvaluateConfig) -> dict[str, str]:
    """name -> model spec of every dense system: the base encoder, the UAE student, its gold-only ablation and the
    extra ``students`` (``run:<dir>``: a model directory of the run dir; else a registry name, path or hub id)."""
    return {"base": cfg.base_encoder, "infonce": f"{RUN_PREFIX}{ENCODER_INFONCE}", "uae": f"{RUN_PREFIX}{ENCODER}",
            **cfg.students}


def check_students(cfg: EvaluateConfig, run_dir: RunDir) -> dict[str, str]:
    """The loadable location of every extra student (``run:`` directories fetched to this node), checked before any
    heavy work: a student whose model is missing is an error naming the student and the path."""
    from uae_ray.models.registry import ModelNotFoundError, resolve

    out = {}
    for name, spec in cfg.students.items():
        if spec.startswith(RUN_PREFIX):
            path = _model_dir(run_dir, spec.removeprefix(RUN_PREFIX))
            if path is None:
                raise FileNotFoundError(f"evaluate.students.{name}: {run_dir.path(spec.removeprefix(RUN_PREFIX))} "
                                        "is missing or incomplete (no _SUCCESS: train that encoder first)")
            out[name] = path
            continue
        try:
            out[name] = resolve(spec).path
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"evaluate.students.{name}: {e}") from e
    return out


def build_systems(cfg: EvaluateConfig, label: LabelConfig, run_dir: RunDir, corpus: Corpus, needed_rows: np.ndarray,
                  *, open_corpus: bool, students: dict[str, str] | None = None) -> SystemSet:
    """Every system of ``cfg.systems`` and ``cfg.students`` whose inputs exist; missing inputs of the built-in systems
    become skip reasons.

    Args:
        needed_rows: corpus rows any system may rank (dense encoders encode only these).
        open_corpus: open retrieval over the whole corpus (a trained student, ``uae``, ``infonce`` or an extra one,
            then searches the FAISS index when the index was built with its encoder; the base encoder, first stage
            of every re-ranker, always scores exactly).
        students: the extra students' locations (:func:`check_students`; None: checked here).
    """
    from uae_ray.index.source import encoder_fingerprint
    from uae_ray.models.encoder import load_encoder

    out = SystemSet()
    wanted = set(cfg.systems) | set(cfg.students)
    if "bm25" in wanted:
        out.systems["bm25"] = BM25System(corpus)
    located = check_students(cfg, run_dir) if students is None else students
    needs_base = wanted & {"base", "reward_rerank", "upr", "rankgpt"}
    index: Any = False  # the run's FAISS index, loaded on first need (False: not yet; None: the run has none)
    for name, spec in dense_specs(cfg).items():
        if name not in wanted and not (name == "base" and needs_base):
            continue
        if name in located:
            path: str | None = located[name]
        elif spec.startswith(RUN_PREFIX):
            path = _model_dir(run_dir, spec.removeprefix(RUN_PREFIX))
        else:
            path = spec  # a registry name: loaded (and fingerprinted) by that name
        if path is None:
            out.skipped[name] = (f"{run_dir.path(spec.removeprefix(RUN_PREFIX))} missing or incomplete (run "
                                 "train-encoder first)")
            continue
        model = load_encoder(path)
        search = None
        if name != "base" and open_corpus:
            if index is False:
                index = None
                if has_index(run_dir, INDEX):
                    from uae_ray.index.search import ShardedIndex

                    index = ShardedIndex.load(fetch_index(run_dir, INDEX)[1])  # the version index/CURRENT names
            if index is not None and index.manifest.get("encoder") == spec:
                search = index
                out.index_used[name] = f"FAISS {index.manifest.get('factory')} x {index.manifest.get('num_shards')}"
        vectors = encode_rows(model, corpus, needed_rows if search is None else np.arange(len(corpus.pids)))
        query_encoder = None
        if cfg.encoder_backend != "torch":
            from uae_ray.models.fast_encoder import load_query_encoder

            query_encoder = load_query_encoder(path, cfg.encoder_backend)
        out.systems[name] = DenseSystem(name, model, vectors, index=search, corpus=corpus,
                                        query_encoder=query_encoder)
        out.models[name] = f"{path} ({encoder_fingerprint(path)})"
    base = out.systems.get("base")
    if "reward_rerank" in wanted:
        path = _model_dir(run_dir, REWARD_MODEL)
        if path is None:
            out.skipped["reward_rerank"] = f"{run_dir.path(REWARD_MODEL)} missing (run train-reward first)"
        elif base is not None:
            from uae_ray.index.source import encoder_fingerprint
            from uae_ray.models.reward import load_reward_model

            out.systems["reward_rerank"] = RerankSystem(
                "reward_rerank", base, RewardReranker(load_reward_model(path), max_length=cfg.reward_max_length),
                corpus, cfg.rerank_top_k)
            out.models["reward_rerank"] = f"{path} ({encoder_fingerprint(path)})"
    if wanted & {"upr", "rankgpt"} and base is not None:
        from uae_ray.eval.rerankers import ListwiseReranker, QueryLikelihoodReranker
        from uae_ray.models.registry import load_causal_lm

        lm, tok = load_causal_lm(label.generator, cfg.llm_dtype or label.dtype)
        out.models["generator"] = f"{label.generator} ({cfg.llm_dtype or label.dtype})"
        if "upr" in wanted:
            out.systems["upr"] = RerankSystem("upr", base, QueryLikelihoodReranker(
                lm, tok, max_passage_tokens=label.max_passage_tokens), corpus, cfg.rerank_top_k)
        if "rankgpt" in wanted:
            out.systems["rankgpt"] = RerankSystem("rankgpt", base, ListwiseReranker(
                lm, tok, window=cfg.rankgpt_window, step=cfg.rankgpt_step,
                max_passage_tokens=cfg.rankgpt_passage_tokens, max_new_tokens=6 * cfg.rankgpt_window), corpus,
                cfg.rerank_top_k)
    if "base" not in wanted:
        out.systems.pop("base", None)
    return out


# ------------------------------------------------------------------------------------------- on-demand labels
def label_missing(label: LabelConfig, queries: pa.Table, corpus: Corpus, pairs: list[tuple[str, str]]) -> pa.Table:
    """Utilities of ``pairs`` (qid, pid) with the run's generator and prompt (labeling's in-process path)."""
    from uae_ray.labeling.pipeline import label_pairs_local
    from uae_ray.labeling.prompts import prompt_version_for
    from uae_ray.labeling.scorers import make_scorer

    table = pa.table({"qid": [q for q, _ in pairs], "pid": [p for _, p in pairs],
                      "text": [corpus.texts[corpus.row_of[p]] for _, p in pairs]})
    return label_pairs_local(make_scorer(label), queries, table, aggregate=label.answer_aggregate,
                             generator=label.generator, prompt_version=prompt_version_for(label))


# ---------------------------------------------------------------------------------------------------- answers
def answer_key(qid: str, pids: Sequence[str]) -> str:
    return qid + "\x1f" + "\x1f".join(pids)


def generate_answers(label: LabelConfig, corpus: Corpus, requests: list[tuple[str, str, list[str]]], *,
                     max_new_tokens: int, dtype: str, batch_size: int = 8) -> dict[str, str]:
    """Greedy answers for (qid, question, context pids): the labeling prompt with the passages joined (no pids: the
    no-passage prompt).

    Returns:
        answer_key(qid, pids) -> answer text.
    """
    from tqdm.auto import tqdm

    from uae_ray.labeling.prompts import build_messages, system_prompt_for
    from uae_ray.models.lm import chat_prompt_ids, cut_to_tokens, greedy_generate
    from uae_ray.models.registry import load_causal_lm

    if not requests:
        return {}
    lm, tok = load_causal_lm(label.generator, dtype)
    system = system_prompt_for(label)
    prompts = []
    for _, question, pids in requests:
        context = "\n\n".join(cut_to_tokens(tok, corpus.texts[corpus.row_of[p]], label.max_passage_tokens)
                                for p in pids)
        # no passages (an adaptive k of 0): the labeling's no-passage prompt
        prompts.append(chat_prompt_ids(tok, build_messages(system, question, context if pids else None)))
    answers: list[str] = []
    for start in tqdm(range(0, len(prompts), 32), desc="generate answers", leave=False):
        answers += greedy_generate(lm, tok, prompts[start : start + 32], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
    return {answer_key(q, p): a for (q, _, p), a in zip(requests, answers, strict=True)}
