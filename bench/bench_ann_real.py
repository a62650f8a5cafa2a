"""Benchmark: ANN recall@10 on a run's real embeddings (its index vectors, its questions) vs random vectors.

    .venv/bin/python bench/bench_ann_real.py --run-dir runs/qasper --out bench/results/ann_real_qasper.json

The run's index (built by ``uae-ray index``, any factory that stores vectors: Flat) gives the passage vectors, and
the run's questions (every split), encoded with the index's own encoder, are the queries. For HNSW (M sweep x
efSearch sweep) and IVF (nprobe sweep): recall@10 against exact inner-product search over the same vectors, and
single-query latency with one FAISS thread. The same indexes over as many random unit vectors (same dimension,
random queries) are the control: bench_serve.py's 1M random vectors are the worst case for graph and cluster
indexes, and this shows how far real embeddings are from it at the same size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from uae_ray.data.schema import INDEX, QUERIES  # noqa: E402
from uae_ray.index.search import load_shard, read_manifest  # noqa: E402
from uae_ray.runtime import RunDir  # noqa: E402


def index_vectors(index_dir: Path) -> np.ndarray:
    """Every stored vector of a sharded index (float32 [n, d], shard order)."""
    import faiss

    manifest = read_manifest(index_dir)
    parts = []
    for s in range(int(manifest["num_shards"])):
        shard = load_shard(index_dir, s, mmap=False, manifest=manifest)
        inner = faiss.downcast_index(shard.index) if hasattr(shard, "id_map") else shard
        parts.append(inner.reconstruct_n(0, inner.ntotal))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def question_vectors(run_dir: RunDir, encoder_spec: str) -> np.ndarray:
    """The run's questions (every split), encoded with ``encoder_spec`` (unit vectors)."""
    from uae_ray.models.encoder import encode, load_encoder
    from uae_ray.models.registry import resolve_model

    questions = run_dir.read_table(QUERIES, columns=["question"]).column("question").to_pylist()
    model = load_encoder(resolve_model(encoder_spec, run_dir))
    return encode(model, questions, batch_size=64, max_length=64).astype(np.float32)


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top k found in its approximate top k."""
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact, strict=True)]))


def sweep(base: np.ndarray, queries: np.ndarray, k: int, hnsw_ms: list[int], efs: list[int], nlist: int,
          nprobes: list[int]) -> list[dict[str, Any]]:
    """recall@k and single-query ms of HNSW{M} (efSearch sweep) and IVF{nlist},Flat (nprobe sweep) vs exact."""
    import faiss

    faiss.omp_set_num_threads(1)
    d = base.shape[1]
    exact = faiss.IndexFlatIP(d)
    exact.add(base)
    rows: list[dict[str, Any]] = [_measure("Flat (exact)", "-", exact, queries, k, None)]
    truth = rows[0].pop("ids")
    rows[0]["recall@10"] = 1.0
    for m in hnsw_ms:
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.add(base)
        built = time.perf_counter() - t0
        for ef in efs:
            index.hnsw.efSearch = ef
            row = _measure(f"HNSW{m}", f"efSearch {ef}", index, queries, k, truth)
            rows.append({**row, "build_s": round(built, 2)})
    if nlist:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(base)
        index.add(base)
        built = time.perf_counter() - t0
        for nprobe in nprobes:
            index.nprobe = nprobe
            rows.append({**_measure(f"IVF{nlist},Flat", f"nprobe {nprobe}", index, queries, k, truth),
                         "build_s": round(built, 2)})
    return rows


def _measure(name: str, params: str, index: Any, queries: np.ndarray, k: int,
             truth: np.ndarray | None) -> dict[str, Any]:
    _, ids = index.search(queries, k)
    times = []
    for q in queries[: min(len(queries), 200)]:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - t0)
    row: dict[str, Any] = {"index": name, "params": params, "p50_ms": round(1e3 * float(np.median(times)), 3)}
    if truth is None:
        row["ids"] = ids
    else:
        row["recall@10"] = round(recall_at_k(ids, truth), 4)
    return row


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--index", default=INDEX, help="index directory in the run dir")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hnsw-m", default="16,32")
    p.add_argument("--ef-search", default="16,32,64,128,256")
    p.add_argument("--nlist", type=int, default=64)
    p.add_argument("--nprobe", default="1,4,16")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    run_dir = RunDir(args.run_dir)
    index_dir = run_dir.local_path(args.index)
    manifest = read_manifest(index_dir)
    base = index_vectors(index_dir)
    queries = question_vectors(run_dir, manifest["encoder"])
    ms = [int(x) for x in args.hnsw_m.split(",")]
    efs = [int(x) for x in args.ef_search.split(",")]
    nprobes = [int(x) for x in args.nprobe.split(",")]
    result: dict[str, Any] = {"run_dir": str(run_dir.uri), "encoder": manifest["encoder"], "n": len(base),
                              "dim": int(base.shape[1]), "queries": len(queries), "k": args.k, "faiss_threads": 1}
    for data, (b, q) in {"real": (base, queries),
                         "random": (random_unit(len(base), base.shape[1], args.seed),
                                    random_unit(len(queries), base.shape[1], args.seed + 1))}.items():
        result[data] = sweep(b, q, args.k, ms, efs, args.nlist, nprobes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{result['n']} vectors x {result['dim']} ({result['encoder']}), {result['queries']} queries, k={args.k}")
    rows = [{"index": r["index"], "params": r["params"], "real recall@10": r["recall@10"],
             "random recall@10": rr["recall@10"], "real p50 ms": r["p50_ms"], "random p50 ms": rr["p50_ms"]}
            for r, rr in zip(result["real"], result["random"], strict=True)]
    print(_table(rows, list(rows[0])))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
