"""The ``uae-ray`` command: one subcommand per stage of :mod:`uae_ray.stages.registry`, plus ``run``.

Every subcommand takes ``--run-dir``, ``--config`` (YAML with one section per stage) and ``--address`` (Ray; absent:
a local cluster sized to this machine), plus ``--set KEY=VALUE`` overrides of its config section. Before Ray starts,
the config is validated, the run-dir entries the stage reads are checked and the run directory's lease is taken
(every subcommand that writes holds it to the end); a stage run on its own follows ``uae-ray run``'s freshness rule
(its marker ``pipeline/<step>.json``: current -> skipped, stale -> rerun, ``--force`` -> rerun). A user error (bad
config, missing input, lease held, mismatched data) is one line on stderr and exit status 2. ``jobs/<stage>.py``
calls :func:`main` with its stage name, so a ``ray job submit`` and the console script run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from uae_ray.config import (
    ConfigError,
    InputSpec,
    load_pipeline_config,
    load_stage_config,
    read_config_file,
    storage_config,
)
from uae_ray.stages.registry import STAGES, STEPS, Stage, with_label

EXIT_USER_ERROR = 2


class UsageError(ValueError):
    """A command line that cannot run as given (the message says what to change)."""


class MissingInputError(FileNotFoundError):
    """A run-dir entry the stage reads is absent; the message names it and the stage that writes it."""


def _common(p: argparse.ArgumentParser, *, writes: bool) -> None:
    p.add_argument("--run-dir", help="run directory: local path or s3://, gs:// URI")
    p.add_argument("--config", help="YAML config file with one section per stage")
    p.add_argument("--address", default=None, help="Ray address (auto, ray://host:10001); default: local cluster")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local cluster (default: all)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key of this stage (dotted for nested keys); repeatable",
    )
    if writes:
        p.add_argument("--take-over-lease", action="store_true",
                       help="take the run directory's lease from a writer whose heartbeat has expired")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uae-ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=stage.help)
        _common(p, writes=stage.writes)
        if stage.writes:
            p.add_argument("--force", action="store_true", help="run even when the stage's outputs are current")
        if stage.name == "prepare":
            p.add_argument("--format", choices=["qasper", "mrqa", "squad", "jsonl", "hf"])
            p.add_argument("--input", dest="inputs", action="append", default=[], metavar="[SPLIT=]PATH",
                           help="input file; SPLIT=PATH tags its split (train/dev/test); repeatable")
            p.add_argument("--hf-dataset", help="Hugging Face dataset id (format hf), e.g. allenai/qasper")
    p = sub.add_parser("run", help="the whole pipeline, skipping stages whose outputs are current")
    _common(p, writes=True)
    p.add_argument("--until", choices=list(dict.fromkeys(s.stage for s in STEPS)), help="stop after this stage")
    return parser


def _stage_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags of `prepare` turned into config overrides (the flags win over the file)."""
    extra: list[str] = []
    if args.stage == "prepare":
        if args.format:
            extra.append(f"format={args.format}")
        if args.inputs:
            specs = [InputSpec.parse(x).model_dump() for x in args.inputs]
            extra.append("inputs=" + json.dumps(specs))
        if args.hf_dataset:
            extra.append(f"hf_dataset={args.hf_dataset}")
    return [*extra, *args.overrides]


def stage_config(stage: str, config_path: str | None, overrides: list[str]) -> Any:
    """The validated config of one stage; ``evaluate`` takes the file's ``label`` section (generator, prompt) unless
    it sets its own, as ``uae-ray run`` does, so ExpUtil labels on demand match the run's labels."""
    cfg = load_stage_config(STAGES[stage].config, stage, config_path, overrides)
    if stage == "evaluate":
        cfg = with_label(cfg, load_stage_config(STAGES["label"].config, "label", config_path, []))
    return cfg


def _resolve_run_settings(args: argparse.Namespace) -> tuple[str, str | None]:
    file_data = read_config_file(args.config)
    run_dir = args.run_dir or file_data.get("run_dir")
    if not run_dir:
        raise ConfigError("no run directory: pass --run-dir or set run_dir in the config file")
    address = args.address or file_data.get("address")
    if args.num_cpus is not None and (address or os.environ.get("RAY_ADDRESS")):
        where = address or f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        raise UsageError(f"--num-cpus sizes a new local cluster, but this run connects to the cluster at {where} "
                         "(its nodes declare their own CPUs): drop --num-cpus")
    return str(run_dir), address


