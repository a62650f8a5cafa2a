"""The Ray Serve retrieval app over real HTTP and gRPC on 127.0.0.1: search, expected utility and adaptive k, bad
requests, token, body limit, replica kill, an index rebuilt in place under a pinned app, rollout, timeout; `uae-ray
serve` itself; the app importable from a built wheel outside the checkout.

One app is deployed for the module (MiniLM encoder in the ingress, one shard group x 2 replicas holding 2 Flat shards
over a small real corpus, index version v1 with a calibration.json); the tests run in file order: the rebuild test
publishes version v2 (no calibration) into the same run dir while the app keeps serving v1, restarts and scales
shard-group replicas, then rolls the app to v2 while requests keep flowing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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
if str(ROOT) not in sys.path:  # the checkout's serve/app.py (a re-export), as `serve run serve.app:build_app` sees it
    sys.path.insert(0, str(ROOT))

from uae_ray.calibration import CALIBRATION_FILE, UtilityCalibration, save_calibration  # noqa: E402
from uae_ray.data.schema import CORPUS, CORPUS_SCHEMA, INDEX  # noqa: E402
from uae_ray.index.build import build_sharded_index  # noqa: E402
from uae_ray.index.search import ShardedIndex  # noqa: E402
from uae_ray.index.versions import current_version, publish  # noqa: E402
from uae_ray.runtime import RunDir  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
GRPC_PORT = _free_port()
URL = f"http://127.0.0.1:{PORT}"
#: score -> expected utility (nats) written into v1's index version dir: MiniLM cosines of these texts are ~0-0.8
CALIBRATION = UtilityCalibration(score_knots=(0.0, 0.2, 0.4, 0.6), utility_knots=(0.0, 0.1, 0.8, 2.0), n_pairs=40,
                                 source="test")
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


def _corpus(tag: str) -> pa.Table:
    texts = [f"{t} [{tag} {i // len(FACTS)}]" for i, t in enumerate(FACTS * 3)]
    n = len(texts)
    pids = [f"{tag}-d{i // len(FACTS)}#{i % len(FACTS)}" for i in range(n)]
    return pa.table({"pid": pids, "doc_id": [p.split("#")[0] for p in pids], "title": [None] * n, "text": texts,
                     "n_tokens": [16] * n}, schema=CORPUS_SCHEMA)


def _publish(rd: RunDir, tag: str) -> str:
    """Write corpus.parquet for ``tag`` (in place) and publish an index version of it; returns the version."""
    from uae_ray.models.encoder import encode, load_encoder

    corpus = _corpus(tag)
    rd.write_table(CORPUS, corpus)
    vectors = encode(load_encoder("all-minilm-l6-v2"), corpus.column("text").to_pylist())

    def build(out, version):
        return build_sharded_index(vectors, corpus.column("pid").to_pylist(), "Flat", 2, out,
                                   encoder="all-minilm-l6-v2", extra={"version": version},
                                   passages=corpus.select(["doc_id", "text", "n_tokens"]))

    return publish(rd, INDEX, {"tag": tag}, build)[0]


def _args(rd: RunDir, **more) -> dict:
    return {"run_dir": rd.uri, "shard_replicas": 2, "shard_num_cpus": 0.1, "max_batch_size": 8,
            "ingress_num_cpus": 0.5, "token_env": TOKEN_ENV, "max_k": 50, "max_body_bytes": 65536, **more}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    rd = RunDir(tmp_path_factory.mktemp("serve") / "run")
    version = _publish(rd, "v1")
    save_calibration(CALIBRATION, rd.local_path(INDEX) / version / CALIBRATION_FILE)  # what evaluate/index write
    return rd


@pytest.fixture(scope="module")
def client(ray_session, run, monkeypatch_module):
    from ray import serve

    from serve.app import build_app  # the checkout's thin re-export of uae_ray.serve.app:build_app
    from uae_ray.serve.app import GRPC_SERVICER

    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)  # read by build_app on the driver; replicas get only its sha256
    serve.start(http_options={"host": "127.0.0.1", "port": PORT}, logging_config={"enable_access_log": False},
                grpc_options={"port": GRPC_PORT, "grpc_servicer_functions": [GRPC_SERVICER]})
    serve.run(build_app(_args(run)), logging_config={"enable_access_log": False})
    with httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_serve_stage_args_are_valid_app_args(tmp_path):
    from uae_ray.config import ServeConfig
    from uae_ray.serve.api import AppArgs
    from uae_ray.serve.app import build_app
    from uae_ray.stages.serve import app_args

    args = AppArgs.model_validate(app_args(ServeConfig(shard_replicas=3, encoder_replicas=2, max_k=20),
                                           RunDir(tmp_path)))
    assert (args.shard_replicas, args.ingress_replicas, args.max_k, args.encoder, args.index_version) == (
        3, 2, 20, None, None)
    with pytest.raises(FileNotFoundError, match="uae-ray index"):
        build_app(args)  # no index in this run dir: a clear error, before any deployment


def test_search_matches_in_process_index(client, run):
    from uae_ray.models.encoder import encode, load_encoder

    r = client.post("/search", json={"query": "What is the tallest mountain?", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    hits = body["results"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all("Everest" in h["text"] for h in hits[:3]) and hits[0]["doc_id"].startswith("v1-d")
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert set(body["timing_ms"]) == {"encode", "search", "total", "shard_groups", "shard_search"}
    # the service returns exactly what the in-process sharded index returns for the same query vector
    index = ShardedIndex.load(run.local_path(INDEX))
    assert body["version"] == index.version == current_version(run, INDEX)
    ref_scores, ref_pids = index.search(encode(load_encoder("all-minilm-l6-v2"), ["What is the tallest mountain?"]), 5)
    assert [h["pid"] for h in hits] == ref_pids[0]
    np.testing.assert_allclose(scores, ref_scores[0], atol=1e-4)
    two = client.post("/search", json={"queries": ["powerhouse of the cell", "bees dance"], "k": 2}).json()
    assert [len(q["hits"]) for q in two["results"]] == [2, 2]
    assert "mitochondrion" in two["results"][0]["hits"][0]["text"] and "bees" in two["results"][1]["hits"][0]["text"]


def test_every_hit_has_expected_utility_monotone_in_score_and_adaptive_k_honours_both_limits(client):
    """v1's calibration.json (written by the fixture) gives every hit an expected utility, non-increasing down the
    ranking as the score is; min_expected_utility and max_context_tokens cut each query's list where choose_k says."""
    full = client.post("/search", json={"queries": ["What is the tallest mountain?", "honey bees"], "k": 12})
    assert full.status_code == 200, full.text
    for result in full.json()["results"]:
        hits = result["hits"]
        assert len(hits) == 12 and all(h["n_tokens"] == 16 for h in hits)  # from the index's passages.parquet
        eu = [h["expected_utility"] for h in hits]
        assert all(isinstance(e, float) for e in eu), eu
        np.testing.assert_allclose(eu, CALIBRATION.expected_utility(np.array([h["score"] for h in hits])), atol=1e-6)
        assert eu == sorted(eu, reverse=True) and eu[0] > eu[-1]  # monotone in the score, and not constant
    hits = full.json()["results"][0]["hits"]
    eu = [h["expected_utility"] for h in hits]
    floor = (eu[2] + eu[3]) / 2 if eu[2] > eu[3] else eu[2]  # a floor between two ranks
    want = sum(e >= floor for e in eu)
    assert 1 <= want < 12

    def k_of(**adaptive: float) -> int:
        r = client.post("/search", json={"query": "What is the tallest mountain?", "k": 12, **adaptive})
        assert r.status_code == 200, r.text
        got = r.json()["results"][0]["hits"]
        assert [h["pid"] for h in got] == [h["pid"] for h in hits[: len(got)]]  # a prefix of the same ranking
        return len(got)

    assert k_of(min_expected_utility=floor) == want
    assert k_of(max_context_tokens=40) == 2  # 16 tokens a passage: 2 fit in 40
    assert k_of(min_expected_utility=floor, max_context_tokens=40) == min(want, 2)
    assert k_of(min_expected_utility=eu[0] + 1.0) == 0  # nothing is expected to help: no passages
    for bad, needle in (({"min_expected_utility": "high"}, "min_expected_utility"),
                        ({"max_context_tokens": 0}, "max_context_tokens"),
                        ({"max_context_tokens": 1.5}, "max_context_tokens")):
        r = client.post("/search", json={"query": "x", "k": 3, **bad})
        assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_grpc_search_beside_http_with_the_same_answers_and_checks(client):
    """Serve's gRPC proxy on 127.0.0.1 answers uae_ray.Retrieval/Search from the same ingress: the same hits as HTTP,
    the token required, bad requests INVALID_ARGUMENT with the HTTP message."""
    import grpc

    from uae_ray.serve import grpc_api

    http = client.post("/search", json={"query": "largest ocean", "k": 4}).json()
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = grpc_api.RetrievalStub(channel)
        auth = [("authorization", f"Bearer {TOKEN}")]
        reply = stub.Search(grpc_api.SearchRequest(query="largest ocean", k=4), metadata=auth, timeout=60)
        assert reply.version == http["version"] and reply.k == 4
        got = [(h.pid, h.text, h.n_tokens) for h in reply.results[0].hits]
        assert got == [(h["pid"], h["text"], h["n_tokens"]) for h in http["results"][0]["hits"]]
        np.testing.assert_allclose([h.expected_utility for h in reply.results[0].hits],
                                   [h["expected_utility"] for h in http["results"][0]["hits"]], atol=1e-6)
        assert {"encode", "total"} <= set(reply.timing_ms)
        adaptive = stub.Search(grpc_api.SearchRequest(query="largest ocean", k=4, max_context_tokens=40),
                               metadata=auth, timeout=60)
        assert len(adaptive.results[0].hits) == 2
        for request, metadata, code, needle in (
            (grpc_api.SearchRequest(query="largest ocean"), [], grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
            (grpc_api.SearchRequest(query="largest ocean"), [("authorization", "Bearer wrong")],
             grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
            (grpc_api.SearchRequest(query="x", k=0), auth, grpc.StatusCode.INVALID_ARGUMENT, "k: must be between"),
            (grpc_api.SearchRequest(), auth, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.Search(request, metadata=metadata, timeout=60)
            assert e.value.code() == code and needle in e.value.details(), (code, e.value.details())


def test_grpc_messages_match_the_shipped_proto():
    """retrieval.proto (for clients) and the descriptor grpc_api builds agree field by field."""
    import re

    from uae_ray.serve import grpc_api

    text = (ROOT / "uae_ray" / "serve" / "retrieval.proto").read_text()
    for name, fields in grpc_api.MESSAGES.items():
        block = re.search(rf"message {name} {{(.*?)}}", text, re.S).group(1)
        declared = {(m[2], int(m[3])) for m in re.findall(r"^\s*(optional |repeated )?([\w<>, ]+?) (\w+) = (\d+);",
                                                             block, re.M)}
        assert declared == {(f[0], f[1]) for f in fields}, (name, declared)
    assert "rpc Search(SearchRequest) returns (SearchResponse)" in text


def test_encoder_batches_concurrent_queries_with_the_configured_size(client):
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    encoder = serve.get_deployment_handle("Retriever", app_name="default")  # the ingress holds the encoder
    before = encoder.stats.remote().result()
    assert before["max_batch_size"] == 8 and before["batch_wait_timeout_s"] == pytest.approx(0.005)  # user_config
    assert before["encoder_backend"] == "torch"

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
    # numbers that do not fit a float32: a 422 naming the position (a 300-digit integer was a 500 from numpy)
    for bad in ("9" * 300, "-" + "9" * 300, "1e39", "NaN", "Infinity", "-Infinity", "1e400"):
        raw_vec = "[" + ",".join(["0.05"] * 200 + [bad] + ["0.05"] * 183) + "]"
        r = client.post("/search/vectors", content=f'{{"vectors": [{raw_vec}], "k": 3}}'.encode(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 422, (bad[:20], r.status_code, r.text[:300])
        assert "vectors" in r.json()["detail"], r.text[:300]
    assert client.get("/search").status_code == 405
    # nothing above killed or wedged a replica
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/search", json={"query": "ocean", "k": 1}).status_code == 200


def test_bearer_token_guards_search_and_health_details(client, run):
    with httpx.Client(base_url=URL, timeout=30) as anon:
        assert anon.post("/search", json={"query": "ocean", "k": 1}).status_code == 401
        wrong = anon.post("/search", json={"query": "ocean"}, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        empty = anon.post("/search", json={"query": "ocean"}, headers={"Authorization": "Bearer"})
        assert empty.status_code == 401
        # without the token: liveness and the version only, no index manifest
        assert anon.get("/healthz").json() == {"status": "ok", "version": current_version(run, INDEX)}
        assert anon.get("/healthz", headers={"Authorization": "Bearer wrong"}).json().keys() == {"status", "version"}
        assert anon.get("/docs").status_code == 200
        paths = anon.get("/openapi.json").json()["paths"]
        assert {"/search", "/search/vectors", "/healthz"} <= set(paths)
    details = client.get("/healthz").json()
    assert details["index"]["vectors"] == 24 and details["index"]["dim"] == 384 and details["shard_groups"] == 1
    assert details["calibrated"] is True


def _server_pids() -> dict[str, int]:
    """pid of this cluster's Serve proxy and ingress replica (children of this test process's raylet)."""
    import psutil

    found = {}
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::ProxyActor"):
            found["proxy"] = p.pid
        elif title.startswith("ray::ServeReplica:default:Retriever"):
            found["ingress"] = p.pid
    return found


def _send_chunked(total: int, chunk: int = 65536) -> tuple[int, int, float]:
    """POST a chunked (no Content-Length) body of up to ``total`` bytes, stopping as soon as a response arrives.
    Returns (status, bytes sent, seconds)."""
    import select

    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=60)
    sock.sendall((f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    piece = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
    sent = 0
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(piece)
            sent += chunk
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: read the answer
    head = b""
    while b"\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    sock.close()
    return int(head.split(b" ")[1]), sent, time.perf_counter() - t0


def test_chunked_oversized_body_gets_a_fast_413_with_flat_memory(client):
    """300 MB sent chunked (no Content-Length): the ingress counts the body as it streams in and answers 413 at the
    limit; the old code read the whole body first (hundreds of MB in the proxy and the replica, many seconds)."""
    import psutil

    pids = _server_pids()
    assert set(pids) == {"proxy", "ingress"}, pids
    before = {k: psutil.Process(p).memory_info().rss for k, p in pids.items()}
    status, sent, seconds = _send_chunked(300 * 2**20)
    after = {k: psutil.Process(p).memory_info().rss for k, p in pids.items()}
    growth_mb = {k: (after[k] - before[k]) / 2**20 for k in pids}
    print(f"chunked 300 MB body: status {status} after {sent / 2**20:.1f} MB sent, {seconds:.2f} s; RSS growth MB "
          f"{growth_mb}")
    assert status == 413
    # what arrives before the 413 is buffered by Serve's HTTP proxy (measured: 21 MB sent, proxy +34 MB, ingress
    # +8 MB, 0.06 s); the bound is what a slow 413 could let in, far below the 300 MB the old code read whole
    assert seconds < 10 and sent < 150 * 2**20, (seconds, sent)
    assert all(g < 128 for g in growth_mb.values()), growth_mb
    assert client.post("/search", json={"query": "ocean", "k": 1}).status_code == 200  # the service is fine


def test_vector_endpoint_searches_without_the_encoder(client, run):
    from uae_ray.models.encoder import encode, load_encoder

    q = encode(load_encoder("all-minilm-l6-v2"), ["honey bees"])
    r = client.post("/search/vectors", json={"vectors": q.tolist(), "k": 3})
    assert r.status_code == 200, r.text
    _, ref_pids = ShardedIndex.load(run.local_path(INDEX)).search(q, 3)
    assert [h["pid"] for h in r.json()["results"][0]["hits"]] == ref_pids[0]


class _Load:
    """Sequential /search requests to 127.0.0.1 in a background thread (at most ``limit``); counts outcomes."""

    def __init__(self, client_headers: dict[str, str], limit: int = 5000) -> None:
        self.limit = limit
        self.outcomes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.ok_at: list[float] = []  # time.monotonic() of each successful response
        self.answers: list[tuple[str, list[dict]]] = []  # (version, hits) of each successful response
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client_headers,), daemon=True)

    def _run(self, headers: dict[str, str]) -> None:
        with httpx.Client(base_url=URL, headers=headers, timeout=30) as c:
            for _ in range(self.limit):
                if self._stop.is_set():
                    return
                try:
                    r = c.post("/search", json={"query": "largest ocean", "k": 3})
                    ok = r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 3
                    self.outcomes["ok" if ok else f"http {r.status_code}: {r.text[:200]}"] += 1
                    if ok:
                        self.versions[r.json()["version"]] += 1
                        self.ok_at.append(time.monotonic())
                        self.answers.append((r.json()["version"], r.json()["results"][0]["hits"]))
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

    victims = _replicas("ShardGroup0")
    assert len(victims) == 2
    with _Load(dict(client.headers)) as load:
        time.sleep(1.0)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        time.sleep(3.0)
        _wait_running("ShardGroup0", 2)
        replaced_at = time.monotonic()
        time.sleep(1.0)
    print(f"replica kill: outcomes {dict(load.outcomes)}")
    assert set(load.outcomes) == {"ok"}, f"failed requests during the replica kill: {dict(load.outcomes)}"
    # requests were answered before the kill, while the replica was down and being replaced, and after
    phases = [sum(t < killed_at for t in load.ok_at), sum(killed_at <= t < replaced_at for t in load.ok_at),
              sum(t >= replaced_at for t in load.ok_at)]
    assert all(n > 0 for n in phases), f"answered requests before / during / after the replacement: {phases}"
    assert victims[0] not in _replicas("ShardGroup0")


def _reference(rd: RunDir, version: str, query: str, k: int) -> list[tuple[str, str, float]]:
    """(pid, text, score) of the top k of ``version``, searched in-process with that version's own files."""
    import pyarrow.parquet as pq

    from uae_ray.models.encoder import encode, load_encoder

    index = ShardedIndex.load(rd.local_path(INDEX) / version)
    texts = dict(zip(*[pq.read_table(index.index_dir / "passages.parquet").column(c).to_pylist()
                       for c in ("pid", "text")], strict=True))
    scores, pids = index.search(encode(load_encoder(index.manifest["encoder"]), [query]), k)
    return [(p, texts[p], float(s)) for p, s in zip(pids[0], scores[0].tolist(), strict=True)]


def _check_answers(rd: RunDir, answers: list[tuple[str, list[dict]]]) -> Counter[str]:
    """Every answer's pids, texts and scores are those of its own version (never a mix of two)."""
    refs = {v: _reference(rd, v, "largest ocean", 3) for v in {v for v, _ in answers}}
    for version, hits in answers:
        got = [(h["pid"], h["text"], h["score"]) for h in hits]
        assert [g[:2] for g in got] == [r[:2] for r in refs[version]], (version, got, refs[version])
        np.testing.assert_allclose([g[2] for g in got], [r[2] for r in refs[version]], atol=1e-4)
    return Counter(v for v, _ in answers)


@pytest.mark.slow
def test_index_rebuilt_in_place_then_restarts_scaling_and_rollout_never_mix_versions(client, run):
    """The app pins v1. Under a request loop: publish v2 into the same run dir (new corpus.parquet, new ids -> pids),
    kill a shard replica (its replacement starts after the rebuild), scale the shards 2 -> 3 replicas: every answer is
    still v1's, exactly. Then roll the app to v2: no request fails and every answer is wholly v1's or v2's. v2 has no
    calibration.json: its hits carry expected_utility null and min_expected_utility is a 422 naming the file."""
    import ray
    from ray import serve

    from uae_ray.serve.app import build_app

    v1 = current_version(run, INDEX)
    with _Load(dict(client.headers)) as load:
        time.sleep(1.0)
        v2 = _publish(run, "v2")  # rebuilt in place: CURRENT -> v2, corpus.parquet now holds v2's passages
        assert current_version(run, INDEX) == v2 != v1
        ray.kill(ray.get_actor(_replicas("ShardGroup0")[0], namespace="serve"), no_restart=True)
        time.sleep(2.0)
        _wait_running("ShardGroup0", 2)
        scaled = build_app(_args(run, index_version=v1, shard_replicas=3))  # same version, more replicas
        serve.run(scaled, logging_config={"enable_access_log": False})
        _wait_running("ShardGroup0", 3)
        time.sleep(1.0)
        pinned = list(load.answers)
        print(f"rebuild in place + restart + scale: outcomes {dict(load.outcomes)}")
        assert _check_answers(run, pinned).keys() == {v1} and len(pinned) > 20
        # now roll the app to the new version (what CURRENT names) while requests keep flowing
        serve.run(build_app(_args(run)), logging_config={"enable_access_log": False})
        time.sleep(2.0)
    after = client.get("/healthz").json()
    versions = _check_answers(run, load.answers)
    print(f"rollout v1 -> v2: outcomes {dict(load.outcomes)}, versions {dict(versions)}")
    assert after["version"] == v2 and set(versions) == {v1, v2}
    assert set(load.outcomes) == {"ok"}, f"failed requests: {dict(load.outcomes)}"
    hits = client.post("/search", json={"query": "tallest mountain", "k": 3}).json()["results"][0]["hits"]
    assert all(h["pid"].startswith("v2-") and "[v2" in h["text"] for h in hits)
    assert [h["expected_utility"] for h in hits] == [None] * 3  # v2 has no calibration.json
    r = client.post("/search", json={"query": "tallest mountain", "k": 3, "min_expected_utility": 0.5})
    assert r.status_code == 422 and "min_expected_utility" in r.json()["detail"] and CALIBRATION_FILE in r.text, r.text


@pytest.mark.slow
def test_a_request_over_request_timeout_s_gets_504(client, run):
    from ray import serve

    from uae_ray.serve.app import build_app

    serve.run(build_app(_args(run, request_timeout_s=0.001)), logging_config={"enable_access_log": False})
    r = client.post("/search", json={"queries": [f"question {i} about oceans" for i in range(8)], "k": 5})
    assert r.status_code == 504 and "longer than 0.001 s" in r.json()["detail"], r.text
    assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------ fail-closed start-up
def test_an_empty_token_is_a_startup_error(tmp_path, monkeypatch):
    from uae_ray.serve.app import build_app
    from uae_ray.serve.guard import token_sha256_from_env

    monkeypatch.setenv(TOKEN_ENV, "")
    with pytest.raises(ValueError, match="set but empty"):
        build_app(_args(RunDir(tmp_path)))
    monkeypatch.setenv(TOKEN_ENV, "   ")
    with pytest.raises(ValueError, match="set but empty"):
        token_sha256_from_env(TOKEN_ENV)  # what every ingress replica runs on its own environment too


def test_a_non_loopback_host_without_token_refuses_to_start_unless_allowed(run, monkeypatch, caplog):
    import logging

    from uae_ray.serve.app import build_app

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="without a bearer token"):
        build_app(_args(run, host="0.0.0.0"))
    with caplog.at_level(logging.WARNING, logger="uae_ray.serve"):
        assert build_app(_args(run, host="0.0.0.0", allow_unauthenticated=True)) is not None
    assert "allow_unauthenticated" in caplog.text and "ANYONE" in caplog.text
    assert build_app(_args(run, host="127.0.0.1")) is not None  # loopback, no token: loopback clients only


def test_without_a_token_only_loopback_clients_are_answered():
    from fastapi import HTTPException

    from uae_ray.serve.guard import Guard

    guard = Guard(None, allow_unauthenticated=False)
    guard.authorize("127.0.0.1", None)
    with pytest.raises(HTTPException) as e:
        guard.authorize("10.1.2.3", None)
    assert e.value.status_code == 403
    Guard(None, allow_unauthenticated=True).authorize("10.1.2.3", None)


# ------------------------------------------------------------------------------------------------- uae-ray serve
@pytest.mark.slow
def test_uae_ray_serve_with_defaults_starts_on_one_cpu_from_another_dir_and_answers(tmp_path):
    """`uae-ray serve` as the README runs it, from another directory (the app comes from the package, no sys.path
    insert), on a 1-CPU local cluster: its default replicas (ingress 1 + shard group 0.5 CPUs) would wait forever for
    1.5 CPUs; they are fitted to the cluster. The query encoder runs through ONNX Runtime here (``encoder_backend``;
    the module's app above uses torch), and its answers are the torch app's."""
    rd = RunDir(tmp_path / "cli")
    version = _publish(rd, "cli")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("UAE_RAY_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        cli = Path(sys.executable).with_name("uae-ray")  # the console script, as the README runs it
        proc = subprocess.Popen(
            [str(cli), "serve", "--run-dir", rd.uri, "--num-cpus", "1", "--set", f"port={port}",
             "--set", "encoder_backend=onnx"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )
    try:
        deadline = time.time() + 240
        health = None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
                break
            except (httpx.HTTPError, ValueError):
                time.sleep(2)
        assert health is not None and health["status"] == "ok", log_path.read_text()[-3000:]
        assert health["version"] == version  # no token configured: loopback clients are answered (and only they)
        r = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": "What is the tallest mountain?", "k": 2},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert all("Everest" in h["text"] for h in r.json()["results"][0]["hits"])
        assert "scaled by" in log_path.read_text()  # the fitted CPU requests are logged
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_replica_cpu_requests_are_fitted_to_the_cluster():
    from uae_ray.config import ServeConfig
    from uae_ray.stages.serve import DEFAULT_CPUS, fit_cpus

    assert fit_cpus(ServeConfig(), 2.0) == DEFAULT_CPUS  # room: the defaults (1 + 0.5) as they are
    fitted = fit_cpus(ServeConfig(shard_replicas=3), 2.0)  # 1 + 3 x 0.5 = 2.5 > 2
    assert 3 * fitted["shard_num_cpus"] + fitted["ingress_num_cpus"] <= 2.0
    assert fitted["shard_num_cpus"] > 0.39
    three = fit_cpus(ServeConfig(shard_replicas=3, encoder_replicas=2), 2.0)
    assert 2 * three["ingress_num_cpus"] + 3 * three["shard_num_cpus"] <= 2.0
    with pytest.raises(ValueError, match="no CPUs"):
        fit_cpus(ServeConfig(), 0.0)


def test_a_replica_that_did_not_load_the_pinned_version_fails_its_health_check(tmp_path):
    """A version directory restored under another version's name: build_app refuses it, and a replica pinned to
    that name loads it but reports unhealthy (Serve then replaces it) instead of serving another version's ids."""
    import asyncio
    import shutil

    import faiss

    from uae_ray.index.versions import CURRENT, new_version
    from uae_ray.serve.app import ShardGroup, build_app

    rd = RunDir(tmp_path / "run")
    x = np.random.default_rng(0).standard_normal((20, 384)).astype(np.float32)
    faiss.normalize_L2(x)
    pids = [f"p{i}" for i in range(20)]

    def build(out, version):
        return build_sharded_index(x, pids, "Flat", 2, out, encoder="all-minilm-l6-v2", extra={"version": version},
                                   passages=pa.table({"doc_id": ["d"] * 20, "text": [f"t{i}" for i in range(20)]}))

    good = publish(rd, INDEX, {"n": 20}, build)[0]
    group = ShardGroup.func_or_class(rd.uri, INDEX, good, [0, 1], True)  # the class itself, no Ray needed
    group.check_health()
    answer = asyncio.run(group.search(x[[2, 15]], 2))
    assert answer.version == good and answer.ids[:, 0].tolist() == [2, 15]  # each query's own vector, either shard
    assert answer.meta[15][:3] == ("p15", "d", "t15") and answer.expected_utility is None  # no calibration.json
    other = new_version({"n": 21})
    shutil.copytree(rd.local_path(INDEX) / good, rd.local_path(INDEX) / other)
    rd.write_json(f"{INDEX}/{CURRENT}", {"version": other})
    with pytest.raises(ValueError, match="names version"):
        build_app({"run_dir": rd.uri})
    wrong = ShardGroup.func_or_class(rd.uri, INDEX, other, [0], True)
    with pytest.raises(RuntimeError, match="loaded index version"):
        wrong.check_health()


def test_the_app_ships_in_the_wheel_and_imports_from_an_installed_copy(tmp_path):
    """`pip wheel .` holds uae_ray/serve/*.py (and the .proto); installed outside the checkout, uae_ray.serve.app:
    build_app imports from there (no sys.path insert, no serve/ folder)."""
    import zipfile

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("uae_ray-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "app", "api", "guard", "grpc_api"):
        assert f"uae_ray/serve/{module}.py" in names, sorted(n for n in names if "serve" in n)
    assert "uae_ray/serve/retrieval.proto" in names and not any(n.startswith("serve/") for n in names)
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    probe = ("import uae_ray.serve.app as a, uae_ray.stages.serve as s; "
             "print(a.__file__); print(callable(a.build_app), a.GRPC_SERVICER)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout.split("\n")
    assert out[0].startswith(str(target)), out
    assert out[1] == "True uae_ray.serve.grpc_api.add_RetrievalServicer_to_server", out
