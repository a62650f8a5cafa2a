"""The pipeline's sequencing: markers, skip when current, stale on config change, resume after a crash. The demo
pipeline end to end, every stage for real, is tests/test_jobs.py: a Ray job on two nodes, then a rerun that finds
every step current."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from uae_ray.config import (
    ConfigError,
    EvaluateConfig,
    MineConfig,
    TrainEncoderConfig,
    load_pipeline_config,
    load_stage_config,
)
from uae_ray.data import schema as S
from uae_ray.runtime import RunDir
from uae_ray.stages import pipeline

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
DEMO_DATA = ROOT / "uae_ray" / "assets" / "demo.jsonl"


def _cfg(*overrides: str):
    return load_pipeline_config(DEMO, [f"prepare.inputs=[{{path: {DEMO_DATA}}}]", *overrides])


def test_plan_order_and_evaluate_inherits_label():
    cfg = _cfg("label.max_passage_tokens=96")
    steps = pipeline.plan(cfg)
    assert [s.name for s in steps] == ["prepare", "mine", "label", "train-reward", "score-reward", "train-encoder",
                                       "train-encoder-ablation", "index", "evaluate"]
    ev = steps[-1].config
    assert ev.label is not None and ev.label.max_passage_tokens == 96
    assert "train-encoder-ablation" in steps[-1].upstream
    no_abl = load_pipeline_config(DEMO, ["train-encoder-ablation=null"])
    assert "train-encoder-ablation" not in [s.name for s in pipeline.plan(no_abl)]


def test_markers_skip_stale_and_resume(tmp_path: Path):
    rd = RunDir(tmp_path / "run")
    cfg = _cfg()
    first = pipeline.run(cfg, rd, until="prepare")
    assert list(first) == ["prepare"] and first["prepare"]["state"] == "new"
    marker = json.loads((rd.local_path("pipeline") / "prepare.json").read_text())
    assert marker["status"] == "done" and rd.exists(S.CORPUS)
    mtime = rd.local_path(S.CORPUS).stat().st_mtime_ns

    again = pipeline.run(cfg, rd, until="prepare")
    assert again["prepare"]["state"] == "current"
    assert rd.local_path(S.CORPUS).stat().st_mtime_ns == mtime  # nothing rewritten

    changed = _cfg("prepare.max_passage_tokens=64")
    stale = pipeline.run(changed, rd, until="prepare")
    assert stale["prepare"]["state"] == "stale"
    new_marker = json.loads((rd.local_path("pipeline") / "prepare.json").read_text())
    assert new_marker["run_id"] != marker["run_id"]
    assert new_marker["config"]["max_passage_tokens"] == 64
    # downstream steps see the new upstream run id: they are stale, and say why
    steps = {s.name: s for s in pipeline.plan(changed)}
    mine_marker = {"status": "done", "config": steps["mine"].config.model_dump(mode="json"),
                   "upstream": {"prepare": marker["run_id"]}}
    assert pipeline.staleness(steps["mine"], mine_marker, {"prepare": new_marker["run_id"]}) == ["upstream prepare"]
    why = pipeline.staleness(steps["mine"], mine_marker, {"prepare": marker["run_id"]})
    assert why == [] and pipeline.step_state(mine_marker, why) == "current"

    # a crash leaves the marker 'running' with the same config and upstream: the step resumes (outputs kept)
    (rd.local_path("pipeline") / "prepare.json").write_text(json.dumps({**new_marker, "status": "running"}))
    crashed = pipeline.read_marker(rd, "prepare")
    source = pipeline.source_fingerprint(steps["prepare"], rd)  # the input files, unchanged
    assert pipeline.step_state(crashed, pipeline.staleness(steps["prepare"], crashed, {}, source)) == "resume"
    resumed = pipeline.run(changed, rd, until="prepare")
    assert resumed["prepare"]["state"] == "resume"


def test_config_changes_new_fields_are_no_change_changed_defaults_are():
    steps = {s.name: s for s in pipeline.plan(_cfg())}
    for step in steps.values():  # a marker of the same config: no change, every step (nested sections included)
        assert pipeline.config_changes(step.config.model_dump(mode="json"), step.config) == [], step.name
    label = steps["label"]
    stored = label.config.model_dump(mode="json")
    # a field this version added (absent from an older marker) is not a change
    older = {k: v for k, v in stored.items() if k != "rows_per_batch"}
    assert pipeline.config_changes(older, label.config) == []
    # a changed value is, also when it is a default that changed between versions (the marker holds the old one)
    assert pipeline.config_changes({**stored, "rows_per_batch": stored["rows_per_batch"] + 1}, label.config) == [
        "rows_per_batch"]
    # nested sections are compared field by field, with dotted names
    ev = steps["evaluate"].config
    ev_stored = ev.model_dump(mode="json")
    ev_label = {**ev_stored["label"], "max_passage_tokens": ev_stored["label"]["max_passage_tokens"] + 1}
    assert pipeline.config_changes({**ev_stored, "label": ev_label}, ev) == ["label.max_passage_tokens"]
    # actor pools say where the work runs, not what it produces: resizing one is no change
    pool = {**stored["pool"], "max_size": stored["pool"]["max_size"] + 1, "num_cpus": 2.0}
    assert pipeline.config_changes({**stored, "pool": pool}, label.config) == []
    # user dicts are compared whole: a split added to max_docs_per_split is a change
    prep = _cfg("prepare.max_docs_per_split={train: 5}")
    prep2 = _cfg("prepare.max_docs_per_split={train: 5, dev: 3}")
    assert pipeline.config_changes(prep.prepare.model_dump(mode="json"), prep2.prepare) == ["max_docs_per_split"]
    assert pipeline.config_changes(None, label.config) == ["<config>"]


def test_stale_label_step_keeps_its_caches(tmp_path: Path):
    """A stale label step (its config or upstream changed) removes only its report, never the label caches (valid
    row by row); every other step removes all it wrote."""
    steps = {s.name: s for s in pipeline.plan(_cfg())}
    label = steps["label"]
    assert set(label.stage.keep) == {S.UTILITIES, S.LABEL_SKIPPED, S.LABEL_CACHE, S.LABEL_BASELINE}
    assert label.removable == (S.LABEL_REPORT,)
    assert steps["mine"].removable == steps["mine"].outputs == (S.CANDIDATES, S.MINE_REPORT)
    rd = RunDir(tmp_path / "run")
    for name in (f"{S.UTILITIES}/part-000000.parquet", f"{S.LABEL_CACHE}/part-a-000000.parquet",
                 f"{S.LABEL_BASELINE}/part-a-000000.parquet", S.LABEL_REPORT):
        rd.write_text(name, "x")
    other = label.config.model_copy(update={"rows_per_batch": label.config.rows_per_batch + 1})
    rd.write_json("pipeline/label.json", {"status": "done", "run_id": "old", "config": other.model_dump(mode="json"),
                                         "upstream": {"mine": None}})
    state, why, _ = pipeline.decide(label, rd, {"mine": None})
    assert (state, why) == ("stale", ["rows_per_batch"])
    for out in label.removable:
        pipeline.remove_output(rd, out)
    assert rd.exists(f"{S.UTILITIES}/part-000000.parquet") and rd.exists(f"{S.LABEL_CACHE}/part-a-000000.parquet")
    assert rd.exists(f"{S.LABEL_BASELINE}/part-a-000000.parquet")
    assert not rd.exists(S.LABEL_REPORT)


def test_stage_list_exists_once():
    """The CLI's subcommands, the config file's sections and the pipeline's steps all come from the registry."""
    from uae_ray import config
    from uae_ray.cli import build_parser
    from uae_ray.stages import registry

    sub = next(a for a in build_parser()._actions if a.dest == "stage")
    assert list(sub.choices) == [*registry.STAGES, "run"]
    for name, stage in registry.STAGES.items():
        assert sub.choices[name].description is None and stage.config.__doc__  # help from the config docstring
    assert config.STAGE_CONFIGS is registry.STAGE_CONFIGS
    assert {n: s.config for n, s in registry.STAGES.items()} == config.STAGE_CONFIGS
    assert config.PipelineConfig is registry.PipelineConfig
    fields = registry.PipelineConfig.model_fields
    assert [f.alias or n for n, f in fields.items()] == [s.name for s in registry.STEPS]
    assert [s.name for s in pipeline.plan(_cfg())] == [s.name for s in registry.STEPS]
    assert {s.cli_stage for s in pipeline.plan(_cfg())} == {n for n, s in registry.STAGES.items() if s.writes}
    until = next(a for a in sub.choices["run"]._actions if a.dest == "until")
    assert list(until.choices) == list(dict.fromkeys(s.stage for s in registry.STEPS))
    for stage in registry.STAGES.values():  # each stage module runs, and each writing stage has its Ray job script
        assert callable(importlib.import_module(f"uae_ray.stages.{stage.module}").run)
        assert not stage.writes or (ROOT / "jobs" / f"{stage.module}.py").is_file()


