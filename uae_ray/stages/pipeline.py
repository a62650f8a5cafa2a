"""``uae-ray run``: the stages in order, skipping those whose outputs exist and are current; and the same rule for a
stage run on its own.

prepare -> mine -> label -> train-reward -> score-reward -> train-encoder (UAE) -> train-encoder (gold-only InfoNCE
ablation) -> index -> evaluate (the steps of :mod:`uae_ray.stages.registry`).

Each stage leaves a marker ``pipeline/<step>.json`` holding its whole config and the run ids of the markers it
depends on. A step is *current* when its marker is ``done``, its upstream run ids are the same and its config is the
same: it is skipped. Another config or another upstream run makes the step *stale*: its outputs are removed and it
runs again, so a stage never mistakes stale outputs for its own. A marker left ``running`` with the same config and
upstream is a crashed run: the stage runs again over its partial outputs and resumes (labeling parts, Ray Train
checkpoints, which resume only under the config they were written by). Each run of a step gets a new run id, which
makes everything downstream stale.

A stage run on its own (``uae-ray train-encoder ...``) goes through the same rule (:func:`run_stage`): it reads and
writes the same marker, and "upstream changed" means that the upstream steps' markers now hold other run ids than
the ones its marker recorded; ``--force`` reruns a current step. Inputs that no upstream marker stands for (prepare's
input files; the teacher scores mine's reward mix reads) are recorded as the marker's ``source`` fingerprint: a
changed one makes the step stale too.

Configs are compared setting by setting over the settings that both the marker and the current version know
(:func:`config_changes`): a setting added by a newer uae-ray (absent from old markers) does not make existing runs
stale, while a changed value, including a changed default, does. The label step's outputs (``label_cache/``,
``label_baseline/``, and the views ``utilities/``, ``utilities_skipped/``) are never removed, only its report: labels
are keyed by content (question, answers, passage text, the settings that change the numbers), so the label stage
reuses every pair whose fingerprint it has and labels only the new ones; an index step publishes a new immutable
version instead of removing the one an app may still serve. Every removal is checked to
stay inside the run directory.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from uae_ray.config import ActorPool, StageConfig, run_dir_name_problem
from uae_ray.data import schema as S
from uae_ray.runtime import RunDir
from uae_ray.stages.registry import STAGES, STEP_SPECS, STEPS, PipelineConfig, Stage, own_step_name, with_label
from uae_ray.storage import SUCCESS_MARKER

log = logging.getLogger("uae_ray")
MARKERS = "pipeline"
BeforeRun = Callable[[Stage], None]


@dataclass(frozen=True)
class Step:
    """One pipeline step: its stage (module, inputs, outputs), its config and the steps it reads from."""

    name: str
    stage: Stage
    config: StageConfig
    upstream: tuple[str, ...]

    @property
    def module(self) -> str:
        return self.stage.module

    @property
    def cli_stage(self) -> str:
        return self.stage.name

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(o.rstrip("/") for o in self.stage.outputs(self.config))

    @property
    def removable(self) -> tuple[str, ...]:
        """What a stale run of this step removes: its outputs except the caches that stay valid row by row."""
        return tuple(o for o in self.outputs if o not in self.stage.keep)


def plan(cfg: PipelineConfig) -> list[Step]:  # type: ignore[valid-type]
    """The steps of ``cfg`` in order (a null optional section drops its step, and the steps reading through a dropped
    reward step depend on its upstream instead; an evaluate writing elsewhere than
    ``eval`` is the step ``evaluate-<output>``). Evaluate gets the label section's generator and prompt unless its own
    ``label`` is set."""
    present = [spec for spec in STEPS if getattr(cfg, spec.field) is not None]
    names = {spec.name for spec in present}

    def upstream(of: tuple[str, ...]) -> list[str]:
        # a dropped step stands aside for its own upstream: what it would have read still feeds what reads it
        # (train-encoder without score-reward and train-reward reads label's utilities and mine's pools)
        out: list[str] = []
        for u in of:
            out += [u] if u in names else upstream(STEP_SPECS[u].upstream) if STEP_SPECS[u].bypassed else []
        return list(dict.fromkeys(out))

    steps = []
    for spec in present:
        config = getattr(cfg, spec.field)
        if spec.stage == "evaluate":
            config = with_label(config, cfg.label)
        steps.append(Step(spec.name_for(config), STAGES[spec.stage], config, tuple(upstream(spec.upstream))))
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


# ------------------------------------------------------------------------------------------ inputs no marker covers
def source_fingerprint(step: Step, run_dir: RunDir) -> str | None:
    """Fingerprint of what ``step`` reads that no upstream marker stands for: prepare's input files
    (:func:`uae_ray.stages.prepare.input_stamps`), the teacher scores mine mixes in (``reward_weight`` > 0), the
    models of evaluate's extra ``students`` (a ``run:<dir>``'s commit record, a local directory's files: retrained
    by a step outside this pipeline or by another run). None: nothing such.

    Every part counts by content (SHA-256), never by mtime or absolute path: the run directory is read from other
    machines (a Ray job's driver, a copy of the run dir) where the same bytes have other mtimes."""
    cfg: Any = step.config
    parts: list[Any] = []
    if step.stage.name == "prepare":
        from uae_ray.stages.prepare import input_stamps

        parts = input_stamps(cfg)
    elif step.stage.name == "mine" and cfg.reward_weight > 0:
        parts = [S.TEACHER_SCORES, run_dir.sha256(S.TEACHER_SCORES) if run_dir.exists(S.TEACHER_SCORES) else None]
    elif step.stage.name == "evaluate":
        from uae_ray.index.source import encoder_fingerprint

        for name, spec in sorted(cfg.students.items()):
            if spec.startswith("run:"):
                marker = f"{spec.removeprefix('run:')}/{SUCCESS_MARKER}"
                parts.append([name, spec, run_dir.sha256(marker) if run_dir.exists(marker) else None])
            elif Path(spec).expanduser().is_dir():
                parts.append([name, spec, encoder_fingerprint(str(Path(spec).expanduser()))])
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16] if parts else None


