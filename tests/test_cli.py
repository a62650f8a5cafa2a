"""The ``uae-ray`` command: user errors are one line and exit 2 before Ray starts; a stage run on its own follows
the pipeline's freshness rule (current -> skipped, changed config -> rerun, --force -> rerun)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _training_data import build_tiny_run

from uae_ray.data import schema

ROOT = Path(__file__).resolve().parent.parent
# Nothing listens here: a command that tried to reach Ray would fail with a connection error, not our message.
NO_RAY = "127.0.0.1:9"


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "uae_ray.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess[str], stage: str, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"uae-ray {stage}: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_run_dir_inputs_are_named_before_ray_starts(tmp_path: Path):
    line = _one_line_error(_cli("train-encoder", "--run-dir", str(tmp_path / "run"), "--address", NO_RAY),
                           "train-encoder", "missing input", "queries.parquet", "`uae-ray prepare`",
                           "teacher_scores.parquet", "`uae-ray score-reward`")
    assert "candidates.parquet (written by `uae-ray mine`)" in line
    # the inputs follow the config: the gold-only ablation reads no teacher; teacher=utilities reads the labels
    line = _one_line_error(_cli("train-encoder", "--run-dir", str(tmp_path / "run"), "--address", NO_RAY,
                                "--set", "loss=infonce"), "train-encoder", "queries.parquet")
    assert "teacher_scores" not in line
    _one_line_error(_cli("train-encoder", "--run-dir", str(tmp_path / "run"), "--set", "teacher=utilities"),
                    "train-encoder", "utilities (written by `uae-ray label`)")
    _one_line_error(_cli("score-reward", "--run-dir", str(tmp_path / "run"), "--address", NO_RAY), "score-reward",
                    "reward_model (written by `uae-ray train-reward`)")
    _one_line_error(_cli("serve", "--run-dir", str(tmp_path / "run"), "--address", NO_RAY), "serve",
                    "index (written by `uae-ray index`)")
    _one_line_error(_cli("index", "--run-dir", str(tmp_path / "run"), "--set", "encoder=run:encoder_infonce"),
                    "index", "corpus.parquet", "encoder_infonce")


def test_config_errors_are_one_line(tmp_path: Path):
    run = str(tmp_path / "run")
    _one_line_error(_cli("train-encoder", "--run-dir", run, "--set", "lr=-1"), "train-encoder", "config error",
                    "lr: Input should be greater than 0")
    for bad in ("../outside", "''", "/tmp/x"):
        _one_line_error(_cli("train-encoder", "--run-dir", run, "--set", f"output={bad}"), "train-encoder",
                        "config error", "output")
    _one_line_error(_cli("mine", "--run-dir", run, "--config", str(tmp_path / "nope.yaml")), "mine",
                    "config file not found")
    _one_line_error(_cli("run", "--run-dir", run), "run", "needs --config")
    _one_line_error(_cli("label"), "label", "no run directory")
    _one_line_error(_cli("mine", "--run-dir", run, "--address", "auto", "--num-cpus", "2"), "mine",
                    "drop --num-cpus")


def test_lease_held_is_one_line(tmp_path: Path):
    from uae_ray.runtime import RunDir

    rd = build_tiny_run(str(tmp_path / "run"), n_docs=2)
    with rd.lease(command="a test holding the run dir"):
        line = _one_line_error(_cli("train-encoder", "--run-dir", rd.uri, "--address", NO_RAY), "train-encoder",
                               "lease held", f"pid {os.getpid()}", "a test holding the run dir")
        assert "--take-over-lease" not in line or "wait" in line
        _one_line_error(_cli("run", "--config", str(ROOT / "configs" / "demo.yaml"), "--run-dir", rd.uri,
                             "--address", NO_RAY, "--take-over-lease"), "run", "lease held", "a test holding")
        # serve only reads: no lease, so it gets as far as its own inputs
        _one_line_error(_cli("serve", "--run-dir", rd.uri, "--address", NO_RAY), "serve", "index")
    assert RunDir(rd.uri).exists(schema.QUERIES)


def test_a_current_stage_is_skipped_without_starting_ray(tmp_path: Path):
    """A marker that says done with this config and these upstream run ids: the command says so and exits 0 without
    connecting to Ray (its address leads nowhere)."""
    from uae_ray.config import TrainEncoderConfig

    rd = build_tiny_run(str(tmp_path / "run"), n_docs=2)
    cfg = TrainEncoderConfig(lr=1e-4)
    rd.write_json("pipeline/score-reward.json", {"status": "done", "run_id": "sr1"})
    rd.write_json("pipeline/train-encoder.json", {
        "status": "done", "run_id": "te1", "config": cfg.model_dump(mode="json"), "upstream": {"score-reward": "sr1"},
        "source": None, "summary": {"steps": 3}})
    proc = _cli("train-encoder", "--run-dir", rd.uri, "--address", NO_RAY, "--set", "lr=1e-4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train-encoder: current, skipped" in proc.stderr and json.loads(proc.stdout) == {"steps": 3}


@pytest.mark.slow
def test_standalone_train_encoder_current_stale_and_foreign_checkpoints(ray_session, tmp_path, caplog):
    """`uae-ray train-encoder` on its own: a finished run with the same config is skipped without Ray work, `--set
    lr=...` retrains from step 0 (the old checkpoints are gone or foreign); and a checkpoint of another config left
    in the run dir is never resumed. (`--force` is the same rule for every stage: tests/test_pipeline.py.)"""
    from uae_ray.cli import main
    from uae_ray.stages import train_encoder
    from uae_ray.training.data import steps_per_epoch

    caplog.set_level(logging.INFO, logger="uae_ray")
    rd = build_tiny_run(str(tmp_path / "run"), n_docs=4)
    base = ["train-encoder", "--run-dir", rd.uri, "--set", "max_query_length=16", "--set", "max_passage_length=24",
            "--set", "queries_per_step=2", "--set", "n_hard_negatives=1", "--set", "epochs=1",
            "--set", "scaling.num_workers=1"]
    steps = steps_per_epoch(8, 1, 2)  # 4 training documents x 2 questions

    def report() -> dict:
        return json.loads((rd.local_path("encoder_report.json")).read_text())

    def marker() -> dict:
        return json.loads((rd.local_path("pipeline") / "train-encoder.json").read_text())

    assert main(base) == 0
    first = marker()
    assert first["status"] == "done" and report()["steps"] == steps and report()["resumed_from_step"] == []
    # the student's utility calibration is committed into encoder/ (no dev split here: fitted in sample, and says so)
    assert "calibration.json" in json.loads((rd.local_path("encoder") / "_SUCCESS").read_text())["files"]
    assert "in sample" in report()["calibration"]["source"] and report()["calibration"]["n_pairs"] > 0
    model_version = (rd.local_path("encoder") / "_SUCCESS").read_text()

    caplog.clear()
    assert main(base) == 0
    assert "train-encoder: current, skipped" in caplog.text
    assert marker()["run_id"] == first["run_id"]
    assert (rd.local_path("encoder") / "_SUCCESS").read_text() == model_version

    caplog.clear()
    assert main([*base, "--set", "lr=1e-4"]) == 0
    assert "train-encoder: stale: lr changed, rerunning" in caplog.text
    assert marker()["config"]["lr"] == 1e-4 and marker()["run_id"] != first["run_id"]
    assert report()["steps"] == steps and report()["resumed_from_step"] == []  # trained from step 0
    assert (rd.local_path("encoder") / "_SUCCESS").read_text() != model_version

    # checkpoints of lr=1e-4 stay in the run dir; the stage itself, run with another lr, does not resume them
    ckpts = rd.local_path(schema.CHECKPOINTS) / "train_encoder-encoder"
    assert list(ckpts.glob("checkpoint_*"))
    cfg = train_encoder.TrainEncoderConfig(max_query_length=16, max_passage_length=24, queries_per_step=2,
                                           n_hard_negatives=1, epochs=1, lr=3e-4, scaling={"num_workers": 1})
    summary = train_encoder.run(cfg, rd)
    assert summary["steps"] == steps and summary["resumed_from_step"] == []  # (it logs "... not resumed")


def _cli_env(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uae_ray.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_serve_refusals_are_one_line_before_ray_starts(tmp_path: Path):
    from uae_ray.index.versions import publish
    from uae_ray.runtime import RunDir

    rd = RunDir(tmp_path / "run")

    def build(out: Path, version: str) -> dict:
        (out / "manifest.json").write_text(json.dumps({"version": version, "num_shards": 1}))
        return {"version": version, "num_shards": 1}

    publish(rd, schema.INDEX, {"t": 1}, build)  # an index exists: the input check passes, the refusal is what fails
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("UAE_RAY_TOKEN", None)
    _one_line_error(_cli_env(env, "serve", "--run-dir", rd.uri, "--address", NO_RAY, "--set", "host=0.0.0.0"),
                    "serve", "config error", "refusing to serve on host '0.0.0.0' without a bearer token")
    _one_line_error(_cli_env({**env, "UAE_RAY_TOKEN": ""}, "serve", "--run-dir", rd.uri, "--address", NO_RAY),
                    "serve", "config error", "UAE_RAY_TOKEN is set but empty")


def test_config_storage_section_reaches_an_s3_run_dir(s3_endpoint, s3_run_uri, tmp_path: Path):
    """The endpoint comes from the config file alone (no AWS_ENDPOINT_URL in the command's environment)."""
    from uae_ray.runtime import RunDir

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"storage:\n  endpoint_url: {s3_endpoint}\n  path_style: true\n"
                   "prepare:\n  format: jsonl\n  max_docs_per_split: 2\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = _cli_env(env, "prepare", "--config", str(cfg), "--run-dir", s3_run_uri,
                    "--input", str(ROOT / "uae_ray" / "assets" / "demo.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rd = RunDir(s3_run_uri)  # this process has AWS_ENDPOINT_URL: the same store
    assert rd.read_table(schema.QUERIES).num_rows > 0 and rd.exists("pipeline/prepare.json")
    assert not rd.exists("_lease.json")  # the command held the lease and released it
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  endpoint_url: minio:9000\nprepare:\n  format: jsonl\n")
    _one_line_error(_cli_env(env, "prepare", "--config", str(bad), "--run-dir", s3_run_uri, "--input",
                             str(ROOT / "uae_ray" / "assets" / "demo.jsonl")), "prepare", "config error",
                    "endpoint_url must start with http")
