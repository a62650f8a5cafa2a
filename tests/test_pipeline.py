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
    assert new_marker["run_id"] != marker["run_id"] and new_marker["fingerprint"] != marker["fingerprint"]
    # downstream steps see the new upstream run id: their fingerprint changes
    steps = {s.name: s for s in pipeline.plan(changed)}
    assert pipeline.fingerprint(steps["mine"], {"prepare": marker["run_id"]}) != pipeline.fingerprint(
        steps["mine"], {"prepare": new_marker["run_id"]})

    # a crash leaves the marker 'running' with the same fingerprint: the step resumes (outputs kept)
    (rd.local_path("pipeline") / "prepare.json").write_text(json.dumps({**new_marker, "status": "running"}))
    assert pipeline.step_state(pipeline.read_marker(rd, "prepare"), new_marker["fingerprint"]) == "resume"
    resumed = pipeline.run(changed, rd, until="prepare")
    assert resumed["prepare"]["state"] == "resume"


def test_config_hash_ignores_defaults_and_labels_survive_upstream_changes():
    steps = {s.name: s for s in pipeline.plan(_cfg())}
    label = steps["label"]
    # a field spelled out at its default (or a new field with a default) is the same config
    same = label.config.model_copy(update={"rows_per_batch": label.config.rows_per_batch})
    assert pipeline.config_sha1(same) == pipeline.config_sha1(label.config)
    other = label.config.model_copy(update={"rows_per_batch": label.config.rows_per_batch + 1})
    assert pipeline.config_sha1(other) != pipeline.config_sha1(label.config)
    # label: upstream changed, same config -> keep the utilities; config changed -> remove them
    marker = {"config_sha1": pipeline.config_sha1(label.config), "fingerprint": "old"}
    assert pipeline.stale_outputs(label, marker) == ()
    assert pipeline.stale_outputs(label, {**marker, "config_sha1": "x"}) == label.outputs
    assert pipeline.stale_outputs(label, None) == label.outputs
    # a marker written before config_sha1 existed: its stored config is compared instead
    assert pipeline.stale_outputs(label, {"config": label.config.model_dump(mode="json")}) == ()
    assert pipeline.stale_outputs(label, {"config": other.model_dump(mode="json")}) == label.outputs
    # every other step starts over
    assert pipeline.stale_outputs(steps["mine"], {"config_sha1": pipeline.config_sha1(steps["mine"].config)}) == \
        steps["mine"].outputs


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
