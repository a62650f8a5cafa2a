"""``uae-ray train-encoder``: distil the teacher into the student bi-encoder with Ray Train (or, with loss=infonce,
train the gold-only ablation) -> <output>/ (a SentenceTransformer directory), <output>_report.json,
<output>_train_loss.png.

Whether it needs to run at all is the pipeline's rule (:func:`uae_ray.stages.pipeline.run_stage`); here it always
trains, resuming Ray Train checkpoints only of the same config and examples."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from uae_ray.config import TrainEncoderConfig
from uae_ray.data.schema import TEACHER_SCORES, UTILITIES
from uae_ray.eval.calibrate import calibrate_encoder
from uae_ray.runtime import RunDir, ensure_ray
from uae_ray.training.dataset import TRAIN_DATA, build_encoder_data, train_datasets
from uae_ray.training.loop import encoder_train_loop, loop_config, make_trainer
from uae_ray.training.report import loss_curve_png

log = logging.getLogger("uae_ray")


def report_name(output: str) -> str:
    """Run-dir file name of the report of the model written to ``output``."""
    return f"{output}_report.json"


def teacher_source(cfg: TrainEncoderConfig, run_dir: RunDir) -> tuple[str, str]:
    """(run-dir table, score column) of ``cfg.teacher``: the reward model's scores or the raw utility labels."""
    if cfg.teacher == "reward_model":
        if not run_dir.exists(TEACHER_SCORES):
            raise FileNotFoundError(f"{run_dir.path(TEACHER_SCORES)} not found: loss={cfg.loss} with "
                                    "teacher=reward_model needs the reward model's scores (run score-reward first)")
        return TEACHER_SCORES, "teacher_score"
    if not run_dir.exists(UTILITIES):
        raise FileNotFoundError(f"{run_dir.path(UTILITIES)} not found: loss={cfg.loss} with teacher=utilities needs "
                                "the utility labels (run label first)")
    return UTILITIES, "utility"


def trainer_inputs(cfg: TrainEncoderConfig, run_dir: RunDir) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Build the examples with Ray Data into the run directory; return the trainer's (train_loop_config, datasets)
    and the example counts. The loop config carries no example: the workers read them from the datasets."""
    # the gold-only ablation is the plain supervised baseline: no teacher anywhere (negatives by base similarity)
    teacher = teacher_source(cfg, run_dir) if cfg.needs_teacher else None
    ensure_ray()
    data = build_encoder_data(run_dir, f"{TRAIN_DATA}/{cfg.output}", teacher=teacher,
                              n_hard_negatives=cfg.n_hard_negatives, useful_quantile=cfg.useful_quantile,
                              splits=tuple(cfg.splits), positives=cfg.positives,
                              min_teacher_margin=cfg.min_teacher_margin)
    counts = {**data.counts, "examples": data.n_examples}
    if not data.n_examples:
        raise ValueError(f"{run_dir.uri}: no training query of splits {cfg.splits} has positives "
                         f"({cfg.positives}) and a pool (counts: {counts})")
    return loop_config(cfg, data, run_dir, cfg.output), train_datasets(run_dir, data), counts


def run(cfg: TrainEncoderConfig, run_dir: RunDir) -> dict:
    out = cfg.output
    t_data = time.perf_counter()
    config, datasets, counts = trainer_inputs(cfg, run_dir)
    log.info("train-encoder (%s): %d queries (built in %.1f s); %s", cfg.loss, counts["examples"],
             time.perf_counter() - t_data, counts)

    t0 = time.perf_counter()
    make_trainer(encoder_train_loop, config, cfg.scaling, run_dir, f"train_encoder-{out}", datasets).fit()
    train_s = time.perf_counter() - t0
    state = json.loads((run_dir.fetch_dir(out) / "training.json").read_text())["state"]
    history = state["history"]
    plot = f"{out}_train_loss.png"
    run_dir.write_bytes(plot, loss_curve_png(history, f"student ({cfg.loss})", state["resumed_from"]))
    report = {
        "base_model": cfg.base_model,
        "loss": cfg.loss,
        "output": out,
        "examples": counts,
        "teacher": cfg.teacher if cfg.needs_teacher else None,  # None: no teacher (gold-only or answer-match)
        "positives": cfg.positives,
        "steps": state["global_step"],
        "resumed_from_step": state["resumed_from"],
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "train_seconds": round(train_s, 1),
        "loss_plot": plot,
        "config": cfg.model_dump(),
    }
    # expected utility per hit: isotonic calibration of the student's cosine on held-out labeled pairs, committed
    # into the model directory as calibration.json (uae-ray index copies it into each index version)
    report["calibration"] = calibrate_encoder(run_dir, out, tuple(cfg.splits))
    run_dir.write_json(report_name(out), report)
    return {k: report[k] for k in ("output", "loss", "examples", "steps", "resumed_from_step", "first_loss",
                                   "last_loss")}
