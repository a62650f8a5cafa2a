"""Cluster benchmark, in one run on this machine (every "node" is a `ray start` process on the same 2 cores):

1. a 3-node cluster (head 2 CPUs; two workers of 1 CPU + one `label_node` each); the shrunk demo
   (`configs/demo-small.yaml`) submitted twice with `ray job submit --working-dir .`: once with a local run dir,
   once with an S3 run dir on a moto S3 server (127.0.0.1). Per run: seconds from `ray job submit` to the first
   label part in the run dir, to SUCCEEDED, and each stage's seconds (its pipeline marker): object store vs local;
2. `uae-ray label` on the same pairs with the label pool on 1 worker node (1 actor) vs 2 worker nodes (2 actors,
   `pool.resources={label_node: 1}`): pairs/s. Both nodes share this machine's 2 cores, so 2 nodes can at best
   double 1 node's rate only while the other core would idle; the ratio says what scale-out costs, not what 2 real
   machines would give;
3. Ray's autoscaler (fake multi-node provider, head with 0 CPUs, node type 0..2 with `label_node: 1`): seconds from
   an actor's request to its node alive and to the actor answering, for 1 then 2 nodes; seconds from idle to removal.

    .venv/bin/python bench/bench_cluster.py      # writes bench/results/bench_cluster.json (~8 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
for _k, _v in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)

from _ray_nodes import LocalCluster, all_nodes, free_ports, start_head, submit_job, wait_for_job  # noqa: E402

from uae_ray.runtime import RunDir  # noqa: E402

SMALL = "configs/demo-small.yaml"
BUCKET = "uae-ray-bench"
LABEL_OUTPUTS = ("utilities", "utilities_skipped", "label_cache", "label_baseline", "label_report.json")


def start_moto() -> Any:
    """A moto S3 server on 127.0.0.1 with test credentials (never real ones), as the tests use."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update({"AWS_ACCESS_KEY_ID": "AKIABENCHKEY00000000", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_REGION": "us-east-1"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    return server


def job_run(cluster: LocalCluster, run: str, name: str) -> dict[str, Any]:
    """The shrunk demo as a job: submit -> first label part -> SUCCEEDED; each stage's seconds from its marker."""
    entry = ["python", "jobs/pipeline.py", "--config", SMALL, "--run-dir", run, "--set", "label.rows_per_part=8"]
    t0 = time.monotonic()
    submit_job(cluster, name, entry)
    t_submitted = time.monotonic() - t0
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    first_label = None
    while first_label is None and not client.get_job_status(name).is_terminal():
        try:
            parts = [p for p in RunDir(run).listdir("utilities") if p.startswith("part-")]
        except OSError:
            parts = []
        if parts:
            first_label = time.monotonic() - t0
        time.sleep(0.5)
    wait_for_job(cluster, name, timeout_s=400)
    total = time.monotonic() - t0
    rd = RunDir(run)
    stages = {m.removesuffix(".json"): rd.read_json(f"pipeline/{m}")["seconds"] for m in rd.listdir("pipeline")}
    return {"run_dir": run.split("://")[0] if "://" in run else "local", "submit_cli_s": round(t_submitted, 1),
            "submit_to_first_label_s": None if first_label is None else round(first_label, 1),
            "submit_to_succeeded_s": round(total, 1), "stage_s": {k: round(v, 1) for k, v in stages.items()},
            "label_pairs_per_s": rd.read_json("label_report.json")["this_run"]["pairs_per_s"]}


def label_on_nodes(cluster: LocalCluster, source: Path, work: Path, n: int) -> dict[str, Any]:
    """`uae-ray label` over a copy of ``source`` with ``n`` actors, one per worker node (label_node: 1 each)."""
    run = work / f"label-{n}"
    shutil.copytree(source, run)
    for name in LABEL_OUTPUTS:
        p = run / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    sets = [f"pool.min_size={n}", f"pool.max_size={n}", "pool.resources={label_node: 1}", "splits=[train, dev]"]
    t0 = time.monotonic()
    r = subprocess.run(["uae-ray", "label", "--config", SMALL, "--run-dir", str(run), "--address", cluster.gcs,
                        *(x for s in sets for x in ("--set", s))], cwd=ROOT, env=cluster.env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"uae-ray label failed:\n{r.stderr[-4000:]}")
    report = json.loads((run / "label_report.json").read_text())
    return {"worker_nodes": n, "pairs": report["this_run"]["labeled"], "wall_s": round(time.monotonic() - t0, 1),
            "stage_s": report["this_run"]["seconds"], "pairs_per_s": report["this_run"]["pairs_per_s"]}


