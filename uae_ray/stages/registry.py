"""The one list of stages and pipeline steps: the CLI's subcommands, the config file's sections and ``uae-ray run``'s
steps all come from here.

A :class:`Stage` is a subcommand: its module in :mod:`uae_ray.stages` (``run(cfg, run_dir)``), its config model,
the run-directory entries it reads (checked before Ray starts) and writes. A :class:`StepSpec` is a step of
``uae-ray run`` (and the marker ``pipeline/<step>.json`` a standalone stage shares with it): the stage it runs, the
section of the config file that configures it and the steps whose outputs it reads. Two steps run ``train-encoder``:
the UAE student and the gold-only InfoNCE ablation. An evaluate step writing elsewhere than ``eval`` (a second
evaluation of the run dir) is a step of its own, ``evaluate-<output>`` (:meth:`StepSpec.name_for`).

Input and output names ending in ``/`` are directories that are complete only with their ``_SUCCESS`` marker
(models, the index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, Field, create_model, model_validator

from uae_ray.config import (
    EvaluateConfig,
    IndexConfig,
    LabelConfig,
    MineConfig,
    PrepareConfig,
    ScoreRewardConfig,
    ServeConfig,
    StageConfig,
    TrainEncoderConfig,
    TrainRewardConfig,
)
from uae_ray.data import schema as S

Names = Callable[[Any], tuple[str, ...]]


@dataclass(frozen=True)
class Stage:
    """One ``uae-ray`` subcommand."""

    name: str  # subcommand and config-file section
    module: str  # in uae_ray.stages, exposing run(cfg, run_dir) -> dict
    config: type[StageConfig]
    inputs: Names  # run-dir entries it needs (from its config): checked before Ray starts
    outputs: Names  # run-dir entries it writes: removed when its step is stale, except `keep`
    keep: tuple[str, ...] = ()  # outputs that stay valid row by row whatever changed (label caches): never removed
    uses_ray: bool = True
    writes: bool = True  # holds the run directory's lease and leaves a marker (serve only reads)

    @property
    def help(self) -> str:
        return (self.config.__doc__ or "").strip().split("\n")[0]


@dataclass(frozen=True)
class StepSpec:
    """One step of ``uae-ray run``: marker ``pipeline/<name>.json``, config section ``<name>``."""

    name: str
    stage: str
    upstream: tuple[str, ...]  # steps it reads from (absent from a pipeline: left out; bypassed: its own upstream)
    default: StageConfig | None  # the section's default; None: the section is required
    optional: bool = False  # the section may be null (the step is then dropped)
    # dropped, it stands aside: the steps reading it depend on its own upstream instead (a link of the chain, not a
    # side branch like the index or the ablation, whose readers lose nothing upstream without them)
    bypassed: bool = False
    # a config writing elsewhere than the default's is a step of its own (marker), `<name>-<output>`
    named_by_output: bool = False

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    def name_for(self, config: StageConfig) -> str:
        """The step's name (its marker ``pipeline/<name>.json``) for ``config``: :attr:`name`, or for a step
        :attr:`named_by_output` whose config writes elsewhere than the default, ``<name>-<output>``
        (``evaluate-eval_fulldev``: a second evaluation never shares the main one's marker)."""
        outputs = [o.rstrip("/") for o in STAGES[self.stage].outputs(config)]
        if not self.named_by_output or self.default is None or outputs == [
                o.rstrip("/") for o in STAGES[self.stage].outputs(self.default)]:
            return self.name
        return own_step_name(self.name, outputs)


def own_step_name(stage: str, outputs: list[str]) -> str:
    """The name of a step of its own for a config writing ``outputs``: ``<stage>-<first output>``."""
    return f"{stage}-{outputs[0].replace('/', '_')}"


def _encoder_outputs(cfg: TrainEncoderConfig) -> tuple[str, ...]:
    out = cfg.output
    return (f"{out}/", f"{out}_report.json", f"{out}_train_loss.png", f"{S.CHECKPOINTS}/train_encoder-{out}")


def _encoder_inputs(cfg: TrainEncoderConfig) -> tuple[str, ...]:
    base = (S.QUERIES, S.CORPUS, S.CANDIDATES)
    if not cfg.needs_teacher:  # the gold-only ablation and answer-match distant supervision read no teacher
        return base
    return (*base, S.TEACHER_SCORES if cfg.teacher == "reward_model" else S.UTILITIES)


def _run_models(*specs: str) -> tuple[str, ...]:
    """The run-dir model directories (``<dir>/``) of the ``run:<dir>`` model specs among ``specs``."""
    return tuple(f"{spec.removeprefix('run:')}/" for spec in specs if spec.startswith("run:"))


def _index_inputs(cfg: IndexConfig) -> tuple[str, ...]:
    return (S.CORPUS, *_run_models(cfg.encoder))


def _evaluate_inputs(cfg: EvaluateConfig) -> tuple[str, ...]:
    # the built-in systems' models are optional (a missing one is skipped, with the reason); the extra students not
    return (S.CORPUS, S.QUERIES, *_run_models(*cfg.students.values()))


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "prepare", PrepareConfig, inputs=lambda c: (),
          outputs=lambda c: (S.CORPUS, S.QUERIES, S.PREPARE_REPORT, "prepare_lengths.png"), uses_ray=False),
    Stage("mine", "mine", MineConfig,
          inputs=lambda c: (S.CORPUS, S.QUERIES, *((S.TEACHER_SCORES,) if c.reward_weight > 0 else ())),
          outputs=lambda c: (S.CANDIDATES, S.MINE_REPORT)),
    Stage("label", "label", LabelConfig, inputs=lambda c: (S.CANDIDATES, S.QUERIES, S.CORPUS),
          outputs=lambda c: (S.UTILITIES, S.LABEL_SKIPPED, S.LABEL_CACHE, S.LABEL_BASELINE, S.LABEL_REPORT),
          keep=(S.UTILITIES, S.LABEL_SKIPPED, S.LABEL_CACHE, S.LABEL_BASELINE)),  # content-keyed: valid row by row
    Stage("train-reward", "train_reward", TrainRewardConfig, inputs=lambda c: (S.QUERIES, S.CORPUS, S.UTILITIES),
          outputs=lambda c: (f"{S.REWARD_MODEL}/", S.REWARD_REPORT, "reward_train_loss.png",
                             f"{S.CHECKPOINTS}/train_reward")),
    Stage("score-reward", "score_reward", ScoreRewardConfig,
          inputs=lambda c: (f"{S.REWARD_MODEL}/", S.CANDIDATES, S.QUERIES, S.CORPUS),
          outputs=lambda c: (S.TEACHER_SCORES, "score_reward_report.json")),
    Stage("train-encoder", "train_encoder", TrainEncoderConfig, inputs=_encoder_inputs, outputs=_encoder_outputs),
    # index versions are immutable and the stage publishes a new one (pruning the oldest past keep_versions): a
    # stale index step never removes the version an app may still be serving
    Stage("index", "index", IndexConfig, inputs=_index_inputs, outputs=lambda c: (f"{S.INDEX}/",),
          keep=(f"{S.INDEX}/",)),
    Stage("evaluate", "evaluate", EvaluateConfig, inputs=_evaluate_inputs, outputs=lambda c: (c.output,)),
    Stage("serve", "serve", ServeConfig, inputs=lambda c: (f"{S.INDEX}/",), outputs=lambda c: (), writes=False),
)}

