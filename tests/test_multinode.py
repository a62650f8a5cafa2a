"""The stages on a real multi-node Ray cluster on this machine, and what happens when a worker node dies.

``ray.cluster_utils.Cluster``: a head (no custom resource) and two worker nodes, each its own raylet and object store,
declaring the custom resource ``uae_worker`` that pins work to them. Placement is read from Ray's state API (actors
with their node ids), never from logs. Each failure test removes a worker node (``Cluster.remove_node`` kills its
raylet, object store and workers) in the middle of the work, then checks the outcome; a fresh worker node is added
before the next test, so the tests do not depend on their order.

The run directory is an ``s3://`` prefix on the session's moto S3 endpoint throughout (``s3_run_uri``): every node
reads and writes the same store, and Ray Train keeps its checkpoints there.

One cluster serves the module; it is shut down at the end, also after a failure. A local Ray the session already
started (``ray_session``) is disconnected first and started again afterwards, so test order does not matter.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _training_data import build_tiny_run
from test_label_resume import write_label_run

from uae_ray.config import LabelConfig, TrainEncoderConfig, TrainRewardConfig, TrainScaling
from uae_ray.data import schema
from uae_ray.runtime import RunDir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORKER = "uae_worker"  # custom resource only the worker nodes declare
WORKER_CPUS = 2
SPREAD_TWO = TrainScaling(num_workers=2, cpus_per_worker=1, resources_per_worker={WORKER: 1},
                          placement_strategy="SPREAD")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, cond: Callable[[], Any], timeout_s: float, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@dataclass
class MultiNode:
    """The module's cluster: its head node id and the live worker nodes (``ray._private.node.Node``)."""

    cluster: Any
    head_id: str
    workers: list[Any] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # node ids removed so far

    def add_worker(self) -> Any:
        node = self.cluster.add_node(num_cpus=WORKER_CPUS, resources={WORKER: 4},
                                     object_store_memory=200 * 1024**2)
        self.cluster.wait_for_nodes()
        self.workers.append(node)
        return node

    def ensure_workers(self, n: int = 2) -> None:
        while len(self.workers) < n:
            self.add_worker()

    def worker_ids(self) -> set[str]:
        return {w.node_id for w in self.workers}

    def remove(self, node_id: str) -> None:
        node = next(w for w in self.workers if w.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)  # SIGKILL: raylet, object store, workers
        self.workers.remove(node)
        self.removed.append(node_id)


@pytest.fixture(scope="module")
def multinode(s3_endpoint: str) -> Iterator[MultiNode]:
    """The cluster, started after the S3 endpoint so every node inherits its address."""
    import ray
    from ray.cluster_utils import Cluster

    from uae_ray.runtime import init_ray

    had_local_ray = ray.is_initialized()  # ray_session's local Ray, if a test before this module started it
    ray.shutdown()
    cluster = Cluster()
    try:
        head = cluster.add_node(
            num_cpus=1, object_store_memory=200 * 1024**2, include_dashboard=True,  # the state API needs it
            dashboard_port=_free_port(), dashboard_agent_listen_port=_free_port(), metrics_export_port=_free_port(),
        )
        mn = MultiNode(cluster, head.node_id)
        mn.ensure_workers(2)
        init_ray(cluster.address)
        _wait("the state API", lambda: len(_alive_nodes_or_none()) == 3, 60, every_s=1)
        yield mn
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local_ray:
            init_ray(None, num_cpus=4)  # as ray_session started it, for the tests that run after this module


@pytest.fixture
def two_workers(multinode: MultiNode) -> MultiNode:
    """The cluster with two live worker nodes (a node removed by an earlier test is replaced)."""
    multinode.ensure_workers(2)
    _wait("2 worker nodes alive", lambda: {n.node_id for n in _alive_nodes() if WORKER in n.resources_total}
          == multinode.worker_ids(), 60)
    return multinode


# ---------------------------------------------------------------------------------------------- state API helpers
def _alive_nodes() -> list[Any]:
    from ray.util.state import list_nodes

    # filtered here, not by the state API: a server-side filter that drops dead nodes reads as truncated output
    return [n for n in list_nodes(limit=1000, detail=True) if n.state == "ALIVE"]


def _alive_nodes_or_none() -> list[Any]:
    try:
        return _alive_nodes()
    except Exception:  # the dashboard is still starting
        return []


