"""The Ray Serve retrieval app over real HTTP on 127.0.0.1:8000: search, bad requests, token, replica kill, rollout.

One app is deployed for the module (MiniLM encoder, 2 Flat shards x 2 replicas over a small real corpus); the tests
run in file order and the last one rolls it to a second index while requests keep flowing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from uae_ray.data.schema import CORPUS, CORPUS_SCHEMA, INDEX  # noqa: E402
from uae_ray.index.build import build_sharded_index  # noqa: E402
from uae_ray.index.search import ShardedIndex  # noqa: E402
from uae_ray.runtime import RunDir  # noqa: E402

URL = "http://127.0.0.1:8000"
TOKEN_ENV = "UAE_RAY_TEST_SERVE_TOKEN"
TOKEN = "test-token-not-a-secret"
FACTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Pacific Ocean is the largest and deepest ocean on Earth.",
    "Mount Everest is the highest mountain above sea level.",
    "Python is a programming language that emphasises readability.",
    "The mitochondrion is the powerhouse of the cell.",
    "The Great Wall of China stretches thousands of kilometres.",
    "Honey bees communicate through a waggle dance.",
]


def _make_run(path: Path, tag: str) -> RunDir:
    from uae_ray.models.encoder import encode, load_encoder

    rd = RunDir(path)
    texts = [f"{t} [{tag} {i // len(FACTS)}]" for i, t in enumerate(FACTS * 3)]
    n = len(texts)
    pids = [f"{tag}-d{i // len(FACTS)}#{i % len(FACTS)}" for i in range(n)]
    rd.write_table(CORPUS, pa.table(
        {"pid": pids, "doc_id": [p.split("#")[0] for p in pids], "title": [None] * n, "text": texts,
         "n_tokens": [16] * n},
        schema=CORPUS_SCHEMA,
    ))
    vectors = encode(load_encoder("all-minilm-l6-v2"), texts)
    with rd.staged_dir(INDEX) as out:
        build_sharded_index(vectors, pids, "Flat", 2, out, encoder="all-minilm-l6-v2")
    return rd


def _args(rd: RunDir) -> dict:
    return {"run_dir": rd.uri, "shard_replicas": 2, "encoder_num_cpus": 0.5, "shard_num_cpus": 0.1, "max_batch_size": 8,
            "ingress_num_cpus": 0.1, "token_env": TOKEN_ENV, "max_k": 50, "max_body_bytes": 65536}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[RunDir, RunDir]:
    base = tmp_path_factory.mktemp("serve")
    return _make_run(base / "v1", "v1"), _make_run(base / "v2", "v2")


@pytest.fixture(scope="module")
def client(ray_session, runs, monkeypatch_module):
    from ray import serve

    from serve.app import build_app

    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)  # read by build_app on the driver; replicas get only its sha256
    serve.start(http_options={"host": "127.0.0.1", "port": 8000}, logging_config={"enable_access_log": False})
    serve.run(build_app(_args(runs[0])), logging_config={"enable_access_log": False})
    with httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_serve_stage_args_are_valid_app_args(tmp_path):
    from serve.api import AppArgs
    from uae_ray.config import ServeConfig
    from uae_ray.stages.serve import app_args, import_app_module

    args = AppArgs.model_validate(app_args(ServeConfig(shard_replicas=3, max_k=20), RunDir(tmp_path)))
    assert (args.shard_replicas, args.max_k, args.encoder) == (3, 20, None)
    assert import_app_module().build_app is not None
    with pytest.raises(FileNotFoundError, match="uae-ray index"):
        import_app_module().build_app(args)  # no index in this run dir: a clear error, before any deployment


def test_search_matches_in_process_index(client, runs):
    from uae_ray.models.encoder import encode, load_encoder

    r = client.post("/search", json={"query": "What is the tallest mountain?", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    hits = body["results"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all("Everest" in h["text"] for h in hits[:3]) and hits[0]["doc_id"].startswith("v1-d")
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert set(body["timing_ms"]) == {"encode", "search", "total"}
    # the service returns exactly what the in-process sharded index returns for the same query vector
    index = ShardedIndex.load(runs[0].local_path(INDEX))
    ref_scores, ref_pids = index.search(encode(load_encoder("all-minilm-l6-v2"), ["What is the tallest mountain?"]), 5)
    assert [h["pid"] for h in hits] == ref_pids[0]
    np.testing.assert_allclose(scores, ref_scores[0], atol=1e-4)
    two = client.post("/search", json={"queries": ["powerhouse of the cell", "bees dance"], "k": 2}).json()
    assert [len(q["hits"]) for q in two["results"]] == [2, 2]
    assert "mitochondrion" in two["results"][0]["hits"][0]["text"] and "bees" in two["results"][1]["hits"][0]["text"]


def test_encoder_batches_concurrent_queries_with_the_configured_size(client):
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    encoder = serve.get_deployment_handle("QueryEncoder", app_name="default")
    before = encoder.stats.remote().result()
    assert before["max_batch_size"] == 8 and before["batch_wait_timeout_s"] == pytest.approx(0.005)  # user_config

    def one(i: int) -> int:
        return client.post("/search", json={"query": f"question {i} about oceans", "k": 1}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(32))) == [200] * 32
    after = encoder.stats.remote().result()
    queries, batches = after["queries"] - before["queries"], after["batches"] - before["batches"]
    print(f"encoder: {queries} queries in {batches} batches")
    assert queries == 32 and batches < 32  # concurrent requests were encoded together


def test_bad_requests_get_4xx_with_a_message_and_the_service_survives(client):
    cases = [
        ({"query": "", "k": 3}, 422, "empty"),
        ({"query": "   ", "k": 3}, 422, "empty"),
        ({"query": "x", "k": 0}, 422, "k"),
        ({"query": "x", "k": 51}, 422, "k"),
        ({"query": "x", "k": "5"}, 422, "integer"),
        ({"query": "x", "k": True}, 422, "integer"),
        ({"query": 42, "k": 3}, 422, "string"),
        ({"queries": "not a list", "k": 3}, 422, "array"),
        ({"queries": [], "k": 3}, 422, "queries"),
        ({"queries": ["a"] * 33, "k": 3}, 422, "queries"),
        ({"query": "a", "queries": ["b"]}, 422, "exactly one"),
        ({"k": 3}, 422, "exactly one"),
        ({"query": "a", "nope": 1}, 422, "nope"),
        ({"query": "x" * 2001}, 422, "longer"),
        ({"query": "x" * 70_000}, 413, "larger"),
        ([1, 2, 3], 422, "body"),
    ]
    for body, status, needle in cases:
        r = client.post("/search", json=body)
        assert r.status_code == status, (body if len(str(body)) < 200 else "big body", r.status_code, r.text)
        assert needle in r.json()["detail"], (needle, r.text)
    raw = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 422 and "JSON" in raw.json()["detail"]
    vec = client.post("/search/vectors", json={"vectors": [[0.1] * 10], "k": 3})
    assert vec.status_code == 422 and "384" in vec.json()["detail"]
    assert client.get("/search").status_code == 405
    # nothing above killed or wedged a replica
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/search", json={"query": "ocean", "k": 1}).status_code == 200


def test_bearer_token_guards_search_only(client):
    with httpx.Client(base_url=URL, timeout=30) as anon:
        assert anon.post("/search", json={"query": "ocean", "k": 1}).status_code == 401
        wrong = anon.post("/search", json={"query": "ocean"}, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/docs").status_code == 200
        paths = anon.get("/openapi.json").json()["paths"]
        assert {"/search", "/search/vectors", "/healthz"} <= set(paths)


def test_vector_endpoint_searches_without_the_encoder(client, runs):
    from uae_ray.models.encoder import encode, load_encoder

    q = encode(load_encoder("all-minilm-l6-v2"), ["honey bees"])
    r = client.post("/search/vectors", json={"vectors": q.tolist(), "k": 3})
    assert r.status_code == 200, r.text
    _, ref_pids = ShardedIndex.load(runs[0].local_path(INDEX)).search(q, 3)
    assert [h["pid"] for h in r.json()["results"][0]["hits"]] == ref_pids[0]


class _Load:
    """Sequential /search requests in a background thread; counts outcomes."""

    def __init__(self, client_headers: dict[str, str]) -> None:
        self.outcomes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.ok_at: list[float] = []  # time.monotonic() of each successful response
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client_headers,), daemon=True)

    def _run(self, headers: dict[str, str]) -> None:
        with httpx.Client(base_url=URL, headers=headers, timeout=30) as c:
            while not self._stop.is_set():
                try:
                    r = c.post("/search", json={"query": "largest ocean", "k": 3})
                    ok = r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 3
                    self.outcomes["ok" if ok else f"http {r.status_code}"] += 1
                    if ok:
                        self.versions[r.json()["version"]] += 1
                        self.ok_at.append(time.monotonic())
                except httpx.HTTPError as e:
                    self.outcomes[type(e).__name__] += 1
                time.sleep(0.02)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _replicas(deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]


def _wait_running(deployment: str, n: int, timeout_s: float = 90) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = serve.status().applications["default"].deployments[deployment]
        if status.replica_states.get("RUNNING", 0) == n and status.status == "HEALTHY":
            return
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: not back to {n} running replicas: {serve.status()}")


def test_killed_shard_replica_is_replaced_and_requests_continue(client):
    import ray

    victims = _replicas("IndexShard0")
    assert len(victims) == 2
    with _Load(dict(client.headers)) as load:
        time.sleep(1.0)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        time.sleep(3.0)
        _wait_running("IndexShard0", 2)
        replaced_at = time.monotonic()
        time.sleep(1.0)
    print(f"replica kill: outcomes {dict(load.outcomes)}")
    assert set(load.outcomes) == {"ok"}, f"failed requests during the replica kill: {dict(load.outcomes)}"
    # requests were answered before the kill, while the replica was down and being replaced, and after
    phases = [sum(t < killed_at for t in load.ok_at), sum(killed_at <= t < replaced_at for t in load.ok_at),
              sum(t >= replaced_at for t in load.ok_at)]
    assert all(n > 0 for n in phases), f"answered requests before / during / after the replacement: {phases}"
    assert victims[0] not in _replicas("IndexShard0")


def test_rolling_update_to_a_new_index_drops_no_request(client, runs):
    from ray import serve

    from serve.app import build_app

    before = client.get("/healthz").json()["version"]
    with _Load(dict(client.headers)) as load:
        time.sleep(1.0)
        serve.run(build_app(_args(runs[1])), logging_config={"enable_access_log": False})
        time.sleep(2.0)
    after = client.get("/healthz").json()
    print(f"rolling update: outcomes {dict(load.outcomes)}, versions {dict(load.versions)}")
    assert after["version"] != before and set(load.versions) == {before, after["version"]}
    assert set(load.outcomes) == {"ok"}, f"failed requests during the rollout: {dict(load.outcomes)}"
    hits = client.post("/search", json={"query": "tallest mountain", "k": 3}).json()["results"][0]["hits"]
    assert all(h["pid"].startswith("v2-") for h in hits)