@pytest.mark.parametrize("bad", ["", "../x", "a/../../b", "/tmp/x", "~/x", "s3://bucket/x", "a//b", "./x",
                                 "corpus.parquet", "pipeline", "index/x"])
def test_output_names_stay_inside_the_run_dir(bad: str):
    with pytest.raises(ConfigError, match=r"(?s)train-encoder\].*output"):
        load_stage_config(TrainEncoderConfig, "train-encoder", None, [f"output={bad!r}" if bad else "output=''"])
    with pytest.raises(ConfigError, match="output"):
        _cfg(f"train-encoder-ablation.output={bad!r}" if bad else "train-encoder-ablation.output=''")
    assert load_stage_config(TrainEncoderConfig, "train-encoder", None, ["output=models/enc2"]).output == "models/enc2"


def test_removal_refuses_paths_outside_the_run_dir(tmp_path: Path):
    rd = RunDir(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "run" / "link").symlink_to(tmp_path)
    for name in ("", "..", "../victim.txt", str(victim), "link/victim.txt"):
        with pytest.raises(ValueError, match="refusing to remove"):
            pipeline.remove_output(rd, name)
    assert victim.read_text() == "keep me" and (tmp_path / "run").is_dir()
    rd.write_text("encoder_report.json", "{}")
    pipeline.remove_output(rd, "encoder_report.json")
    assert not rd.exists("encoder_report.json")