def _actors(match: Callable[[Any], bool], alive_only: bool = True) -> list[Any]:
    from ray.util.state import list_actors

    return [a for a in list_actors(limit=10_000, detail=True) if match(a) and (a.state == "ALIVE" or not alive_only)]


def _label_actors() -> list[Any]:
    return _actors(lambda a: "LabelPairsBatch" in (a.repr_name or ""))


def _train_workers(alive_only: bool = True) -> list[Any]:
    return _actors(lambda a: a.class_name == "RayTrainWorker", alive_only)


def _run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _join(t: threading.Thread, out: dict[str, Any], timeout_s: float) -> Any:
    t.join(timeout_s)
    assert not t.is_alive(), f"still running after {timeout_s:.0f} s"
    if "error" in out:
        raise out["error"]
    return out["result"]


# ------------------------------------------------------------------------------------------------------- labeling
def test_label_actors_on_both_workers_and_a_node_dies_midway(two_workers: MultiNode, s3_run_uri: str) -> None:
    """Label actors run on both worker nodes, none on the head; one node dies midway: every pair exactly once."""
    from uae_ray.stages import label

    rd, n_pairs = write_label_run(s3_run_uri, n_queries=12, filler=6)
    cfg = LabelConfig(rows_per_part=4, rows_per_batch=2,
                      pool={"min_size": 2, "max_size": 2, "batch_size": 2, "resources": {WORKER: 1}})
    t0 = time.monotonic()
    thread, out = _run_in_thread(lambda: label.run(cfg, rd))
    actors = _wait("2 label actors alive", lambda: (a := _label_actors()) and len(a) == 2 and a, 240)
    nodes = {a.node_id for a in actors}
    assert nodes == two_workers.worker_ids(), f"label actors on {nodes}, worker nodes {two_workers.worker_ids()}"
    assert two_workers.head_id not in nodes
    # labels stream into the content-keyed cache part by part (utilities/ is the view written at the end)
    _wait("the first label cache part", lambda: rd.listdir(schema.LABEL_CACHE), 240, every_s=0.05)
    victim = actors[0].node_id
    written_at_kill = rd.read_table(schema.LABEL_CACHE).num_rows
    two_workers.remove(victim)
    killed_at = time.monotonic() - t0
    report = _join(thread, out, 300)
    seconds = time.monotonic() - t0

    util, skipped = rd.read_table(schema.UTILITIES), rd.read_table(schema.LABEL_SKIPPED)
    keys = list(zip(util["qid"].to_pylist(), util["pid"].to_pylist(), strict=True))
    keys += list(zip(skipped["qid"].to_pylist(), skipped["pid"].to_pylist(), strict=True))
    cands = rd.read_table(schema.CANDIDATES)
    expected = set(zip(cands["qid"].to_pylist(), cands["pid"].to_pylist(), strict=True))
    doubled = [k for k, c in Counter(keys).items() if c > 1]
    assert not doubled, f"pairs written twice: {doubled[:5]}"
    assert set(keys) == expected and len(keys) == n_pairs == 48
    assert report["unaccounted"] == 0 and report["labeled"] == util.num_rows == 44
    assert report["skipped"] == {"empty_answer": 4}
    fingerprints = rd.read_table(schema.LABEL_CACHE)["fingerprint"].to_pylist()
    assert len(fingerprints) == len(set(fingerprints)), "a pair was labeled twice"
    assert written_at_kill < len(fingerprints), "the node died after the labeling had finished"
    # no scoring actor of this run (no-passage terms, pairs, a restarted one) ever ran on the head
    scorers = _actors(lambda a: "LabelPairsBatch" in (a.repr_name or "") or "BaselineBatch" in (a.repr_name or ""),
                      alive_only=False)
    assert scorers and two_workers.head_id not in {a.node_id for a in scorers}
    print(f"label on 2 worker nodes: {n_pairs} pairs, node removed at {killed_at:.1f} s with {written_at_kill} "
          f"labeled; finished at {seconds:.1f} s, duplicates dropped {report['this_run']['duplicates_dropped']}")