STEPS: tuple[StepSpec, ...] = (
    StepSpec("prepare", "prepare", (), None),
    StepSpec("mine", "mine", ("prepare",), MineConfig()),
    StepSpec("label", "label", ("mine",), LabelConfig()),
    # optional: a student taught by the raw utilities (teacher: utilities) or by gold alone needs no reward model
    StepSpec("train-reward", "train-reward", ("label",), TrainRewardConfig(), optional=True, bypassed=True),
    StepSpec("score-reward", "score-reward", ("train-reward", "mine"), ScoreRewardConfig(), optional=True,
             bypassed=True),
    StepSpec("train-encoder", "train-encoder", ("score-reward",), TrainEncoderConfig()),
    StepSpec("train-encoder-ablation", "train-encoder", ("mine",),
             TrainEncoderConfig(loss="infonce", output=S.ENCODER_INFONCE), optional=True),
    # optional: without it, evaluate's open setting scores every passage exactly with each dense system's vectors
    StepSpec("index", "index", ("train-encoder", "prepare"), IndexConfig(), optional=True),
    StepSpec("evaluate", "evaluate", ("train-encoder", "score-reward", "label", "train-encoder-ablation", "index"),
             EvaluateConfig(), named_by_output=True),
)
STEP_SPECS: dict[str, StepSpec] = {s.name: s for s in STEPS}

