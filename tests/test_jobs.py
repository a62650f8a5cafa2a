"""A real Ray job on a real two-node cluster: `ray start --head` + `ray start --address`, the shrunk demo pipeline
submitted with `ray job submit --working-dir .`, followed through the Job API, its report read from the run dir,
its logs read with `ray job logs`; then both nodes are stopped (their own process groups, never `ray stop`).
The job runs every step of the demo, the gold-only ablation included (configs/demo.yaml, the README's main job,
has it); a second `uae-ray run` of the same config finds every step current and prints the result table
without starting Ray."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from _ray_nodes import LocalCluster, ray_cli, start_head, submit_job, wait_for_job

from uae_ray.data import schema as S
from uae_ray.runtime import RunDir

pytestmark = pytest.mark.slow
SMALL = "configs/demo-small.yaml"
# demo-small leaves the ablation out; the job adds it back, and its evaluation, as configs/demo.yaml has them
ABLATION = ("train-encoder-ablation={loss: infonce, output: encoder_infonce, epochs: 1, lr: 5.0e-5, "
            "n_hard_negatives: 3, queries_per_step: 2, max_passage_length: 128, "
            "scaling: {num_workers: 2, placement_strategy: SPREAD}}")
SETS = ["--set", ABLATION, "--set", "evaluate.systems=[bm25, base, infonce, uae, reward_rerank, upr, rankgpt]"]


@pytest.fixture
def two_node_cluster(s3_endpoint: str) -> Iterator[LocalCluster]:
    """Head (2 CPUs) + one worker node (2 CPUs), each its own `ray start --block` with its own ports. Started after
    the S3 endpoint: the nodes take AWS_ENDPOINT_URL and the test credentials from their environment, as real nodes
    take theirs."""
    import ray

    ray.shutdown()  # a session-wide local cluster must not be connected while this one runs
    cluster = start_head(2)
    try:
        cluster.add_worker(2)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def uploaded_files(cluster: LocalCluster) -> dict[str, int]:
    """Files of the working-dir package as the cluster unpacked it (relative path -> bytes)."""
    pkgs = [p for p in cluster.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
            if p.is_dir()]
    assert len(pkgs) == 1, pkgs
    return {p.relative_to(pkgs[0]).as_posix(): p.stat().st_size for p in pkgs[0].rglob("*") if p.is_file()}


def test_demo_pipeline_as_a_ray_job_on_two_nodes(two_node_cluster: LocalCluster, s3_run_uri: str, capsys):
    cluster = two_node_cluster
    run = s3_run_uri  # every node reaches it: the run dir a real cluster uses
    entry = ["python", "jobs/pipeline.py", "--config", SMALL, "--run-dir", run, *SETS]
    t0 = time.monotonic()
    out = submit_job(cluster, "uae-demo-small", entry)
    assert "Uploading package gcs://_ray_pkg_" in out
    assert wait_for_job(cluster, "uae-demo-small", timeout_s=900) == "SUCCEEDED"
    elapsed = time.monotonic() - t0

    # what was uploaded: the code and the configs, not venvs, runs, bench results or git
    files = uploaded_files(cluster)
    assert "jobs/pipeline.py" in files and "uae_ray/stages/pipeline.py" in files and SMALL in files
    assert "uae_ray/assets/demo.jsonl" in files  # the job's input travels with the code
    banned = [f for f in files if f.split("/")[0] in {".git", ".venv", ".venv-vllm", "runs", "logs"}
              or f.startswith("bench/results/") or "__pycache__" in f]
    assert not banned, banned[:10]
    assert sum(files.values()) < 2_000_000, f"{sum(files.values())} bytes uploaded"

    # the job wrote every stage's output to the S3 run dir; the report is the pipeline's
    rd = RunDir(run)
    report = rd.read_json(S.EVAL + "/report.json")
    systems = report["settings"]["pool"]["systems"]
    assert {"bm25", "base", "infonce", "uae", "reward_rerank", "upr", "rankgpt"} <= set(systems)
    markers = {m: rd.read_json(f"pipeline/{m}") for m in rd.listdir("pipeline")}
    assert {m["status"] for m in markers.values()} == {"done"} and len(markers) == 9, sorted(markers)
    ablation_outputs = [o.rstrip("/") for o in markers["train-encoder-ablation.json"]["outputs"]]
    assert "encoder_infonce" in ablation_outputs, ablation_outputs

    # the work ran on both nodes: the trainers' DDP workers are spread (placement_strategy SPREAD in the config)
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
    train_nodes = {a.node_id for a in actors if a.class_name == "RayTrainWorker"}
    assert len(train_nodes) == 2, {a.class_name: a.node_id for a in actors}

    # `ray job logs` shows the driver's output: the result table and the connection to the existing cluster
    logs = ray_cli(cluster, "job", "logs", "--address", cluster.dashboard, "uae-demo-small")
    assert logs.returncode == 0, logs.stderr
    assert "| uae |" in logs.stdout
    assert "label: not run yet, running" in logs.stdout and "must not be provided" not in logs.stdout
    # run again (here, on the driver's machine): every step is current, nothing runs, the table is printed; the
    # CLI starts Ray only before a step that runs, so this touches no cluster
    from uae_ray.cli import main

    capsys.readouterr()
    assert main(["run", "--config", SMALL, "--run-dir", run, *SETS]) == 0
    out = capsys.readouterr()
    assert "| uae |" in out.out and "| infonce |" in out.out
    assert {m: rd.read_json(f"pipeline/{m}")["run_id"] for m in markers} == {m: v["run_id"] for m, v in markers.items()}
    print(json.dumps({"job_seconds": round(elapsed, 1), "uploaded_files": len(files),
                      "uploaded_bytes": sum(files.values())}))