# ------------------------------------------------------------------------------------------------------- training
def test_train_reward_ddp_workers_on_two_nodes(two_workers: MultiNode, s3_run_uri: str) -> None:
    from uae_ray.stages import train_reward

    rd = build_tiny_run(s3_run_uri, n_docs=8)
    before = {a.actor_id for a in _train_workers(alive_only=False)}
    cfg = TrainRewardConfig(max_length=48, epochs=1, lr=2e-4, queries_per_step=2, group_size=6,
                            heldout_fraction=0.15, scaling=SPREAD_TWO)
    t0 = time.monotonic()
    summary = train_reward.run(cfg, rd)
    seconds = time.monotonic() - t0
    workers = [a for a in _train_workers(alive_only=False) if a.actor_id not in before]
    assert len(workers) == 2, workers
    nodes = {a.node_id for a in workers}
    assert nodes == two_workers.worker_ids(), f"DDP workers on {nodes}, worker nodes {two_workers.worker_ids()}"
    assert rd.uri.startswith("s3://") and rd.dir_complete(schema.REWARD_MODEL) and summary["steps"] > 0
    assert rd.listdir(f"{schema.CHECKPOINTS}/train_reward"), "no checkpoint in the run directory"
    print(f"train-reward, 2 DDP workers on 2 nodes: {summary['steps']} steps in {seconds:.1f} s")


def test_train_encoder_node_dies_midway_resumes_from_checkpoint(two_workers: MultiNode, s3_run_uri: str) -> None:
    """2 DDP workers on 2 nodes; one node dies after a checkpoint: the group restarts on the surviving node from it."""
    from uae_ray.stages import train_encoder
    from uae_ray.training.data import steps_per_epoch

    rd = build_tiny_run(s3_run_uri, n_docs=8)
    cfg = TrainEncoderConfig(
        max_query_length=32, max_passage_length=48, queries_per_step=2, n_hard_negatives=3, lr=2e-4, epochs=3,
        checkpoint_every_steps=2, loss="infonce",
        scaling=SPREAD_TWO.model_copy(update={"max_failures": 1}),
    )
    snapshot = f"{schema.CHECKPOINTS}/train_encoder-{cfg.output}/checkpoint_manager_snapshot.json"
    before = {a.actor_id for a in _train_workers(alive_only=False)}
    t0 = time.monotonic()
    thread, out = _run_in_thread(lambda: train_encoder.run(cfg, rd))
    # a checkpoint is resumable once the controller recorded it in its snapshot (after the checkpoint is persisted)
    _wait("the first checkpoint", lambda: rd.exists(snapshot) or "error" in out, 300, every_s=0.1)
    workers = [a for a in _train_workers() if a.actor_id not in before]
    assert len(workers) == 2 and {a.node_id for a in workers} == two_workers.worker_ids(), workers
    victim = workers[0].node_id
    two_workers.remove(victim)
    killed_at = time.monotonic() - t0
    summary = _join(thread, out, 400)
    seconds = time.monotonic() - t0

    total = steps_per_epoch(14, 2, 2) * 3
    assert summary["steps"] == total
    assert summary["resumed_from_step"] and 2 <= summary["resumed_from_step"][0] < total, summary
    model_dir = rd.fetch_dir(cfg.output)  # committed to the object store, fetched and verified against its record
    assert "model.safetensors" in rd.commit_record(cfg.output)["files"]
    history = json.loads((model_dir / "training.json").read_text())["state"]["history"]
    assert [h["step"] for h in history] == list(range(1, total + 1))  # continued from the checkpoint, no repeats
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(model_dir), device="cpu").encode(["a question"]).shape == (1, 384)
    first = before | {w.actor_id for w in workers}
    restarted = [a for a in _train_workers(alive_only=False) if a.actor_id not in first]
    assert len(restarted) == 2 and victim not in {a.node_id for a in restarted}, restarted
    print(f"train-encoder: node removed at {killed_at:.1f} s, resumed from step {summary['resumed_from_step'][0]}, "
          f"{total} steps done at {seconds:.1f} s")


# -------------------------------------------------------------------------------------------------------- serving
FACTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Pacific Ocean is the largest and deepest ocean on Earth.",
    "Mount Everest is the highest mountain above sea level.",
    "Python is a programming language that emphasises readability.",
    "Honey bees communicate through a waggle dance.",
]


def _index_run(root: str) -> RunDir:
    """A run dir with corpus.parquet and a published 2-shard Flat index version of it (MiniLM vectors)."""
    import pyarrow as pa

    from uae_ray.index.build import build_sharded_index
    from uae_ray.index.versions import publish
    from uae_ray.models.encoder import encode, load_encoder

    rd = RunDir(root)
    texts = [f"{t} [{i // len(FACTS)}]" for i, t in enumerate(FACTS * 2)]
    pids = [f"d{i // len(FACTS)}#{i % len(FACTS)}" for i in range(len(texts))]
    corpus = pa.table({"pid": pids, "doc_id": [p.split("#")[0] for p in pids], "title": [None] * len(texts),
                       "text": texts, "n_tokens": [16] * len(texts)}, schema=schema.CORPUS_SCHEMA)
    rd.write_table(schema.CORPUS, corpus)
    vectors = encode(load_encoder("all-minilm-l6-v2"), texts)

    def build(out: Path, version: str) -> dict[str, Any]:
        return build_sharded_index(vectors, pids, "Flat", 2, out, encoder="all-minilm-l6-v2",
                                   extra={"version": version}, passages=corpus.select(["doc_id", "text"]))

    publish(rd, schema.INDEX, {"test": "multinode"}, build)
    return rd