def autoscaler_timings() -> dict[str, Any]:
    """Node launch (request -> node alive -> actor answers) for 1 then 2 nodes, and idle -> removed."""
    import ray

    worker = {"resources": {"CPU": 1, "label_node": 1, "object_store_memory": 200_000_000}, "node_config": {},
              "min_workers": 0, "max_workers": 2}
    idle_min = 0.25
    cluster = start_head(0, autoscaling={"worker_types": {"label_worker": worker}, "idle_timeout_minutes": idle_min,
                                         "max_workers": 2})
    out: dict[str, Any] = {"idle_timeout_s": idle_min * 60, "update_interval_s": 1}

    def workers_alive() -> int:
        return sum(n["state"] == "ALIVE" for n in all_nodes(cluster.dashboard) if not n["is_head_node"])

    try:
        cluster.wait_for_nodes(1)
        ray.init(address=cluster.gcs, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})

        @ray.remote(num_cpus=1, resources={"label_node": 1})
        class Probe:
            def ping(self) -> str:
                return ray.get_runtime_context().get_node_id()

        for n in (1, 2):
            t0 = time.monotonic()
            actors = [Probe.remote() for _ in range(n)]
            node_alive = None
            refs = [a.ping.remote() for a in actors]
            while True:
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
                if node_alive is None and workers_alive() >= n:
                    node_alive = time.monotonic() - t0
                if len(done) == len(refs):
                    break
            answered = time.monotonic() - t0
            nodes = set(ray.get(refs))
            for a in actors:
                ray.kill(a)
            t1 = time.monotonic()
            while workers_alive() > 0 and time.monotonic() - t1 < 180:
                time.sleep(0.5)
            out[f"{n}_nodes"] = {"request_to_nodes_alive_s": round(node_alive or answered, 1),
                                 "request_to_actors_answer_s": round(answered, 1), "distinct_nodes": len(nodes),
                                 "idle_to_removed_s": round(time.monotonic() - t1, 1)}
    finally:
        ray.shutdown()
        cluster.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/bench_cluster.json"))
    args = ap.parse_args()
    import ray

    t_all = time.monotonic()
    server = start_moto()
    work = Path(tempfile.mkdtemp(prefix="uae-bench-cluster-"))
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, every node a `ray start` process on it"}
    cluster = start_head(2)
    try:
        cluster.add_worker(1, {"label_node": 1})
        cluster.add_worker(1, {"label_node": 1})
        cluster.wait_for_nodes(3)
        local_run = work / "job-local"
        s3_run = f"s3://{BUCKET}/job-{uuid.uuid4().hex[:8]}"
        result["jobs"] = [job_run(cluster, str(local_run), "bench-local"), job_run(cluster, s3_run, "bench-s3")]
        result["label_nodes"] = [label_on_nodes(cluster, local_run, work, n) for n in (1, 2)]
    finally:
        ray.shutdown()
        cluster.stop()
    result["autoscaler"] = autoscaler_timings()
    server.stop()
    shutil.rmtree(work, ignore_errors=True)
    local, s3 = result["jobs"]
    result["ratios"] = {
        "s3_over_local_total": round(s3["submit_to_succeeded_s"] / local["submit_to_succeeded_s"], 2),
        "s3_over_local_by_stage": {k: round(s3["stage_s"][k] / v, 2) for k, v in local["stage_s"].items() if v},
        "label_2_over_1_nodes_pairs_per_s": round(result["label_nodes"][1]["pairs_per_s"]
                                                  / result["label_nodes"][0]["pairs_per_s"], 2),
    }
    result["bench_seconds"] = round(time.monotonic() - t_all, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print("| stage | local run dir s | S3 run dir s | S3 / local |\n|---|---:|---:|---:|")
    for k, v in local["stage_s"].items():
        print(f"| {k} | {v} | {s3['stage_s'][k]} | {result['ratios']['s3_over_local_by_stage'].get(k, '')} |")
    print(f"| submit -> first label | {local['submit_to_first_label_s']} | {s3['submit_to_first_label_s']} | |")
    print(f"| submit -> SUCCEEDED | {local['submit_to_succeeded_s']} | {s3['submit_to_succeeded_s']} | "
          f"{result['ratios']['s3_over_local_total']} |")
    print("\n| label pool | pairs | stage s | pairs/s |\n|---|---:|---:|---:|")
    for r in result["label_nodes"]:
        print(f"| {r['worker_nodes']} worker node(s), 1 actor each | {r['pairs']} | {r['stage_s']} | "
              f"{r['pairs_per_s']} |")
    print("\n| autoscaler | request -> nodes alive s | request -> actors answer s | idle -> removed s |")
    print("|---|---:|---:|---:|")
    for n in (1, 2):
        a = result["autoscaler"][f"{n}_nodes"]
        print(f"| {n} node(s) | {a['request_to_nodes_alive_s']} | {a['request_to_actors_answer_s']} | "
              f"{a['idle_to_removed_s']} |")
    print(f"\nwrote {args.out} ({result['bench_seconds']} s)")


if __name__ == "__main__":
    main()
