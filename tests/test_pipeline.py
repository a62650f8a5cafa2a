"""The pipeline's sequencing: markers, skip when current, stale on config change, resume after a crash; and the
demo config end to end (slow: needs every stage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uae_ray.config import load_pipeline_config
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
    assert pipeline.step_state(crashed, pipeline.staleness(steps["prepare"], crashed, {})) == "resume"
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


def test_labels_survive_upstream_changes():
    steps = {s.name: s for s in pipeline.plan(_cfg())}
    label = steps["label"]
    other = label.config.model_copy(update={"rows_per_batch": label.config.rows_per_batch + 1})
    marker = {"config": label.config.model_dump(mode="json"), "upstream": {"mine": "old"}}
    # label: upstream changed, same config -> keep the utilities; config changed -> remove them
    assert pipeline.staleness(label, marker, {"mine": "new"}) == ["upstream mine"]
    assert pipeline.stale_outputs(label, marker) == ()
    assert pipeline.stale_outputs(label, {**marker, "config": other.model_dump(mode="json")}) == label.outputs
    assert pipeline.stale_outputs(label, None) == label.outputs
    # every other step starts over
    mine = steps["mine"]
    assert pipeline.stale_outputs(mine, {"config": mine.config.model_dump(mode="json")}) == mine.outputs


def test_until_must_name_a_step(tmp_path: Path):
    with pytest.raises(ValueError, match="--until 'serve'"):
        pipeline.run(_cfg(), RunDir(tmp_path / "run"), until="serve")


@pytest.mark.slow
def test_demo_pipeline_end_to_end_shrunk(tmp_path: Path, ray_session, capsys):
    cfg = _cfg(
        "prepare.max_docs_per_split=3",
        "train-reward.epochs=1", "train-encoder.epochs=1", "train-encoder-ablation.epochs=1",
        # 3 train documents x 3 questions: steps of 2 workers x 2 queries fit the shrunk data
        "train-reward.queries_per_step=2", "train-encoder.queries_per_step=2",
        "train-encoder-ablation.queries_per_step=2",
        "evaluate.llm_rerank_max_queries=2", "evaluate.generate_max_queries=2", "evaluate.max_new_tokens=8",
        "evaluate.rerank_top_k=4", "evaluate.rankgpt_window=3", "evaluate.rankgpt_step=2",
    )
    rd = RunDir(tmp_path / "run")
    result = pipeline.run(cfg, rd)
    assert [r["state"] for r in result.values()] == ["new"] * 9
    report = json.loads((rd.local_path(S.EVAL) / "report.json").read_text())
    systems = report["settings"]["pool"]["systems"]
    assert {"bm25", "base", "infonce", "uae", "reward_rerank", "upr", "rankgpt"} <= set(systems)
    assert "| uae |" in capsys.readouterr().out  # the result table is printed
    again = pipeline.run(cfg, rd)
    assert {r["state"] for r in again.values()} == {"current"}
