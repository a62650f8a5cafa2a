"""``uae-ray run``: the stages in order, skipping those whose outputs exist and are current.

prepare -> mine -> label -> train-reward -> score-reward -> train-encoder (UAE) -> train-encoder (gold-only InfoNCE
ablation) -> index -> evaluate.

Each stage leaves a marker ``pipeline/<step>.json`` holding a fingerprint of its config and of the run ids of the
markers it depends on. A step is *current* when its marker is ``done`` with the same fingerprint: it is skipped. A
marker with another fingerprint (the config changed, or an upstream step ran again) makes the step *stale*: its outputs
are removed and it runs again, so a stage never mistakes stale outputs for its own. A marker left ``running`` with the
same fingerprint is a crashed run: the stage runs again over its partial outputs and resumes (labeling parts, Ray
Train checkpoints). Each run of a step gets a new run id, which makes everything downstream stale.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from uae_ray.config import PipelineConfig, StageConfig
from uae_ray.data import schema as S
from uae_ray.runtime import RunDir

log = logging.getLogger("uae_ray")
MARKERS = "pipeline"


@dataclass(frozen=True)
class Step:
    """One pipeline step: the stage module it runs, its config, the steps it reads from, and what it writes."""

    name: str
    module: str  # in uae_ray.stages
    cli_stage: str  # the subcommand (for --until)
    config: StageConfig
    upstream: tuple[str, ...]
    outputs: tuple[str, ...]


def plan(cfg: PipelineConfig) -> list[Step]:
    """The steps of ``cfg`` in order (the ablation only when configured). Evaluate gets the label section's
    generator and prompt unless its own ``label`` is set."""
    enc = cfg.train_encoder.output
    steps = [
        Step("prepare", "prepare", "prepare", cfg.prepare, (), (S.CORPUS, S.QUERIES, S.PREPARE_REPORT)),
        Step("mine", "mine", "mine", cfg.mine, ("prepare",), (S.CANDIDATES, S.MINE_REPORT)),
        Step("label", "label", "label", cfg.label, ("mine",), (S.UTILITIES, S.LABEL_REPORT)),
        Step("train-reward", "train_reward", "train-reward", cfg.train_reward, ("label",),
             (S.REWARD_MODEL, S.REWARD_REPORT, f"{S.CHECKPOINTS}/train_reward")),
        Step("score-reward", "score_reward", "score-reward", cfg.score_reward, ("train-reward", "mine"),
             (S.TEACHER_SCORES, "score_reward_report.json")),
        Step("train-encoder", "train_encoder", "train-encoder", cfg.train_encoder, ("score-reward",),
             (enc, f"{enc}_report.json", f"{enc}_train_loss.png", f"{S.CHECKPOINTS}/train_encoder-{enc}")),
    ]
    deps = ["train-encoder", "score-reward", "label"]
    if cfg.train_encoder_ablation is not None:
        abl = cfg.train_encoder_ablation.output
        if abl == enc:
            raise ValueError(f"train-encoder-ablation.output must differ from train-encoder.output ({enc!r})")
        steps.append(Step("train-encoder-ablation", "train_encoder", "train-encoder", cfg.train_encoder_ablation,
                          ("mine",), (abl, f"{abl}_report.json", f"{abl}_train_loss.png",
                                      f"{S.CHECKPOINTS}/train_encoder-{abl}")))
        deps.append("train-encoder-ablation")
    steps.append(Step("index", "index", "index", cfg.index, ("train-encoder", "prepare"), (S.INDEX,)))
    ev = cfg.evaluate if cfg.evaluate.label is not None else cfg.evaluate.model_copy(update={"label": cfg.label})
    steps.append(Step("evaluate", "evaluate", "evaluate", ev, (*deps, "index"), (S.EVAL,)))
    return steps


def fingerprint(step: Step, run_ids: dict[str, str]) -> str:
    """sha1 of the step's config and of the run ids of its upstream steps."""
    key = {"config": step.config.model_dump(mode="json"), "upstream": {u: run_ids.get(u) for u in step.upstream}}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def read_marker(run_dir: RunDir, name: str) -> dict[str, Any] | None:
    path = f"{MARKERS}/{name}.json"
    if not run_dir.exists(path):
        return None
    try:
        return run_dir.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("pipeline: marker %s is unreadable; treating %s as never run", run_dir.path(path), name)
        return None


def step_state(marker: dict[str, Any] | None, fp: str) -> str:
    """``current`` (done, same fingerprint), ``resume`` (crashed, same fingerprint), ``stale`` or ``new``."""
    if marker is None:
        return "new"
    if marker.get("fingerprint") != fp:
        return "stale"
    return "current" if marker.get("status") == "done" else "resume"


def run(cfg: PipelineConfig, run_dir: RunDir, until: str | None = None) -> dict[str, Any]:
    """Run every step that is not current, in order; stop after the ``until`` stage (a CLI subcommand name).

    Returns:
        {step: {"state": new|stale|resume|current, "seconds": ..., "summary": stage summary}}; the evaluation's
        result table is printed (and is ``eval/report.md``).
    """
    steps = plan(cfg)
    if until is not None and until not in {s.cli_stage for s in steps}:
        raise ValueError(f"--until {until!r} is not a step of this pipeline: {[s.cli_stage for s in steps]}")
    run_ids: dict[str, str] = {}
    result: dict[str, Any] = {}
    for i, step in enumerate(steps):
        fp = fingerprint(step, run_ids)
        marker = read_marker(run_dir, step.name)
        state = step_state(marker, fp)
        if state == "current":
            run_ids[step.name] = (marker or {})["run_id"]
            log.info("pipeline: %-22s current, skipped", step.name)
            result[step.name] = {"state": state, "summary": marker.get("summary")}
        else:
            if state == "stale":
                log.info("pipeline: %-22s stale (config or upstream changed): removing %s", step.name, step.outputs)
                for out in step.outputs:
                    run_dir.remove(out)
            run_id = uuid.uuid4().hex[:12]
            base = {"step": step.name, "fingerprint": fp, "run_id": run_id, "config": step.config.model_dump(
                mode="json"), "upstream": {u: run_ids.get(u) for u in step.upstream}}
            run_dir.write_json(f"{MARKERS}/{step.name}.json", {**base, "status": "running", "started": time.time()})
            log.info("pipeline: %-22s %s -> running", step.name, state)
            t0 = time.perf_counter()
            module = importlib.import_module(f"uae_ray.stages.{step.module}")
            summary = module.run(step.config, run_dir)
            seconds = round(time.perf_counter() - t0, 1)
            run_dir.write_json(f"{MARKERS}/{step.name}.json", {**base, "status": "done", "seconds": seconds,
                                                              "summary": summary})
            run_ids[step.name] = run_id
            result[step.name] = {"state": state, "seconds": seconds, "summary": summary}
        last_of_stage = i + 1 == len(steps) or steps[i + 1].cli_stage != step.cli_stage
        if until is not None and step.cli_stage == until and last_of_stage:
            break
    if "evaluate" in result and run_dir.exists(f"{S.EVAL}/report.md") and result["evaluate"]["state"] == "current":
        print(run_dir.read_text(f"{S.EVAL}/report.md"))  # a fresh evaluate printed it already
    return result
