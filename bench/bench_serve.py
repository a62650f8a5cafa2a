"""Benchmark: sharded FAISS in-process vs the Ray Serve retrieval app over HTTP, and ANN recall against Flat.

    .venv/bin/python bench/bench_serve.py --n 1000000 --dim 384 --shards 4 --out bench/results/serve.json

For each factory (Flat, HNSW): build S shards over N random unit vectors, then measure with the same queries
- in-process: ShardedIndex.search of one query at a time (p50/p99, QPS);
- HTTP POST /search/vectors (pre-computed vectors: search + merge + HTTP + Serve, no encoder) one at a time and in a
  concurrency sweep; overhead = HTTP p50 - in-process p50 (like with like);
- HTTP POST /search (text: the MiniLM query encoder in the loop) one at a time and in a concurrency sweep, with the
  server's own split of the time (encode, the shard-group call, the search inside the group); the same text queries
  encoded and searched in this process (one torch thread) as the baseline;
- gRPC uae_ray.Retrieval/Search (text) one at a time and in the sweep, where the app has it (the layout with shard
  groups; the script also runs against the older one-deployment-per-shard app for a before/after in one session);
- memory per shard replica (RSS / USS, shards memory-mapped).
Recall@10 of HNSW (efSearch sweep) and IVF (nprobe sweep) against exact Flat on the same queries, in-process.
Random vectors are the worst case for graph/cluster indexes: recall here is pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from uae_ray.data.schema import INDEX  # noqa: E402
from uae_ray.index.build import build_sharded_index  # noqa: E402
from uae_ray.index.search import ShardedIndex, apply_search_params  # noqa: E402
from uae_ray.index.versions import current_version, has_index, publish, resolve_local  # noqa: E402
from uae_ray.runtime import RunDir  # noqa: E402

URL = "http://127.0.0.1:8000"
GRPC_PORT = 9010
TEXT = "what is the answer to question number {i}?"


def unit_vectors(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def pct(lat_s: list[float]) -> dict[str, float]:
    a = np.asarray(lat_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(a)}


def build(run: RunDir, vectors: np.ndarray, factory: str, shards: int, params: dict[str, int],
          train_sample: int = 100_000) -> dict[str, Any]:
    if has_index(run, INDEX):
        return run.read_json(f"{INDEX}/{current_version(run, INDEX)}/manifest.json")

    def make(out: Path, version: str) -> dict[str, Any]:
        return build_sharded_index(vectors, [f"p{i}" for i in range(len(vectors))], factory, shards, out,
                                   encoder="all-minilm-l6-v2", search_params=params, train_sample=train_sample,
                                   extra={"version": version})

    return publish(run, INDEX, {"factory": factory, "shards": shards, "n": len(vectors)}, make)[1]


def _search_parallel(index: ShardedIndex, pool: Any, q: np.ndarray, k: int) -> None:
    from uae_ray.index.search import merge_topk

    def one(shard: Any) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        faiss.omp_set_num_threads(1)  # per thread: OpenMP settings do not carry over from the main thread
        return shard.search(q, min(k, int(shard.ntotal)))

    parts = list(pool.map(one, index.shards))
    merge_topk([p[0] for p in parts], [p[1] for p in parts], k)


def in_process(index: ShardedIndex, queries: np.ndarray, k: int) -> dict[str, Any]:
    """One query at a time with one FAISS thread per shard search (as in one shard replica), two ways: shards one
    after the other (``serial``), and one Python thread per shard (``parallel``: FAISS releases the GIL), which is
    what the service does with one replica per shard; ``parallel`` is the like-with-like baseline for HTTP."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    out: dict[str, Any] = {"faiss_threads": 1}
    with ThreadPoolExecutor(len(index.shards)) as pool:
        for mode in ("serial", "parallel"):
            lat = []
            t0 = time.perf_counter()
            for q in queries:
                t = time.perf_counter()
                if mode == "serial":
                    index.search_ids(q[None, :], k)
                else:
                    _search_parallel(index, pool, q[None, :], k)
                lat.append(time.perf_counter() - t)
            out[mode] = {**pct(lat), "qps": len(queries) / (time.perf_counter() - t0)}
    faiss.omp_set_num_threads(threads)
    return out


def recall_at(index: ShardedIndex, queries: np.ndarray, truth: np.ndarray, k: int) -> float:
    _, ids = index.search_ids(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), truth.tolist(), strict=True)]))


