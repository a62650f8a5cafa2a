"""Autoscaling labeling on Ray's own autoscaler (fake multi-node provider: it launches and removes real raylets on
this machine), and the rule that keeps the labeling pool and the cluster files in agreement.

The cluster: a head with no CPUs for work and one worker node type ``label_worker`` (0..2 nodes, each with one
``label_node`` resource). `uae-ray label` with ``pool: {min_size: 2, max_size: 2, resources: {label_node: 1}}`` makes
the autoscaler launch 2 worker nodes, one labeling actor on each; when the stage ends they idle and are removed.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
import yaml
from _ray_nodes import ROOT, LocalCluster, all_nodes, start_head

from uae_ray.config import ActorPool, LabelConfig, load_stage_config
from uae_ray.data import schema as S
from uae_ray.runtime import RunDir

SMALL = "configs/demo-small.yaml"
LABEL_RESOURCE = "label_node"
WORKER_TYPE = {"resources": {"CPU": 2, LABEL_RESOURCE: 1, "object_store_memory": 200_000_000}, "node_config": {},
               "min_workers": 0, "max_workers": 2}
IDLE_TIMEOUT_MIN = 0.25
LABEL_SETS = ["pool.min_size=2", "pool.max_size=2", f"pool.resources={{{LABEL_RESOURCE}: 1}}", "splits=[train]",
              "rows_per_batch=8"]


# ------------------------------------------------------------------------------------------- the agreement rule
def pool_fits(pool: ActorPool, node_resources: dict[str, float], max_nodes: int) -> list[str]:
    """Why an actor pool cannot reach ``max_size`` actors on at most ``max_nodes`` nodes of one type ([] if it can).

    Each actor asks for ``num_cpus``, ``num_gpus`` and its custom ``resources``; a node of the type holds
    ``floor(have / need)`` actors for each of them, and the pool needs ``max_size`` actors in all."""
    need = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    problems, per_node = [], None
    for name, amount in need.items():
        if amount <= 0:
            continue
        have = float(node_resources.get(name, 0))
        if have < amount:
            problems.append(f"an actor needs {name}={amount}, a node has {have}")
            continue
        fit = int(have // amount)
        per_node = fit if per_node is None else min(per_node, fit)
    if not problems and (per_node or 0) * max_nodes < pool.max_size:
        problems.append(f"max_size={pool.max_size} actors, but {max_nodes} nodes hold {(per_node or 0) * max_nodes}")
    return problems


def _sets(entrypoint: str) -> list[str]:
    args = shlex.split(entrypoint)
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def _kuberay_resources(group: dict[str, Any]) -> dict[str, float]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    res: dict[str, float] = {"CPU": float(limits.get("cpu", 0)), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    custom = group.get("rayStartParams", {}).get("resources")
    if custom:
        res.update(yaml.safe_load(yaml.safe_load(custom)))  # '"{\"gpu_node\": 1}"': a quoted JSON string
    return res


def test_pool_fits_counts_actors_per_node():
    pool = ActorPool(min_size=1, max_size=4, num_cpus=4, num_gpus=1, resources={"gpu_node": 1})
    assert pool_fits(pool, {"CPU": 8, "GPU": 1, "gpu_node": 1}, max_nodes=4) == []
    assert pool_fits(pool, {"CPU": 8, "GPU": 1, "gpu_node": 1}, max_nodes=3) == [
        "max_size=4 actors, but 3 nodes hold 3"]
    assert pool_fits(pool, {"CPU": 8, "GPU": 1}, max_nodes=4) == ["an actor needs gpu_node=1.0, a node has 0.0"]


def test_rayjob_label_pool_fits_its_gpu_workers_and_the_standing_clusters():
    """The RayJob's label pool (its `--set pool.*`) fits the GPU worker group of the RayJob's own cluster, of the
    KubeRay RayCluster and of the launcher's gpu_worker node type: same resource names, enough nodes."""
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    entry = job["spec"]["entrypoint"]
    config_path = shlex.split(entry)[shlex.split(entry).index("--config") + 1]
    cfg = load_stage_config(LabelConfig, "label", str(ROOT / config_path), _sets(entry))
    assert cfg.pool.num_gpus >= 1 and cfg.pool.resources  # the GPU labeling pool asks for its node type by name

    def gpu_group(groups: list[dict[str, Any]]) -> dict[str, Any]:
        (g,) = [g for g in groups if _kuberay_resources(g)["GPU"] > 0]
        return g

    job_group = gpu_group(job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert pool_fits(cfg.pool, _kuberay_resources(job_group), job_group["maxReplicas"]) == []
    rc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    rc_group = gpu_group(rc["spec"]["workerGroupSpecs"])
    assert pool_fits(cfg.pool, _kuberay_resources(rc_group), rc_group["maxReplicas"]) == []
    aws = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    gpu_type = aws["available_node_types"]["gpu_worker"]
    assert pool_fits(cfg.pool, gpu_type["resources"], gpu_type["max_workers"]) == []
    assert gpu_type["min_workers"] == 0 and job_group["minReplicas"] == 0 and rc_group["minReplicas"] == 0


# ------------------------------------------------------------------------------------------- the autoscaling run
class NodeWatch:
    """Polls the dashboard's node list every second: the most worker nodes alive at once, and every node seen."""

    def __init__(self, dashboard: str) -> None:
        self.dashboard = dashboard
        self.max_alive_workers = 0
        self.seen: dict[str, dict[str, Any]] = {}
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _sample(self) -> None:
        nodes = [n for n in all_nodes(self.dashboard) if not n["is_head_node"]]
        alive = sum(n["state"] == "ALIVE" for n in nodes)
        self.seen.update({n["node_id"]: n for n in nodes})
        self.max_alive_workers = max(self.max_alive_workers, alive)
        if not self.timeline or self.timeline[-1][1] != alive:
            self.timeline.append((round(time.monotonic() - self._t0, 1), alive))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(1.0)

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()  # the state the caller just waited for (the last poll can be up to a second old)

    def alive_workers(self) -> int:
        return sum(n["state"] == "ALIVE" for n in all_nodes(self.dashboard) if not n["is_head_node"])


def wait_for_workers(dashboard: str, n: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if sum(x["state"] == "ALIVE" for x in all_nodes(dashboard) if not x["is_head_node"]) == n:
            return time.monotonic() - t0
        time.sleep(1.0)
    raise TimeoutError(f"not {n} worker nodes after {timeout_s} s: {all_nodes(dashboard)}")


@pytest.fixture
def autoscaling_cluster() -> Iterator[LocalCluster]:
    import ray

    ray.shutdown()  # a session-wide local cluster must not be connected while this one runs
    cluster = start_head(0, autoscaling={"worker_types": {"label_worker": WORKER_TYPE},
                                         "idle_timeout_minutes": IDLE_TIMEOUT_MIN, "max_workers": 2})
    try:
        cluster.wait_for_nodes(1)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


def uae_ray(cluster: LocalCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["uae-ray", *args, "--address", cluster.gcs], cwd=ROOT, env=cluster.env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"uae-ray {args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.mark.slow
def test_label_scales_worker_nodes_from_0_to_2_and_back(autoscaling_cluster: LocalCluster, tmp_path: Path):
    cluster = autoscaling_cluster
    run = str(tmp_path / "run")
    assert wait_for_workers(cluster.dashboard, 0, 5) >= 0  # the head alone: no CPU for work
    # prepare + mine on the same cluster (mine's encoder actors make it launch a node too), then back to 0
    uae_ray(cluster, "run", "--config", SMALL, "--run-dir", run, "--until", "mine")
    wait_for_workers(cluster.dashboard, 0, timeout_s=90)
    before = set(n["node_id"] for n in all_nodes(cluster.dashboard) if not n["is_head_node"])

    label_cfg = load_stage_config(LabelConfig, "label", str(ROOT / SMALL), LABEL_SETS)
    assert pool_fits(label_cfg.pool, WORKER_TYPE["resources"], WORKER_TYPE["max_workers"]) == []
    with NodeWatch(cluster.dashboard) as watch:
        uae_ray(cluster, "label", "--config", SMALL, "--run-dir", run, *(x for s in LABEL_SETS for x in ("--set", s)))
        scale_down_s = wait_for_workers(cluster.dashboard, 0, timeout_s=120)
    launched = set(watch.seen) - before
    assert watch.max_alive_workers == 2, watch.timeline
    assert len(launched) >= 2 and all(watch.seen[n]["state"] == "DEAD" for n in launched), watch.timeline

    # both labeling actors ran on launched worker nodes, one each
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
    label_nodes = [a.node_id for a in actors if "LabelPairsBatch" in a.class_name]
    assert len(label_nodes) == 2 and set(label_nodes) <= launched, [(a.class_name, a.node_id) for a in actors]

    # every candidate pair of the labeled split is labeled exactly once (or skipped with a reason, once)
    rd = RunDir(run)
    queries = rd.read_table(S.QUERIES)
    train_q = set(queries.filter(pc.equal(queries["split"], "train"))["qid"].to_pylist())
    cands = rd.read_table(S.CANDIDATES, columns=["qid", "pid"])
    expected = {(q, p) for q, p in zip(cands["qid"].to_pylist(), cands["pid"].to_pylist(), strict=True)
                if q in train_q}
    utils = rd.read_table(S.UTILITIES, columns=["qid", "pid"])
    got = list(zip(utils["qid"].to_pylist(), utils["pid"].to_pylist(), strict=True))
    skipped = rd.read_table(S.LABEL_SKIPPED, columns=["qid", "pid"]) if rd.exists(S.LABEL_SKIPPED) else None
    if skipped is not None:
        got += list(zip(skipped["qid"].to_pylist(), skipped["pid"].to_pylist(), strict=True))
    assert len(got) == len(set(got)) and set(got) == expected and len(expected) > 0
    report = rd.read_json(S.LABEL_REPORT)
    assert report["unaccounted"] == 0 and report["this_run"]["duplicates_dropped"] == 0
    print({"timeline": watch.timeline, "scale_down_s": round(scale_down_s, 1), "pairs": len(expected)})