#: subcommand -> config model (the config file's sections for single stages)
STAGE_CONFIGS: dict[str, type[StageConfig]] = {name: s.config for name, s in STAGES.items()}


def with_label(cfg: EvaluateConfig, label: LabelConfig) -> EvaluateConfig:
    """Evaluate takes the label section's generator and prompt (ExpUtil labels on demand, answers) unless it sets
    its own ``label``."""
    return cfg if cfg.label is not None else cfg.model_copy(update={"label": label})


_HINTS = {("train-encoder", S.TEACHER_SCORES): " (a student without a reward model: train-encoder.teacher: utilities, "
                                               "or loss: infonce)",
          ("mine", S.TEACHER_SCORES): " (mine.reward_weight > 0 mixes in the reward model's scores)"}


class _PipelineBase(StageConfig):
    """``uae-ray run``: every step's section; absent sections take defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _dropped_steps_feed_nothing(self) -> _PipelineBase:
        """A null section drops its step: no step left may read what only the dropped step writes (a student taught
        by the reward model with ``score-reward: null``)."""
        made: set[str] = set()
        for spec in STEPS:
            cfg = getattr(self, spec.field)
            if cfg is not None:
                made |= {o.rstrip("/") for o in STAGES[spec.stage].outputs(cfg)}
        dropped = {o.rstrip("/"): spec.name for spec in STEPS if getattr(self, spec.field) is None
                   and spec.default is not None for o in STAGES[spec.stage].outputs(spec.default)}
        for spec in STEPS:
            cfg = getattr(self, spec.field)
            if cfg is None:
                continue
            for need in (i.rstrip("/") for i in STAGES[spec.stage].inputs(cfg)):
                if need in dropped and need not in made:
                    raise ValueError(f"{spec.name} reads {need!r}, which only {dropped[need]} writes, and "
                                     f"{dropped[need]} is null" + _HINTS.get((spec.stage, need), ""))
        return self

    @model_validator(mode="after")
    def _distinct_outputs(self) -> _PipelineBase:
        """Two steps of one stage (train-encoder and its ablation) must not write the same entries."""
        seen: dict[str, str] = {}
        for spec in STEPS:
            cfg = getattr(self, spec.field)
            if cfg is None:
                continue
            for out in (o.rstrip("/") for o in STAGES[spec.stage].outputs(cfg)):
                if out in seen:
                    raise ValueError(f"{spec.name} and {seen[out]} both write {out!r}: "
                                     f"{spec.name}.output must differ from {seen[out]}.output")
                seen[out] = spec.name
        return self


def _section(spec: StepSpec) -> tuple[Any, Any]:
    cls = STAGES[spec.stage].config
    annotation: Any = cls | None if spec.optional else cls
    default = ... if spec.default is None else spec.default
    return annotation, Field(default, alias=spec.name)


PipelineConfig: type[_PipelineBase] = create_model(  # type: ignore[call-overload]
    "PipelineConfig", __base__=_PipelineBase, __module__=__name__, **{s.field: _section(s) for s in STEPS},
)
PipelineConfig.__doc__ = _PipelineBase.__doc__
