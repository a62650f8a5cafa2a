"""The ``uae-ray`` command: one subcommand per stage, nothing else.

Every subcommand takes ``--run-dir``, ``--config`` (YAML with one section per stage) and ``--address`` (Ray; absent:
a local cluster sized to this machine), plus ``--set KEY=VALUE`` overrides of its config section. The config is
validated here, on the driver, before Ray starts. ``jobs/<stage>.py`` calls :func:`main` with its stage name, so a
``ray job submit`` and the console script run the same code.
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
    STAGE_CONFIGS,
    ConfigError,
    InputSpec,
    load_pipeline_config,
    load_stage_config,
    read_config_file,
)

# subcommand -> module in uae_ray.stages exposing run(cfg, run_dir) -> dict
STAGE_MODULES = {
    "prepare": "prepare",
    "mine": "mine",
    "label": "label",
    "train-reward": "train_reward",
    "score-reward": "score_reward",
    "train-encoder": "train_encoder",
    "index": "index",
    "evaluate": "evaluate",
    "serve": "serve",
}
NO_RAY_STAGES = {"prepare"}


def _common(p: argparse.ArgumentParser, *, run_dir_required: bool = False) -> None:
    p.add_argument("--run-dir", required=run_dir_required, help="run directory: local path or s3://, gs:// URI")
    p.add_argument("--config", help="YAML config file with one section per stage")
    p.add_argument("--address", default=None, help="Ray address (auto, ray://host:10001); default: local cluster")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key of this stage (dotted for nested keys); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uae-ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage in STAGE_MODULES:
        p = sub.add_parser(stage, help=(STAGE_CONFIGS[stage].__doc__ or "").split("\n")[0])
        _common(p)
        if stage == "prepare":
            p.add_argument("--format", choices=["qasper", "mrqa", "squad", "jsonl", "hf"])
            p.add_argument("--input", dest="inputs", action="append", default=[], metavar="[SPLIT=]PATH",
                           help="input file; SPLIT=PATH tags its split (train/dev/test); repeatable")
            p.add_argument("--hf-dataset", help="Hugging Face dataset id (format hf), e.g. allenai/qasper")
    p = sub.add_parser("run", help="the whole pipeline, skipping stages whose outputs are current")
    _common(p)
    p.add_argument("--until", choices=[*STAGE_MODULES], help="stop after this stage")
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
    cfg = load_stage_config(STAGE_CONFIGS[stage], stage, config_path, overrides)
    if stage == "evaluate" and cfg.label is None:
        cfg = cfg.model_copy(update={"label": load_stage_config(STAGE_CONFIGS["label"], "label", config_path, [])})
    return cfg


def _resolve_run_settings(args: argparse.Namespace) -> tuple[str, str | None]:
    file_data = read_config_file(args.config)
    run_dir = args.run_dir or file_data.get("run_dir")
    if not run_dir:
        raise ConfigError("no run directory: pass --run-dir or set run_dir in the config file")
    address = args.address or file_data.get("address")
    return str(run_dir), address


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
            cfg: Any = load_pipeline_config(args.config, args.overrides) if args.config else None
            if cfg is None:
                raise ConfigError("uae-ray run needs --config FILE.yaml")
        else:
            cfg = stage_config(args.stage, args.config, _stage_overrides(args))
    except ConfigError as e:  # validated on the driver, before any Ray work
        print(f"uae-ray {args.stage}: config error: {e}", file=sys.stderr)
        return 2

    from uae_ray.data.loaders import DataError
    from uae_ray.models.registry import ModelNotFoundError
    from uae_ray.runtime import RunDir, init_ray

    rd = RunDir(run_dir)
    try:
        if args.stage not in NO_RAY_STAGES:
            init_ray(address, num_cpus=args.num_cpus)
        if args.stage == "run":
            from uae_ray.stages import pipeline

            summary = pipeline.run(cfg, rd, until=args.until)
        else:
            module = importlib.import_module(f"uae_ray.stages.{STAGE_MODULES[args.stage]}")
            summary = module.run(cfg, rd)
    except DataError as e:  # bad input: the message names file, record and field
        print(f"uae-ray {args.stage}: data error: {e}", file=sys.stderr)
        return 2
    except ModelNotFoundError as e:
        print(f"uae-ray {args.stage}: model error: {e}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