def test_standalone_stage_uses_the_pipeline_markers(tmp_path: Path, caplog):
    """`uae-ray prepare` on its own: the marker `uae-ray run` reads; current -> skipped, changed -> stale with the
    reason, --force -> rerun, an edited input file -> stale (a touched one: current); and `uae-ray run` sees the
    standalone's marker."""
    caplog.set_level(logging.INFO, logger="uae_ray")
    data = tmp_path / "demo.jsonl"
    data.write_bytes(DEMO_DATA.read_bytes())
    pipe = _cfg(f"prepare.inputs=[{{path: {data}}}]", "prepare.max_docs_per_split=3")
    cfg = pipe.prepare
    rd = RunDir(tmp_path / "run")
    first = pipeline.run_stage("prepare", cfg, rd)
    assert first["state"] == "new" and rd.exists(S.CORPUS)
    mtime = rd.local_path(S.CORPUS).stat().st_mtime_ns
    caplog.clear()
    again = pipeline.run_stage("prepare", cfg, rd)
    assert again["state"] == "current" and again["summary"] == first["summary"]
    assert "prepare: current, skipped" in caplog.text
    assert rd.local_path(S.CORPUS).stat().st_mtime_ns == mtime
    forced = pipeline.run_stage("prepare", cfg, rd, force=True)
    assert forced["state"] == "forced" and rd.local_path(S.CORPUS).stat().st_mtime_ns != mtime
    # an input file with another mtime (copied to another machine, unpacked from a Ray job's package) and the same
    # bytes is the same input: inputs count by content
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns - 10**12))
    assert pipeline.run_stage("prepare", cfg, rd)["state"] == "current"
    caplog.clear()
    changed = pipeline.run_stage("prepare", cfg.model_copy(update={"max_passage_tokens": 64}), rd)
    assert changed["state"] == "stale" and changed["why"] == ["max_passage_tokens"]
    assert "prepare: stale: max_passage_tokens changed, rerunning" in caplog.text
    data.write_text(data.read_text() + "\n")  # the input file changed (size, mtime)
    edited_cfg = cfg.model_copy(update={"max_passage_tokens": 64})
    edited = pipeline.run_stage("prepare", edited_cfg, rd)
    assert edited["state"] == "stale" and edited["why"] == ["inputs"]
    # the whole pipeline reads the same marker: its prepare step is current
    pipe = pipe.model_copy(update={"prepare": edited_cfg})
    assert pipeline.run(pipe, rd, until="prepare")["prepare"]["state"] == "current"
    # a standalone mine after it: upstream changed = prepare's marker now holds another run id
    mine = pipeline.step_for("mine", MineConfig(), rd)
    rd.write_json("pipeline/mine.json", {"status": "done", "run_id": "m1", "config": MineConfig().model_dump(
        mode="json"), "upstream": {"prepare": "an-older-prepare-run"}})
    assert pipeline.decide(mine, rd, pipeline.marker_run_ids(mine, rd))[:2] == ("stale", ["upstream prepare"])