# ---------------------------------------------------------------------------------------------------------- markers
def read_marker(run_dir: RunDir, name: str) -> dict[str, Any] | None:
    path = f"{MARKERS}/{name}.json"
    if not run_dir.exists(path):
        return None
    try:
        return run_dir.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("pipeline: marker %s is unreadable; treating %s as never run", run_dir.path(path), name)
        return None


def upstream_ids(step: Step, run_ids: Mapping[str, str | None]) -> dict[str, str | None]:
    """The run ids of the steps ``step`` reads from (None: not run)."""
    return {u: run_ids.get(u) for u in step.upstream}


def marker_run_ids(step: Step, run_dir: RunDir) -> dict[str, str | None]:
    """The run ids the upstream steps' markers hold now (a stage run on its own: what "upstream" means there)."""
    return {u: (read_marker(run_dir, u) or {}).get("run_id") for u in step.upstream}


def staleness(step: Step, marker: Mapping[str, Any], run_ids: Mapping[str, str | None],
              source: str | None = None) -> list[str]:
    """Why ``marker`` no longer describes ``step``: the changed settings, ``upstream <step>`` for each upstream step
    that ran again, ``inputs`` when the source fingerprint changed; empty when it still does."""
    why = config_changes(marker.get("config"), step.config)
    before = marker.get("upstream") or {}
    why += [f"upstream {u}" for u, rid in upstream_ids(step, run_ids).items() if before.get(u) != rid]
    if "source" in marker and marker["source"] != source:
        why.append("inputs")
    return why


def step_state(marker: Mapping[str, Any] | None, why_stale: list[str]) -> str:
    """``current`` (done, nothing changed), ``resume`` (crashed, nothing changed), ``stale`` or ``new``;
    ``why_stale`` is :func:`staleness` of the marker."""
    if marker is None:
        return "new"
    if why_stale:
        return "stale"
    return "current" if marker.get("status") == "done" else "resume"


