"""Config loading: YAML sections, dotted overrides, validation errors that name the file and field, frozen models."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from uae_ray.config import (
    STAGE_CONFIGS,
    ConfigError,
    InputSpec,
    PipelineConfig,
    PrepareConfig,
    SplitRatios,
    apply_overrides,
    load_pipeline_config,
    load_stage_config,
    read_config_file,
)


def test_input_spec_parse():
    assert InputSpec.parse("train=data/a.json") == InputSpec(path="data/a.json", split="train")
    assert InputSpec.parse("data/a.json") == InputSpec(path="data/a.json", split=None)
    assert InputSpec.parse("s3://b/k=v.json") == InputSpec(path="s3://b/k=v.json")  # '=' but no split name


def test_prepare_config_validation():
    cfg = PrepareConfig(format="qasper", inputs=[InputSpec(path="x.json")])
    assert cfg.max_passage_tokens == 256 and cfg.require_gold and cfg.split_ratios == SplitRatios()
    with pytest.raises(pydantic.ValidationError, match="needs at least one input"):
        PrepareConfig(format="squad")
    with pytest.raises(pydantic.ValidationError, match="needs hf_dataset"):
        PrepareConfig(format="hf")
    with pytest.raises(pydantic.ValidationError, match="not inputs"):
        PrepareConfig(format="hf", hf_dataset="allenai/qasper", inputs=[InputSpec(path="x")])
    with pytest.raises(pydantic.ValidationError, match="only read with format=hf"):
        PrepareConfig(format="qasper", hf_dataset="allenai/qasper", inputs=[InputSpec(path="x")])
    with pytest.raises(pydantic.ValidationError, match="at most half of max_passage_tokens"):
        PrepareConfig(format="jsonl", inputs=[InputSpec(path="x")], max_passage_tokens=32, window_overlap=17)
    with pytest.raises(pydantic.ValidationError, match="sum to 1"):
        SplitRatios(train=0.5, dev=0.1, test=0.1)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        PrepareConfig(format="jsonl", inputs=[InputSpec(path="x")], max_tokens=3)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


def test_stage_section_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\nprepare:\n  format: mrqa\n  inputs: [{path: a.jsonl.gz}]\n"
                    "  split_ratios: {train: 0.5, dev: 0.25, test: 0.25}\n")
    cfg = load_stage_config(PrepareConfig, "prepare", path, ["max_passage_tokens=128", "split_ratios.dev=0.3",
                                                             "split_ratios.test=0.2"])
    assert cfg.format == "mrqa" and cfg.inputs == [InputSpec(path="a.jsonl.gz")]
    assert cfg.max_passage_tokens == 128 and cfg.split_ratios == SplitRatios(train=0.5, dev=0.3, test=0.2)
    # absent section -> defaults of every stage that has them
    for stage, cls in STAGE_CONFIGS.items():
        if stage != "prepare":
            assert load_stage_config(cls, stage, path) == cls()


def test_errors_name_file_and_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  format: parquet\n  inputs: [{path: a}]\n")
    with pytest.raises(ConfigError, match=r"c.yaml \[prepare\]: invalid PrepareConfig:\n  format:"):
        load_stage_config(PrepareConfig, "prepare", path)
    with pytest.raises(ConfigError, match=r"\[prepare\].*\n  max_passage_tokens: Input should be a valid integer"):
        load_stage_config(PrepareConfig, "prepare", None, ["format=jsonl", "inputs=[{path: a}]",
                                                           "max_passage_tokens=many"])
    with pytest.raises(ConfigError, match="config file not found"):
        read_config_file(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_config_file(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_overrides_do_not_mutate_and_parse_yaml_scalars():
    section = {"pool": {"max_size": 2}}
    out = apply_overrides(section, ["pool.max_size=4", "lr=0.001", "splits=[dev, test]", "lora.r=8"])
    assert section == {"pool": {"max_size": 2}}
    assert out == {"pool": {"max_size": 4}, "lr": 0.001, "splits": ["dev", "test"], "lora": {"r": 8}}
    # YAML 1.1 reads 3e-5 as a string; the float field still validates it
    assert load_stage_config(STAGE_CONFIGS["train-reward"], "train-reward", None, ["lr=3e-5"]).lr == 3e-5


def test_pipeline_config_uses_stage_names(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("run_dir: runs/p\naddress: auto\nprepare: {format: jsonl, inputs: [{path: d.jsonl}]}\n"
                    "train-reward: {epochs: 1}\n")
    cfg = load_pipeline_config(path, ["prepare.seed=5"])
    assert isinstance(cfg, PipelineConfig) and cfg.prepare.seed == 5 and cfg.train_reward.epochs == 1
    path.write_text("prepare: {format: jsonl, inputs: [{path: d.jsonl}]}\nlabel: {no_such_key: 1}\n")
    with pytest.raises(ConfigError, match=r"label.no_such_key: Extra inputs are not permitted"):
        load_pipeline_config(path)


def test_cli_evaluate_takes_the_label_section(tmp_path):
    from uae_ray.cli import stage_config

    path = tmp_path / "c.yaml"
    path.write_text("label: {prompt: qasper, answer_aggregate: first}\nevaluate: {split: dev}\n")
    cfg = stage_config("evaluate", str(path), ["rerank_top_k=5"])
    assert cfg.label.prompt == "qasper" and cfg.label.answer_aggregate == "first" and cfg.rerank_top_k == 5
    path.write_text("label: {prompt: qasper}\nevaluate: {label: {prompt: extractive}}\n")
    assert stage_config("evaluate", str(path), []).label.prompt == "extractive"  # its own label wins


def test_evaluate_students_compare_to_and_output_validation():
    from uae_ray.config import EvaluateConfig

    cfg = load_stage_config(EvaluateConfig, "evaluate", None, [
        "students={kl: 'run:encoder_kl', other-run_2: runs/qasper/encoder}", "compare_to=[base, kl]",
        "output=eval_fulldev"])
    assert cfg.students == {"kl": "run:encoder_kl", "other-run_2": "runs/qasper/encoder"}
    assert cfg.compare_to == ["base", "kl"] and cfg.output == "eval_fulldev"
    assert EvaluateConfig().output == "eval" and EvaluateConfig().compare_to == ["base", "infonce"]
    # the default references need not be evaluated (an absent one is skipped in the report)
    assert EvaluateConfig(systems=["bm25", "base", "uae"]).compare_to == ["base", "infonce"]
    with pytest.raises(ConfigError, match=r"(?s)\[evaluate\].*students \['uae'\]: the name of a built-in system"):
        load_stage_config(EvaluateConfig, "evaluate", None, ["students={uae: 'run:encoder_kl'}"])
    for bad in ("a/b", "", "x y", "../enc"):
        with pytest.raises(pydantic.ValidationError, match="names are letters, digits"):
            EvaluateConfig(students={bad: "run:encoder_kl"})
    with pytest.raises(ConfigError, match=r"compare_to \['kl'\]: neither a system"):
        load_stage_config(EvaluateConfig, "evaluate", None, ["compare_to=[base, kl]"])
    for bad in ("eval/x", "../eval_x", "/tmp/eval_x", "corpus.parquet", "pipeline", "index"):
        with pytest.raises(pydantic.ValidationError, match="output"):
            EvaluateConfig(output=bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    """Each file in configs/ is either a whole pipeline (`uae-ray run`) or stage sections for stage commands; every
    section must validate (a typo in a shipped experiment config would otherwise surface hours into a run)."""
    from uae_ray.config import RUN_SETTINGS, load_pipeline_config, load_stage_config, read_config_file
    from uae_ray.stages.registry import STAGE_CONFIGS, STEP_SPECS

    data = read_config_file(path)
    sections = [k for k in data if k not in RUN_SETTINGS]
    assert sections, path
    unknown = [k for k in sections if k not in STAGE_CONFIGS and k not in STEP_SPECS]
    assert not unknown, f"{path.name}: unknown sections {unknown}"
    if "train-encoder" in sections:  # a pipeline
        load_pipeline_config(path)
    for k in sections:
        if k in STAGE_CONFIGS and data[k] is not None:
            load_stage_config(STAGE_CONFIGS[k], k, path)