def test_step_for_train_encoder_outputs(tmp_path: Path):
    rd = RunDir(tmp_path / "run")
    assert pipeline.step_for("train-encoder", TrainEncoderConfig(), rd).name == "train-encoder"
    abl = pipeline.step_for("train-encoder", TrainEncoderConfig(loss="infonce", output="encoder_infonce"), rd)
    assert abl.name == "train-encoder-ablation" and abl.upstream == ("mine",)
    other = pipeline.step_for("train-encoder", TrainEncoderConfig(output="encoder_kl", loss="kl"), rd)
    assert other.name == "train-encoder-encoder_kl" and other.upstream == ("score-reward",)
    # a pipeline whose train-encoder writes enc2: its marker lists that output, so a standalone run finds it
    rd.write_json("pipeline/train-encoder.json", {"outputs": list(pipeline.step_for(
        "train-encoder", TrainEncoderConfig(output="enc2"), rd).outputs)})
    assert pipeline.step_for("train-encoder", TrainEncoderConfig(output="enc2"), rd).name == "train-encoder"


def test_second_evaluation_is_a_step_of_its_own(tmp_path: Path, capsys):
    """An evaluate writing eval_x (in a pipeline or on its own) is the step evaluate-eval_x: its own marker, its own
    output removed when stale, never eval/; a current one prints its own report."""
    rd = RunDir(tmp_path / "run")
    cfg = _cfg("evaluate.output=eval_x")
    run_ids: dict[str, str] = {}
    for step in pipeline.plan(cfg):  # every step current: nothing runs
        run_ids[step.name] = f"run-{step.name}"
        rd.write_json(f"pipeline/{step.name}.json", {
            "status": "done", "run_id": run_ids[step.name], "config": step.config.model_dump(mode="json"),
            "upstream": pipeline.upstream_ids(step, run_ids), "source": pipeline.source_fingerprint(step, rd)})
    rd.write_text("eval_x/report.md", "the second evaluation's table\n")
    rd.write_text("eval/report.md", "the main evaluation's table\n")
    assert {r["state"] for r in pipeline.run(cfg, rd).values()} == {"current"}
    out = capsys.readouterr().out
    assert "the second evaluation's table" in out and "the main evaluation's table" not in out
    steps = {s.name: s for s in pipeline.plan(cfg)}
    assert "evaluate" not in steps and steps["evaluate-eval_x"].outputs == ("eval_x",)
    assert steps["evaluate-eval_x"].removable == ("eval_x",) and steps["evaluate-eval_x"].cli_stage == "evaluate"
    assert "index" in steps["evaluate-eval_x"].upstream
    assert pipeline.step_for("evaluate", EvaluateConfig(), rd).name == "evaluate"
    alone = pipeline.step_for("evaluate", EvaluateConfig(output="eval_x"), rd)
    assert alone.name == "evaluate-eval_x" and alone.upstream == steps["evaluate-eval_x"].upstream
    assert pipeline.step_for("evaluate", EvaluateConfig(output="evals/full"), rd).name == "evaluate-evals_full"
    assert [s.name for s in pipeline.plan(_cfg())][-1] == "evaluate"
    # an evaluation writing into another step's output is refused (models end in "/" in the registry)
    with pytest.raises(ConfigError, match="both write 'encoder'"):
        _cfg("evaluate.output=encoder")


def test_index_step_is_optional():
    steps = {s.name: s for s in pipeline.plan(_cfg("index=null"))}
    assert "index" not in steps and "index" not in steps["evaluate"].upstream
    assert steps["evaluate"].upstream == ("train-encoder", "score-reward", "label", "train-encoder-ablation")


def test_reward_steps_are_optional_for_a_student_without_a_reward_model():
    """train-reward and score-reward may be null when nothing reads their outputs (a student taught by the raw
    utilities); the steps that read through them then depend on what they would have read (label, mine)."""
    steps = {s.name: s for s in pipeline.plan(_cfg("train-reward=null", "score-reward=null",
                                                   "train-encoder.teacher=utilities"))}
    assert "train-reward" not in steps and "score-reward" not in steps
    assert steps["train-encoder"].upstream == ("label", "mine")  # relabeling or remining makes the student stale
    assert steps["evaluate"].upstream == ("train-encoder", "label", "mine", "train-encoder-ablation", "index")
    full = {s.name: s for s in pipeline.plan(_cfg())}
    assert full["train-encoder"].upstream == ("score-reward",)
    # a step left reading what only a dropped step writes is a config error naming both
    with pytest.raises(ConfigError, match=r"train-encoder reads .teacher_scores.parquet., which only score-reward "
                                          r"writes, and score-reward is null .*teacher: utilities"):
        _cfg("score-reward=null")
    with pytest.raises(ConfigError, match="score-reward reads 'reward_model', which only train-reward writes"):
        _cfg("train-reward=null")
    with pytest.raises(ConfigError, match=r"mine reads .teacher_scores\.parquet."):
        _cfg("train-reward=null", "score-reward=null", "train-encoder.teacher=utilities", "mine.reward_weight=0.5")