def describe(state: str, why: list[str]) -> str:
    """What a step does, in words: ``current, skipped``, ``stale: lr changed, rerunning``..."""
    return {
        "current": "current, skipped",
        "new": "not run yet, running",
        "resume": "interrupted run of the same config, resuming",
        "forced": "--force, rerunning",
    }.get(state, f"stale: {', '.join(why)} changed, rerunning")


def remove_output(run_dir: RunDir, name: str) -> None:
    """Remove run-dir entry ``name``, refusing anything that would reach outside the run directory (configured
    names are validated already; this is the second lock)."""
    problem = run_dir_name_problem(name)
    if problem is None and run_dir.is_local:
        root = Path(run_dir.root).resolve()
        target = Path(run_dir.path(name)).resolve()
        if target == root or root not in target.parents:
            problem = f"resolves to {target}, outside {root}"
    if problem:
        raise ValueError(f"refusing to remove {name!r} from {run_dir.uri}: the name {problem}")
    run_dir.remove(name)


# -------------------------------------------------------------------------------------------------------- one step
def execute(step: Step, run_dir: RunDir, *, state: str, why: list[str], run_ids: Mapping[str, str | None],
            before_run: BeforeRun | None = None) -> dict[str, Any]:
    """Run ``step`` whatever its state says (not ``current``): remove its stale outputs, mark it ``running``, call
    ``before_run`` (the CLI starts Ray there), run the stage, mark it ``done`` under a new run id.

    Returns {"state", "run_id", "seconds", "summary"}."""
    log.info("%s: %s", step.name, describe(state, why))
    if state in ("stale", "forced"):
        remove = step.removable
        log.info("%s: removing %s%s", step.name, list(remove),
                 f" (kept: {list(step.stage.keep)})" if step.stage.keep else "")
        for out in remove:
            remove_output(run_dir, out)
    run_id = uuid.uuid4().hex[:12]
    base = {"step": step.name, "stage": step.stage.name, "run_id": run_id,
            "config": step.config.model_dump(mode="json"), "upstream": upstream_ids(step, run_ids),
            "source": source_fingerprint(step, run_dir), "outputs": list(step.outputs)}
    run_dir.write_json(f"{MARKERS}/{step.name}.json", {**base, "status": "running", "started": time.time()})
    if before_run is not None:
        before_run(step.stage)
    t0 = time.perf_counter()
    module = importlib.import_module(f"uae_ray.stages.{step.module}")
    summary = module.run(step.config, run_dir)
    seconds = round(time.perf_counter() - t0, 1)
    run_dir.write_json(f"{MARKERS}/{step.name}.json", {**base, "status": "done", "seconds": seconds,
                                                      "summary": summary})
    return {"state": state, "run_id": run_id, "seconds": seconds, "summary": summary}


def decide(step: Step, run_dir: RunDir, run_ids: Mapping[str, str | None], *,
           force: bool = False) -> tuple[str, list[str], dict[str, Any] | None]:
    """(state, why, marker) of ``step`` given the upstream run ids: the one freshness rule."""
    marker = read_marker(run_dir, step.name)
    why = staleness(step, marker, run_ids, source_fingerprint(step, run_dir)) if marker is not None else []
    state = step_state(marker, why)
    if force and state == "current":
        state = "forced"
    return state, why, marker