def missing_inputs(stage: Stage, cfg: Any, run_dir: Any) -> list[str]:
    """The run-dir entries ``stage`` reads that are absent (a name ending in ``/`` needs its ``_SUCCESS``)."""
    missing = []
    for name in stage.inputs(cfg):
        ok = run_dir.dir_complete(name.rstrip("/")) if name.endswith("/") else run_dir.exists(name)
        if not ok:
            missing.append(name.rstrip("/"))
    return missing


def _writer_of(name: str) -> str:
    """The stage that writes run-dir entry ``name`` (with its default config), for the missing-input message."""
    for step in STEPS:
        stage = STAGES[step.stage]
        if step.default is not None and name in {o.rstrip("/") for o in stage.outputs(step.default)}:
            return stage.name
    return "prepare" if name in {o.rstrip("/") for o in STAGES["prepare"].outputs(None)} else "its stage"


def check_inputs(stage: Stage, cfg: Any, run_dir: Any) -> None:
    missing = missing_inputs(stage, cfg, run_dir)
    if missing:
        what = ", ".join(f"{m} (written by `uae-ray {_writer_of(m)}`)" for m in missing)
        raise MissingInputError(f"{run_dir.display} lacks {what}: run that first")


def _user_error_kind(e: BaseException) -> str | None:
    """``config``, ``input``... for the errors a user fixes (one line, exit 2); None for a bug (traceback)."""
    from uae_ray.data.loaders import DataError
    from uae_ray.models.registry import ModelNotFoundError
    from uae_ray.runtime import LeaseHeldError, LeaseLostError

    kinds: list[tuple[str, tuple[type[BaseException], ...]]] = [
        ("config error", (ConfigError, UsageError)),
        ("lease held", (LeaseHeldError,)),
        ("lease lost", (LeaseLostError,)),
        ("data error", (DataError,)),
        ("model error", (ModelNotFoundError,)),
        ("missing input", (MissingInputError, FileNotFoundError)),
    ]
    # mismatches between the run directory and this config, raised by stages already imported
    for module, name in (("uae_ray.stages.label", "LabelMismatchError"), ("uae_ray.index.search", "IndexLoadError"),
                         ("uae_ray.index.build", "IndexBuildError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            kinds.append(("mismatch", (cls,)))
    return next((kind for kind, classes in kinds if isinstance(e, classes)), None)


def _one_line(text: str) -> str:
    """A multi-line message (a config error lists one field a line) as one line."""
    out = ""
    for line in (ln.strip() for ln in str(text).splitlines() if ln.strip()):
        out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def _connect(address: str | None, num_cpus: int | None) -> Any:
    """A callback starting Ray (once) before the first stage that uses it: a current stage never starts Ray."""
    def before(stage: Stage) -> None:
        if stage.uses_ray:
            from uae_ray.runtime import init_ray

            init_ray(address, num_cpus=num_cpus)
    return before


def _execute(args: argparse.Namespace, cfg: Any, run_dir: str, address: str | None) -> Any:
    from uae_ray.runtime import RunDir, StorageOptions
    from uae_ray.stages import pipeline

    storage = storage_config(args.config)
    rd = RunDir(run_dir, StorageOptions(**storage.model_dump()))
    before = _connect(address, args.num_cpus)
    if args.stage == "run":
        with rd.lease(take_over=args.take_over_lease, command="uae-ray run"):
            return pipeline.run(cfg, rd, until=args.until, before_run=before)
    stage = STAGES[args.stage]
    check_inputs(stage, cfg, rd)
    if not stage.writes:  # serve: reads the run directory, holds no lease, leaves no marker
        module = importlib.import_module(f"uae_ray.stages.{stage.module}")
        if hasattr(module, "preflight"):  # refusals that need no cluster come before Ray starts
            module.preflight(cfg)
        before(stage)
        return module.run(cfg, rd)
    with rd.lease(take_over=args.take_over_lease, command=f"uae-ray {stage.name}"):
        return pipeline.run_stage(stage.name, cfg, rd, force=args.force, before_run=before)["summary"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_dir, address = _resolve_run_settings(args)
        if args.stage == "run":
            if not args.config:
                raise ConfigError("uae-ray run needs --config FILE.yaml")
            cfg: Any = load_pipeline_config(args.config, args.overrides)
        else:
            cfg = stage_config(args.stage, args.config, _stage_overrides(args))
        summary = _execute(args, cfg, run_dir, address)
    except Exception as e:
        kind = _user_error_kind(e)
        if kind is None:
            raise
        print(f"uae-ray {args.stage}: {kind}: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