async def http_sweep(path: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    failures = 0
    server: list[dict[str, float]] = []
    todo = list(enumerate(bodies))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while todo:
            _, body = todo.pop()
            t = time.perf_counter()
            r = await client.post(path, json=body)
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                failures += 1
            else:
                server.append(r.json()["timing_ms"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=URL, timeout=120, limits=limits) as client:
        await client.post(path, json=bodies[0])  # warm
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    out = {**pct(lat), "qps": len(bodies) / wall, "concurrency": concurrency, "failures": failures}
    for key in ("encode", "search", "total", "shard_groups", "shard_search"):
        vals = [s[key] for s in server if key in s]
        out[f"server_{key}_p50_ms"] = float(np.median(vals)) if vals else None
    return out


def grpc_sweep(texts: list[str], k: int, concurrency: int) -> dict[str, Any]:
    """uae_ray.Retrieval/Search over gRPC on 127.0.0.1, ``concurrency`` client threads (one channel each)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from uae_ray.serve import grpc_api

    todo = list(texts)
    lat: list[float] = []
    server: list[dict[str, float]] = []
    failures = 0

    def worker() -> None:
        nonlocal failures
        with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
            stub = grpc_api.RetrievalStub(channel)
            stub.Search(grpc_api.SearchRequest(query=texts[0], k=k), timeout=120)  # warm (connect)
            while todo:
                text = todo.pop()
                t = time.perf_counter()
                try:
                    reply = stub.Search(grpc_api.SearchRequest(query=text, k=k), timeout=120)
                    lat.append(time.perf_counter() - t)
                    server.append(dict(reply.timing_ms))
                except grpc.RpcError:
                    failures += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: worker(), range(concurrency)))
    wall = time.perf_counter() - t0
    out = {**pct(lat), "qps": len(texts) / wall, "concurrency": concurrency, "failures": failures}
    for key in ("encode", "total", "shard_groups", "shard_search"):
        vals = [s[key] for s in server if key in s]
        out[f"server_{key}_p50_ms"] = float(np.median(vals)) if vals else None
    return out


def in_process_text(index: ShardedIndex, n: int, k: int) -> dict[str, Any]:
    """The text path without Serve: encode one query (MiniLM, one torch thread) and search the shards in this
    process, one query at a time (encode and search timed apart)."""
    import torch

    from uae_ray.models.encoder import encode, load_encoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_encoder("all-minilm-l6-v2")
    encode(model, ["warm up"], max_length=64)
    enc, total = [], []
    for i in range(n):
        t = time.perf_counter()
        q = encode(model, [TEXT.format(i=i)], max_length=64)
        enc.append(time.perf_counter() - t)
        index.search_ids(q, k)
        total.append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    return {"encode": pct(enc), "encode_and_search": pct(total)}


def serve_bench(run: RunDir, queries: np.ndarray, k: int, sweep: list[int], n_http: int, n_sweep: int,
                shard_cpus: float) -> dict[str, Any]:
    from ray import serve

    try:  # the app in the package: ingress with the encoder -> one shard group (this change)
        from uae_ray.serve.app import GRPC_SERVICER, build_app

        layout = "shard_group"
        args = {"ingress_num_cpus": 0.75}  # the ingress runs the encoder: the old encoder's 0.5 + ingress's 0.25
        grpc_options: dict[str, Any] | None = {"port": GRPC_PORT, "grpc_servicer_functions": [GRPC_SERVICER]}
    except ImportError:  # before: serve/app.py, QueryEncoder -> IndexShard x S -> Retriever
        from serve.app import build_app

        layout = "deployment_per_shard"
        args = {"encoder_num_cpus": 0.5, "ingress_num_cpus": 0.25}
        grpc_options = None
    serve.start(http_options={"host": "127.0.0.1", "port": 8000}, grpc_options=grpc_options,
                logging_config={"enable_access_log": False})
    t = time.perf_counter()
    serve.run(build_app({"run_dir": run.uri, "shard_num_cpus": shard_cpus, "max_k": max(k, 100), **args}),
              logging_config={"enable_access_log": False})
    ready_s = time.perf_counter() - t
    vec_bodies = [{"vectors": [q.tolist()], "k": k} for q in queries]
    texts = [TEXT.format(i=i) for i in range(max(n_http, n_sweep))]
    text_bodies = [{"query": text, "k": k} for text in texts]
    out: dict[str, Any] = {"ready_s": ready_s, "layout": layout}
    out["vectors_single"] = asyncio.run(http_sweep("/search/vectors", vec_bodies[:n_http], 1))
    out["text_single"] = asyncio.run(http_sweep("/search", text_bodies[:n_http], 1))
    out["vectors_sweep"] = [asyncio.run(http_sweep("/search/vectors", vec_bodies[:n_sweep], c)) for c in sweep]
    out["text_sweep"] = [asyncio.run(http_sweep("/search", text_bodies[:n_sweep], c)) for c in sweep]
    if grpc_options:
        out["grpc_text_sweep"] = [grpc_sweep(texts[:n_sweep], k, c) for c in sweep]
    if layout == "shard_group":
        out["shard_memory"] = [serve.get_deployment_handle("ShardGroup0", app_name="default").stats.remote().result()]
    else:
        manifest = run.read_json(f"{INDEX}/{current_version(run, INDEX)}/manifest.json")
        out["shard_memory"] = [serve.get_deployment_handle(f"IndexShard{s}", app_name="default").stats.remote()
                               .result() for s in range(manifest["num_shards"])]
    serve.delete("default")
    serve.shutdown()
    return out


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Serve overhead at p50 (HTTP /search/vectors minus in-process search of the same shards) per factory."""
    out: dict[str, Any] = {}
    for name in ("flat", "hnsw"):
        http, local = res.get(f"{name}_http"), res.get(f"{name}_in_process")
        if not http or not local:
            continue
        h = http["vectors_single"]["p50_ms"]
        out[name] = {
            "http_vectors_p50_ms": h,
            "in_process_parallel_p50_ms": local["parallel"]["p50_ms"],
            "in_process_serial_p50_ms": local["serial"]["p50_ms"],
            "overhead_p50_ms": h - local["parallel"]["p50_ms"],
            "overhead_ratio": h / local["parallel"]["p50_ms"],
            "http_text_p50_ms": http["text_single"]["p50_ms"],
            "server_encode_p50_ms": http["text_single"]["server_encode_p50_ms"],
        }
        text_local = res.get(f"{name}_in_process_text")
        if text_local:
            t = text_local["encode_and_search"]["p50_ms"]
            out[name].update({"in_process_text_p50_ms": t, "text_overhead_p50_ms": http["text_single"]["p50_ms"] - t})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hnsw", default="HNSW32")
    p.add_argument("--hnsw-n", type=int, default=None, help="build HNSW over the first N vectors only (time)")
    p.add_argument("--train-sample", type=int, default=100_000, help="IVF quantizer training rows")
    p.add_argument("--ivf", default="IVF1024,Flat")
    p.add_argument("--ef-search", default="32,64,128,256,512")
    p.add_argument("--nprobe", default="8,32,128")
    p.add_argument("--queries", type=int, default=200, help="queries for recall and the fast (HNSW) paths")
    p.add_argument("--flat-queries", type=int, default=40, help="single queries against Flat (slow on 1M)")
    p.add_argument("--sweep", default="1,4,16")
    p.add_argument("--shard-cpus", type=float, default=0.5)
    p.add_argument("--work", default="/tmp/uae_ray_bench_serve")
    p.add_argument("--skip", default="", help="comma list of parts to skip: ivf,hnsw,http")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    res: dict[str, Any] = {"args": vars(a), "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    t = time.perf_counter()
    vectors = unit_vectors(a.n, a.dim, seed=0)
    queries = unit_vectors(a.queries, a.dim, seed=1)
    res["generate_s"] = time.perf_counter() - t
    work = Path(a.work) / f"n{a.n}_d{a.dim}_s{a.shards}"

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")

    # ---- Flat: exact ground truth, in-process, HTTP
    flat_run = RunDir(work / "flat")
    res["flat_build"] = {k: v for k, v in build(flat_run, vectors, "Flat", a.shards, {}).items()
                         if k.endswith("seconds") or k in ("vectors", "num_shards", "factory")}
    flat = ShardedIndex.load(flat_run.local_path(INDEX))
    t = time.perf_counter()
    _, truth = flat.search_ids(queries, a.k)
    res["flat_batch_search_s"] = time.perf_counter() - t
    res["flat_in_process"] = in_process(flat, queries[: a.flat_queries], a.k)
    print("flat in-process", res["flat_in_process"], flush=True)
    if "http" not in skip:
        res["flat_in_process_text"] = in_process_text(flat, a.flat_queries, a.k)
        print("flat in-process text", res["flat_in_process_text"], flush=True)
    save()
    sweep = [int(c) for c in a.sweep.split(",")]
    if "http" not in skip:
        from uae_ray.runtime import init_ray

        init_ray(None, num_cpus=4)
        res["flat_http"] = serve_bench(flat_run, queries[: a.flat_queries], a.k, sweep, a.flat_queries,
                                       a.flat_queries, a.shard_cpus)
        print("flat http", json.dumps(res["flat_http"], indent=1), flush=True)
        save()
    del flat
    # ---- IVF: nprobe sweep (recall + latency in-process)
    if "ivf" not in skip:
        ivf_run = RunDir(work / a.ivf.replace(",", "_"))
        manifest = build(ivf_run, vectors, a.ivf, a.shards, {"nprobe": 8}, a.train_sample)
        res["ivf_build"] = {k: v for k, v in manifest.items() if k.endswith("seconds") or k in ("vectors", "factory")}
        ivf = ShardedIndex.load(ivf_run.local_path(INDEX))
        rows = []
        for nprobe in [int(x) for x in a.nprobe.split(",")]:
            for shard in ivf.shards:
                apply_search_params(shard, {"nprobe": nprobe})
            rows.append({"nprobe": nprobe, "recall@k": recall_at(ivf, queries, truth, a.k),
                         **in_process(ivf, queries, a.k)["serial"]})
            print("ivf", rows[-1], flush=True)
        res["ivf_sweep"] = rows
        save()
    # ---- HNSW: efSearch sweep (recall + latency in-process), HTTP at the chosen efSearch
    if "hnsw" not in skip:
        efs = [int(x) for x in a.ef_search.split(",")]
        hnsw_n = min(a.hnsw_n or a.n, a.n)
        hnsw_truth = truth
        if hnsw_n < a.n:  # exact top k over the same subset
            import faiss

            exact = faiss.IndexFlatIP(a.dim)
            exact.add(vectors[:hnsw_n])
            hnsw_truth = exact.search(queries, a.k)[1]
            del exact
        res["hnsw_vectors"] = hnsw_n
        hnsw_run = RunDir(work / f"{a.hnsw.replace(',', '_')}_n{hnsw_n}")
        manifest = build(hnsw_run, vectors[:hnsw_n], a.hnsw, a.shards, {"efSearch": efs[0]})
        res["hnsw_build"] = {k: v for k, v in manifest.items() if k.endswith("seconds") or k in ("vectors", "factory")}
        print("hnsw build", res["hnsw_build"], flush=True)
        hnsw = ShardedIndex.load(hnsw_run.local_path(INDEX))
        rows = []
        for ef in efs:
            for shard in hnsw.shards:
                apply_search_params(shard, {"efSearch": ef})
            rows.append({"efSearch": ef, "recall@k": recall_at(hnsw, queries, hnsw_truth, a.k),
                         **in_process(hnsw, queries, a.k)["serial"]})
            print("hnsw", rows[-1], flush=True)
        res["hnsw_sweep"] = rows
        good = [r for r in rows if r["recall@k"] >= 0.95]
        chosen = (good[0] if good else rows[-1])["efSearch"]
        res["hnsw_chosen_efSearch"] = chosen
        for shard in hnsw.shards:
            apply_search_params(shard, {"efSearch": chosen})
        res["hnsw_in_process"] = in_process(hnsw, queries, a.k)
        save()
        if "http" not in skip:
            manifest_path = resolve_local(hnsw_run.local_path(INDEX)) / "manifest.json"  # bench scratch only
            m = json.loads(manifest_path.read_text())
            m["search_params"] = {"efSearch": chosen}
            manifest_path.write_text(json.dumps(m, indent=2) + "\n")
            res["hnsw_http"] = serve_bench(hnsw_run, queries, a.k, sweep, min(a.queries, 200), a.queries,
                                           a.shard_cpus)
            print("hnsw http", json.dumps(res["hnsw_http"], indent=1), flush=True)
            save()
        del hnsw
    res["summary"] = summarize(res)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ")
    save()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