def test_evaluate_students_are_inputs_and_stamped(tmp_path: Path):
    """`run:` students are inputs of the evaluate step (checked before Ray starts); their commit markers are part of
    the step's source fingerprint (a student retrained outside the pipeline makes the evaluation stale)."""
    from uae_ray.cli import missing_inputs
    from uae_ray.stages import registry

    cfg = EvaluateConfig(students={"kl": "run:encoder_kl", "mini": "all-minilm-l6-v2"}, compare_to=["kl"])
    stage = registry.STAGES["evaluate"]
    assert stage.inputs(cfg) == (S.CORPUS, S.QUERIES, "encoder_kl/")
    rd = RunDir(tmp_path / "run")
    rd.write_text(S.CORPUS, "x")
    rd.write_text(S.QUERIES, "x")
    assert missing_inputs(stage, cfg, rd) == ["encoder_kl"]
    step = pipeline.step_for("evaluate", cfg, rd)
    assert pipeline.source_fingerprint(pipeline.step_for("evaluate", EvaluateConfig(), rd), rd) is None
    absent = pipeline.source_fingerprint(step, rd)
    with rd.staged_dir("encoder_kl") as d:
        (d / "model.txt").write_text("v1")
    assert missing_inputs(stage, cfg, rd) == []
    first = pipeline.source_fingerprint(step, rd)
    assert first not in (None, absent)
    with rd.staged_dir("encoder_kl") as d:
        (d / "model.txt").write_text("v2, retrained")
    second = pipeline.source_fingerprint(step, rd)
    assert second != first
    # by content: the run dir copied to another place (new mtimes, new absolute paths) is the same evaluation
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)  # copytree keeps mtimes: move them, as a download or an unpack would
    for f in copy.rglob("*"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**12))
    assert pipeline.source_fingerprint(pipeline.step_for("evaluate", cfg, RunDir(copy)), RunDir(copy)) == second


def test_evaluate_local_student_dirs_count_by_content(tmp_path: Path):
    """A student given as a local directory is stamped by its files' contents: the same model touched or unpacked
    again (other mtimes) keeps the evaluation current; an edited weight file makes it stale."""
    rd = RunDir(tmp_path / "run")
    model = tmp_path / "students" / "kl"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\x00" * 1024)
    (model / "config.json").write_text("{}")
    step = pipeline.step_for("evaluate", EvaluateConfig(students={"kl": str(model)}, compare_to=["kl"]), rd)
    first = pipeline.source_fingerprint(step, rd)
    for f in model.iterdir():  # touched, not edited
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**12))
    assert pipeline.source_fingerprint(step, rd) == first
    (model / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 1023)  # same size, new weights
    assert pipeline.source_fingerprint(step, rd) != first


def test_cli_evaluate_names_a_missing_student_before_ray_starts(tmp_path: Path, capsys):
    from uae_ray.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("evaluate:\n  students: {kl: 'run:encoder_kl'}\n  compare_to: [base, kl]\n"
                      "  output: eval_fulldev\n")
    rd = RunDir(tmp_path / "run")
    rd.write_text(S.CORPUS, "x")
    rd.write_text(S.QUERIES, "x")
    args = ["evaluate", "--run-dir", str(tmp_path / "run"), "--config", str(config), "--address", "127.0.0.1:9"]
    assert main(args) == 2  # nothing listens at that address: the check comes before Ray
    err = capsys.readouterr().err
    assert "uae-ray evaluate: missing input" in err and "encoder_kl" in err and "corpus" not in err
    assert main([*args, "--set", "output=eval/x"]) == 2
    assert "config error" in capsys.readouterr().err
    assert not rd.exists("pipeline") and not rd.exists("eval_fulldev")


def test_until_must_name_a_step(tmp_path: Path):
    with pytest.raises(ValueError, match="--until 'serve'"):
        pipeline.run(_cfg(), RunDir(tmp_path / "run"), until="serve")
