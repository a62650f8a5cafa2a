"""``uae-ray train-reward``: fit the cross-encoder reward model on utilities with Ray Train, then report its ranking
quality (Spearman, NDCG@10 against utilities) on held-out training documents and on dev -> reward_model/,
reward_report.json, reward_train_loss.png.

Whether it needs to run at all is the pipeline's rule (:func:`uae_ray.stages.pipeline.run_stage`); here it always
trains, resuming Ray Train checkpoints only of the same config and examples."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from uae_ray.config import TrainRewardConfig
from uae_ray.data.schema import CANDIDATES, REWARD_MODEL, REWARD_REPORT, UTILITIES
from uae_ray.runtime import RunDir, ensure_ray
from uae_ray.training.data import RewardGroup, heldout_documents
from uae_ray.training.dataset import TRAIN_DATA, build_reward_data, read_examples, train_datasets
from uae_ray.training.loop import loop_config, make_trainer, reward_train_loop
from uae_ray.training.report import loss_curve_png, pool_scores, ranking_quality

log = logging.getLogger("uae_ray")
LOSS_PLOT = "reward_train_loss.png"


def _score_groups(model: Any, groups: list[RewardGroup], max_length: int) -> list[np.ndarray]:
    from uae_ray.models.reward import score_pairs

    qs = [g.question for g in groups for _ in g.pids]
    ps = [p for g in groups for p in g.passages]
    flat = score_pairs(model, qs, ps, max_length=max_length)
    out, start = [], 0
    for g in groups:
        out.append(flat[start : start + len(g.pids)])
        start += len(g.pids)
    return out


@dataclass(frozen=True)
class RewardInputs:
    """What the driver holds for a reward-model run: the trainer's inputs and the query ids of each role (ids only;
    the groups themselves stay in the run directory's ``train_data/reward`` table)."""

    loop_config: dict[str, Any]
    datasets: dict[str, Any]
    train: list[str]
    heldout: list[str]
    dev: list[str]
    heldout_documents: int
    skips: dict[str, int]


def trainer_inputs(cfg: TrainRewardConfig, run_dir: RunDir) -> RewardInputs:
    """Build every labeled query's group with Ray Data into the run directory; split train / held-out documents /
    dev by the small id columns; return the trainer's inputs (the loop config carries no example)."""
    from ray.data.expressions import col, lit

    ensure_ray()
    data = build_reward_data(run_dir, f"{TRAIN_DATA}/reward")
    ids = run_dir.read_table(data.name, columns=["qid", "doc_id", "split", "has_example", "row_hash"])
    ids = ids.filter(ids["has_example"]).sort_by("qid").to_pydict()
    rows = list(zip(ids["qid"], ids["doc_id"], ids["split"], ids["row_hash"], strict=True))
    held = heldout_documents([d for _, d, s, _ in rows if s == "train"], cfg.heldout_fraction, cfg.seed)
    train = [(q, h) for q, d, s, h in rows if s == "train" and d not in held]
    if not train:
        raise ValueError(
            f"{run_dir.path(UTILITIES)}: no labeled split=train query with >= 2 candidates (skips: {data.counts}); "
            "run `uae-ray label` on the train split first"
        )
    where = col("split") == lit("train")
    if held:
        where = where & ~col("doc_id").is_in(sorted(held))
    train_data = replace(data, n_examples=len(train), row_hashes=sorted(h for _, h in train))
    return RewardInputs(
        loop_config=loop_config(cfg, train_data, run_dir, REWARD_MODEL),
        datasets=train_datasets(run_dir, data, where),
        train=[q for q, _ in train],
        heldout=[q for q, d, s, _ in rows if s == "train" and d in held],
        dev=[q for q, _, s, _ in rows if s == "dev"],
        heldout_documents=len(held),
        skips=data.counts,
    )


def run(cfg: TrainRewardConfig, run_dir: RunDir) -> dict:
    t_data = time.perf_counter()
    inputs = trainer_inputs(cfg, run_dir)
    log.info("train-reward: %d train / %d held-out / %d dev queries (built in %.1f s); skipped %s",
             len(inputs.train), len(inputs.heldout), len(inputs.dev), time.perf_counter() - t_data, inputs.skips)

    t0 = time.perf_counter()
    make_trainer(reward_train_loop, inputs.loop_config, cfg.scaling, run_dir, "train_reward", inputs.datasets).fit()
    train_s = time.perf_counter() - t0
    model_dir = run_dir.fetch_dir(REWARD_MODEL)
    state = json.loads((model_dir / "training.json").read_text())["state"]

    from uae_ray.models.reward import read_reward_model

    model = read_reward_model(str(model_dir))  # not the per-process cache: this directory was just rewritten
    evaluation: dict[str, Any] = {}
    candidates = run_dir.read_table(CANDIDATES) if run_dir.exists(CANDIDATES) else None
    for name, qids in (("heldout", inputs.heldout), ("dev", inputs.dev)):
        sub = read_examples(run_dir, f"{TRAIN_DATA}/reward", qids[: cfg.eval_max_queries], RewardGroup)
        if not sub:
            continue
        evaluation[name] = {"reward_model": ranking_quality(sub, _score_groups(model, sub, cfg.max_length))}
        if candidates is not None:
            base_groups, base_scores = pool_scores(sub, candidates)
            if base_groups:
                evaluation[name]["base_encoder"] = ranking_quality(base_groups, base_scores)

    history = state["history"]
    run_dir.write_bytes(LOSS_PLOT, loss_curve_png(history, "reward model: listwise KL + Huber", state["resumed_from"]))
    report = {
        "base_model": cfg.base_model,
        "queries": {"train": len(inputs.train), "heldout": len(inputs.heldout), "dev": len(inputs.dev)},
        "heldout_documents": inputs.heldout_documents,
        "skipped": inputs.skips,
        "steps": state["global_step"],
        "resumed_from_step": state["resumed_from"],
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "train_seconds": round(train_s, 1),
        "eval": evaluation,
        "loss_plot": LOSS_PLOT,
        "config": cfg.model_dump(),
    }
    run_dir.write_json(REWARD_REPORT, report)
    return {k: report[k] for k in ("queries", "steps", "resumed_from_step", "first_loss", "last_loss", "eval")}