# ------------------------------------------------------------------------------------------- a stage on its own
def step_for(stage: str, config: StageConfig, run_dir: RunDir) -> Step:
    """The pipeline step a standalone ``uae-ray <stage>`` stands for (its marker, its upstream).

    A stage with several steps (train-encoder: the student and its ablation) is the step whose marker lists the
    same outputs, else the one whose default config writes them, else a step of its own named after its first
    output (``train-encoder-<output>``, upstream as the stage's first step). A single step is named as in a
    pipeline (:meth:`~uae_ray.stages.registry.StepSpec.name_for`: ``evaluate-<output>`` for a second
    evaluation)."""
    st = STAGES[stage]
    specs = [s for s in STEPS if s.stage == stage]
    if not specs or not st.writes:
        raise ValueError(f"{stage} is not a pipeline step: it has no marker")
    outputs = [o.rstrip("/") for o in st.outputs(config)]
    spec = specs[0]
    if len(specs) > 1:
        by_marker = [s for s in specs if (read_marker(run_dir, s.name) or {}).get("outputs") == outputs]
        by_default = [s for s in specs if s.default is not None
                      and [o.rstrip("/") for o in st.outputs(s.default)] == outputs]
        if by_marker or by_default:
            spec = (by_marker or by_default)[0]
        else:
            return Step(own_step_name(stage, outputs), st, config, spec.upstream)
        return Step(spec.name, st, config, spec.upstream)
    return Step(spec.name_for(config), st, config, spec.upstream)


def run_stage(stage: str, config: StageConfig, run_dir: RunDir, *, force: bool = False,
              before_run: BeforeRun | None = None) -> dict[str, Any]:
    """Run one stage on its own under the pipeline's rule: skipped when its step's marker is current (same config,
    upstream markers unchanged), else its stale outputs removed and run; ``force`` reruns a current step.

    Returns {"step", "state", "why", "summary"} (summary: the stage's, or the marker's when skipped)."""
    step = step_for(stage, config, run_dir)
    run_ids = marker_run_ids(step, run_dir)
    state, why, marker = decide(step, run_dir, run_ids, force=force)
    if state == "current":
        log.info("%s: %s (%s)", step.name, describe(state, why), run_dir.path(f"{MARKERS}/{step.name}.json"))
        return {"step": step.name, "state": state, "why": why, "summary": (marker or {}).get("summary")}
    done = execute(step, run_dir, state=state, why=why, run_ids=run_ids, before_run=before_run)
    return {"step": step.name, "state": state, "why": why, "summary": done["summary"]}


# ---------------------------------------------------------------------------------------------------- whole run
def run(cfg: PipelineConfig, run_dir: RunDir, until: str | None = None,  # type: ignore[valid-type]
        before_run: BeforeRun | None = None) -> dict[str, Any]:
    """Run every step that is not current, in order; stop after the ``until`` stage (a CLI subcommand name);
    ``before_run(stage)`` is called before each step that runs (the CLI starts Ray there, once).

    Returns:
        {step: {"state": new|stale|resume|current, "seconds": ..., "summary": stage summary}}; the evaluation's
        result table is printed (and is ``<evaluate.output>/report.md``).
    """
    steps = plan(cfg)
    if until is not None and until not in {s.cli_stage for s in steps}:
        raise ValueError(f"--until {until!r} is not a step of this pipeline: {[s.cli_stage for s in steps]}")
    run_ids: dict[str, str | None] = {}
    result: dict[str, Any] = {}
    for i, step in enumerate(steps):
        state, why, marker = decide(step, run_dir, run_ids)
        if state == "current":
            run_ids[step.name] = (marker or {})["run_id"]
            log.info("%s: %s", step.name, describe(state, why))
            result[step.name] = {"state": state, "summary": (marker or {}).get("summary")}
        else:
            done = execute(step, run_dir, state=state, why=why, run_ids=run_ids, before_run=before_run)
            run_ids[step.name] = done["run_id"]
            result[step.name] = {k: done[k] for k in ("state", "seconds", "summary")}
        last_of_stage = i + 1 == len(steps) or steps[i + 1].cli_stage != step.cli_stage
        if until is not None and step.cli_stage == until and last_of_stage:
            break
    for step in steps:  # a current evaluation's result table (a fresh one printed it already)
        if step.cli_stage != "evaluate" or result.get(step.name, {}).get("state") != "current":
            continue
        ev: Any = step.config
        if run_dir.exists(f"{ev.output}/report.md"):
            print(run_dir.read_text(f"{ev.output}/report.md"))
    return result
