"""``uae-ray train-reward``: fit the cross-encoder reward model on utilities with Ray Train, then report its ranking
quality (Spearman, NDCG@10 against utilities) on held-out training documents and on dev -> reward_model/,
reward_report.json, reward_train_loss.png.

Whether it needs to run at all is the pipeline's rule (:func:`uae_ray.stages.pipeline.run_stage`); here it always
trains, resuming Ray Train checkpoints only of the same config and examples."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from uae_ray.config import TrainRewardConfig
from uae_ray.data.schema import CANDIDATES, CORPUS, QUERIES, REWARD_MODEL, REWARD_REPORT, UTILITIES
from uae_ray.runtime import RunDir, ensure_ray
from uae_ray.training.data import RewardGroup, build_reward_groups, heldout_documents
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


def run(cfg: TrainRewardConfig, run_dir: RunDir) -> dict:
    queries, corpus = run_dir.read_table(QUERIES), run_dir.read_table(CORPUS)
    utilities = run_dir.read_table(UTILITIES)
    groups, skips = build_reward_groups(queries, corpus, utilities)
    held = heldout_documents([g.doc_id for g in groups if g.split == "train"], cfg.heldout_fraction, cfg.seed)
    train = [g for g in groups if g.split == "train" and g.doc_id not in held]
    heldout = [g for g in groups if g.split == "train" and g.doc_id in held]
    dev = [g for g in groups if g.split == "dev"]
    if not train:
        raise ValueError(
            f"{run_dir.path(UTILITIES)}: no labeled split=train query with >= 2 candidates (skips: {skips}); "
            "run `uae-ray label` on the train split first"
        )
    log.info("train-reward: %d train / %d held-out / %d dev queries; skipped %s", len(train), len(heldout), len(dev),
             skips)

    t0 = time.perf_counter()
    ensure_ray()
    config = loop_config(cfg, [asdict(g) for g in train], run_dir, REWARD_MODEL)
    make_trainer(reward_train_loop, config, cfg.scaling, run_dir, "train_reward").fit()
    train_s = time.perf_counter() - t0
    model_dir = run_dir.fetch_dir(REWARD_MODEL)
    state = json.loads((model_dir / "training.json").read_text())["state"]

    from uae_ray.models.reward import read_reward_model

    model = read_reward_model(str(model_dir))  # not the per-process cache: this directory was just rewritten
    evaluation: dict[str, Any] = {}
    candidates = run_dir.read_table(CANDIDATES) if run_dir.exists(CANDIDATES) else None
    for name, split_groups in (("heldout", heldout), ("dev", dev)):
        sub = split_groups[: cfg.eval_max_queries]
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
        "queries": {"train": len(train), "heldout": len(heldout), "dev": len(dev)},
        "heldout_documents": len(held),
        "skipped": skips,
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