class _Load:
    """Sequential POST /search in a background thread (at most ``limit`` requests); counts outcomes."""

    def __init__(self, url: str, limit: int = 2000) -> None:
        self.url, self.limit = url, limit
        self.outcomes: Counter[str] = Counter()
        self.ok_at: list[float] = []
        self.latency_s: list[float] = []  # of each answered request, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as c:
            for _ in range(self.limit):
                if self._stop.is_set():
                    return
                try:
                    t0 = time.monotonic()
                    r = c.post("/search", json={"query": "largest ocean", "k": 3})
                    ok = r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 3
                    self.outcomes["ok" if ok else f"http {r.status_code}: {r.text[:200]}"] += 1
                    if ok:
                        self.ok_at.append(time.monotonic())
                        self.latency_s.append(self.ok_at[-1] - t0)
                except httpx.HTTPError as e:
                    self.outcomes[type(e).__name__] += 1
                time.sleep(0.02)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _replica_nodes() -> dict[str, list[str]]:
    """Deployment name -> node ids of its live replicas (actor class ``ServeReplica:<app>:<deployment>``)."""
    out: dict[str, list[str]] = {}
    for a in _actors(lambda a: a.class_name.startswith("ServeReplica:")):
        out.setdefault(a.class_name.split(":")[-1], []).append(a.node_id)
    return out


def test_serve_replicas_on_both_workers_and_a_node_dies_under_load(two_workers: MultiNode, s3_run_uri: str) -> None:
    """Each shard's 2 replicas on the 2 worker nodes; one node dies under load: 0 failed requests."""
    import httpx
    from ray import serve

    from uae_ray.serve.app import build_app

    rd = _index_run(s3_run_uri)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # one HTTP proxy, on the head: every node of this cluster has the address 127.0.0.1, so proxies on the worker
    # nodes would share the port (SO_REUSEPORT) and a node's death would cut the connections its proxy held
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False})
    try:
        args = {"run_dir": rd.uri, "shard_replicas": 2, "ingress_replicas": 1, "shard_num_cpus": 0.1,
                "ingress_num_cpus": 0.5, "max_batch_size": 8, "node_resource": WORKER}
        serve.run(build_app(args), logging_config={"enable_access_log": False})
        placed = _replica_nodes()
        workers = two_workers.worker_ids()
        assert sorted(placed["ShardGroup0"]) == sorted(workers), f"shard groups on {placed['ShardGroup0']}, {workers}"
        assert set(placed["Retriever"]) <= workers
        assert httpx.post(f"{url}/search", json={"query": "tallest mountain", "k": 3}, timeout=60).status_code == 200
        # the node without the ingress (and its encoder) dies: the shard group keeps a replica on the other node
        victim = next(iter(workers - set(placed["Retriever"])))
        with _Load(url) as load:
            _wait("requests answered", lambda: len(load.ok_at) >= 20, 60)
            killed_at = time.monotonic()
            two_workers.remove(victim)
            _wait("requests answered after the node died",
                  lambda: sum(t > killed_at + 5 for t in load.ok_at) >= 20, 120)
        after = [lat for t, lat in zip(load.ok_at, load.latency_s, strict=True) if t > killed_at]
        before = load.latency_s[: len(load.latency_s) - len(after)]
        print(f"serve: node removed under load; outcomes {dict(load.outcomes)}; {len(after)} answered after the "
              f"removal; latency median before {1e3 * statistics.median(before):.0f} ms, slowest after "
              f"{max(after):.2f} s")
        assert set(load.outcomes) == {"ok"}, f"failed requests while a node died: {dict(load.outcomes)}"
        assert len(after) >= 20
        retried = httpx.get(f"{url}/healthz", timeout=30).json().get("retried_calls")
        print(f"serve: backend calls the ingress retried itself: {retried}")
    finally:
        serve.shutdown()
