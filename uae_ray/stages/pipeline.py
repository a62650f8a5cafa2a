"""``uae-ray run``: the stages in order, skipping those whose outputs exist and are current.

prepare -> mine -> label -> train-reward -> score-reward -> train-encoder (UAE) -> train-encoder (gold-only InfoNCE
ablation) -> index -> evaluate.

Each stage leaves a marker ``pipeline/<step>.json`` holding its whole config and the run ids of the markers it
depends on. A step is *current* when its marker is ``done``, its upstream run ids are the same and its config is the
same: it is skipped. Another config or another upstream run makes the step *stale*: its outputs are removed and it
runs again, so a stage never mistakes stale outputs for its own. A marker left ``running`` with the same config and
upstream is a crashed run: the stage runs again over its partial outputs and resumes (labeling parts, Ray Train
checkpoints). Each run of a step gets a new run id, which makes everything downstream stale.

Configs are compared setting by setting over the settings that both the marker and the current version know
(:func:`config_changes`): a setting added by a newer uae-ray (absent from old markers) does not make existing runs
stale, while a changed value, including a changed default, does. The label step keeps its utilities when only an
upstream step changed (its own config is the same): labels are keyed by (qid, pid, generator, prompt version), so
the label stage itself keeps every still-valid pair and labels only the pairs that are new.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from uae_ray.config import ActorPool, PipelineConfig, StageConfig
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
    keep_on_upstream_change: bool = False  # outputs stay valid per row when only upstream changed (labels)


def plan(cfg: PipelineConfig) -> list[Step]:
    """The steps of ``cfg`` in order (the ablation only when configured). Evaluate gets the label section's
    generator and prompt unless its own ``label`` is set."""
    enc = cfg.train_encoder.output
    steps = [
        Step("prepare", "prepare", "prepare", cfg.prepare, (), (S.CORPUS, S.QUERIES, S.PREPARE_REPORT)),
        Step("mine", "mine", "mine", cfg.mine, ("prepare",), (S.CANDIDATES, S.MINE_REPORT)),
        Step("label", "label", "label", cfg.label, ("mine",), (S.UTILITIES, S.LABEL_REPORT),
             keep_on_upstream_change=True),
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


def config_changes(stored: Any, config: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the settings whose value in ``stored`` (a marker's JSON config) differs from ``config``.

    Only settings both know are compared: a field added since the marker was written (or removed) is not a change;
    a changed value is, whether set in the config file or a changed default. Nested stage sections are compared
    field by field; any other value (lists, user dicts such as ``max_docs_per_split``) as a whole. Ray Data actor
    pools (``pool``: how many actors, CPUs, GPUs) say where the work runs, not what it produces: never a change."""
    if not isinstance(stored, Mapping):
        return [prefix.rstrip(".") or "<config>"]
    changed = []
    for name in type(config).model_fields:
        if name not in stored:
            continue
        value = getattr(config, name)
        if isinstance(value, ActorPool):
            continue
        if isinstance(value, BaseModel):
            changed += config_changes(stored[name], value, f"{prefix}{name}.")
        elif to_jsonable_python(value) != stored[name]:
            changed.append(f"{prefix}{name}")
    return changed


def upstream_ids(step: Step, run_ids: Mapping[str, str]) -> dict[str, str | None]:
    """The run ids of the steps ``step`` reads from (None: not run in this pipeline)."""
    return {u: run_ids.get(u) for u in step.upstream}


def staleness(step: Step, marker: Mapping[str, Any], run_ids: Mapping[str, str]) -> list[str]:
    """Why ``marker`` no longer describes ``step``: the changed settings and ``upstream <step>`` for each upstream
    step that ran again; empty when it still does."""
    why = config_changes(marker.get("config"), step.config)
    before = marker.get("upstream") or {}
    why += [f"upstream {u}" for u, rid in upstream_ids(step, run_ids).items() if before.get(u) != rid]
    return why


def stale_outputs(step: Step, marker: Mapping[str, Any] | None) -> tuple[str, ...]:
    """What a stale step removes before it runs again: its outputs, or nothing when the step keeps them per row
    (``keep_on_upstream_change``) and only upstream changed (the marker's config is the same)."""
    if not step.keep_on_upstream_change or marker is None:
        return step.outputs
    return step.outputs if config_changes(marker.get("config"), step.config) else ()


def read_marker(run_dir: RunDir, name: str) -> dict[str, Any] | None:
    path = f"{MARKERS}/{name}.json"
    if not run_dir.exists(path):
        return None
    try:
        return run_dir.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("pipeline: marker %s is unreadable; treating %s as never run", run_dir.path(path), name)
        return None


def step_state(marker: Mapping[str, Any] | None, why_stale: list[str]) -> str:
    """``current`` (done, nothing changed), ``resume`` (crashed, nothing changed), ``stale`` or ``new``;
    ``why_stale`` is :func:`staleness` of the marker."""
    if marker is None:
        return "new"
    if why_stale:
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
        marker = read_marker(run_dir, step.name)
        why = staleness(step, marker, run_ids) if marker is not None else []
        state = step_state(marker, why)
        if state == "current":
            run_ids[step.name] = (marker or {})["run_id"]
            log.info("pipeline: %-22s current, skipped", step.name)
            result[step.name] = {"state": state, "summary": marker.get("summary")}
        else:
            if state == "stale":
                remove = stale_outputs(step, marker)
                log.info("pipeline: %-22s stale (%s): removing %s%s", step.name, ", ".join(why), remove,
                         "" if remove else " (same config, upstream changed: the stage keeps what is still valid)")
                for out in remove:
                    run_dir.remove(out)
            run_id = uuid.uuid4().hex[:12]
            base = {"step": step.name, "run_id": run_id, "config": step.config.model_dump(mode="json"),
                    "upstream": upstream_ids(step, run_ids)}
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
