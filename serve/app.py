"""The retrieval service: ``QueryEncoder`` -> ``IndexShard`` x S -> ``Retriever`` (FastAPI ingress).

    serve run serve.app:build_app run_dir=runs/demo          # or: uae-ray serve --run-dir runs/demo
    serve deploy serve/config.yaml                            # autoscaling settings live there

- ``QueryEncoder`` batches single queries with ``@serve.batch``; batch size and wait come from ``user_config``
  (changed live through ``reconfigure``, no restart).
- ``IndexShard{s}`` (one deployment per shard, ``shard_replicas`` each) memory-maps its FAISS shard and returns its
  own hits with their pid/doc_id/text, so a merged answer is consistent even while shards roll to a new version.
- ``Retriever`` validates the request (4xx with a message on anything bad), encodes, fans out to every shard through
  handles, merges the top k exactly (:func:`uae_ray.index.search.merge_topk`) and retries a call whose replica died.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from serve.api import AppArgs, QueryResult, RetrieverSettings, SearchRequest, SearchResponse, VectorSearchRequest
from uae_ray.data.schema import CORPUS

log = logging.getLogger("uae_ray.serve")
ENCODER_DEPLOYMENT = "QueryEncoder"
INGRESS_DEPLOYMENT = "Retriever"


def shard_deployment(shard: int) -> str:
    """Deployment name of shard ``shard``."""
    return f"IndexShard{shard}"


# --------------------------------------------------------------------------------------------------- QueryEncoder
@serve.deployment(name=ENCODER_DEPLOYMENT, max_ongoing_requests=256)
class QueryEncoder:
    """Encodes one query string per call; concurrent calls are batched into one forward pass."""

    def __init__(self, run_dir: str, encoder: str, index: str, max_query_tokens: int) -> None:
        from uae_ray.index.search import read_manifest
        from uae_ray.index.source import resolve_encoder
        from uae_ray.models.encoder import load_encoder
        from uae_ray.runtime import RunDir

        rd = RunDir(run_dir)
        self.model = load_encoder(resolve_encoder(encoder, rd))
        self.max_query_tokens = max_query_tokens
        self.dim = int(self.model.get_embedding_dimension())
        self.batches = 0
        self.queries = 0
        manifest = read_manifest(rd.fetch_dir(index))
        if manifest["dim"] != self.dim:
            raise ValueError(f"encoder {encoder!r} gives {self.dim}-d vectors, the index holds {manifest['dim']}-d")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings: ``max_batch_size`` and ``batch_wait_timeout_s`` of the batching queue."""
        self.encode_batch.set_max_batch_size(int(user_config.get("max_batch_size", 32)))
        self.encode_batch.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        from uae_ray.models.encoder import encode

        vectors = encode(self.model, texts, batch_size=len(texts), max_length=self.max_query_tokens)
        self.batches += 1
        self.queries += len(texts)
        return list(vectors)

    def stats(self) -> dict[str, Any]:
        """Live batching settings and the batches formed so far."""
        return {"max_batch_size": self.encode_batch._get_max_batch_size(),
                "batch_wait_timeout_s": self.encode_batch._get_batch_wait_timeout_s(),
                "batches": self.batches, "queries": self.queries, "dim": self.dim}

    async def __call__(self, text: str) -> np.ndarray:
        return await self.encode_batch(text)


# ----------------------------------------------------------------------------------------------------- IndexShard
@serve.deployment(max_ongoing_requests=64)
class IndexShard:
    """One FAISS shard (memory-mapped where the index type allows) plus the pid/doc_id/text of its vectors."""

    def __init__(self, run_dir: str, index: str, shard: int, mmap: bool) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from uae_ray.index.build import IDS
        from uae_ray.index.search import load_shard, read_manifest
        from uae_ray.runtime import RunDir

        rd = RunDir(run_dir)
        index_dir = rd.fetch_dir(index)
        manifest = read_manifest(index_dir)
        if not 0 <= shard < manifest["num_shards"]:
            raise ValueError(f"{index_dir}: shard {shard} does not exist ({manifest['num_shards']} shards)")
        self.shard = shard
        self.index = load_shard(index_dir, shard, mmap=mmap, manifest=manifest)
        ids = pq.read_table(index_dir / IDS, filters=[("shard", "=", shard)], columns=["id", "pid"])
        meta: dict[str, tuple[str | None, str | None]] = {}
        if rd.exists(CORPUS):
            corpus = rd.read_table(CORPUS, columns=["pid", "doc_id", "text"])
            corpus = corpus.filter(pc.is_in(corpus.column("pid"), value_set=ids.column("pid")))
            cols = [corpus.column(c).to_pylist() for c in ("pid", "doc_id", "text")]
            meta = {p: (d, t) for p, d, t in zip(*cols, strict=True)}
        self.meta: dict[int, tuple[str, str | None, str | None]] = {
            int(i): (p, *meta.get(p, (None, None)))
            for i, p in zip(ids.column("id").to_pylist(), ids.column("pid").to_pylist(), strict=True)
        }
        if len(self.meta) != self.index.ntotal:
            raise ValueError(f"{index_dir}: shard {shard}: {self.index.ntotal} vectors but {len(self.meta)} ids")

    def stats(self) -> dict[str, Any]:
        """Shard size and this replica's memory (RSS, and USS: pages only this process holds; mapped files are
        shared through the page cache and count in RSS only once they are touched)."""
        import psutil

        mem = psutil.Process().memory_full_info()
        return {"shard": self.shard, "ntotal": int(self.index.ntotal), "rss_mb": mem.rss / 2**20,
                "uss_mb": mem.uss / 2**20}

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict[int, tuple]]:
        """(scores [n, k'], global ids [n, k'], {id: (pid, doc_id, text)} of the returned ids), k' = min(k, size)."""
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, int(self.index.ntotal)))
        return scores, ids, {int(i): self.meta[int(i)] for i in np.unique(ids) if i >= 0}


# ------------------------------------------------------------------------------------------------------ Retriever
api = FastAPI(
    title="uae-ray retrieval",
    description="Dense retrieval over a sharded FAISS index with a utility-aligned query encoder.",
    version="1",
)


def _request_schema(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress(api)
class Retriever:
    """HTTP ingress: validate, encode, fan out to every shard, merge the exact top k."""

    def __init__(self, encoder: DeploymentHandle, shards: list[DeploymentHandle], settings: RetrieverSettings) -> None:
        self.encoder = encoder
        self.shards = shards
        self.settings = settings
        env_token = os.environ.get(settings.token_env)
        self.token_sha256 = hashlib.sha256(env_token.encode()).hexdigest() if env_token else settings.token_sha256
        self.retried = 0

    # ---- request checks
    def _authorize(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token_sha256):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise HTTPException(413, f"request body larger than {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
        return body

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.settings.max_k:
            raise HTTPException(422, f"k: must be between 1 and {self.settings.max_k}, got {k}")

    def _parse(self, model: type, body: bytes) -> Any:
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise HTTPException(422, _validation_message(e)) from e

    # ---- backend calls with retry on dead replicas
    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        last: Exception | None = None
        for attempt in range(self.settings.retries + 1):
            try:
                return await fn.remote(*args)
            except RayActorError as e:  # the replica died under this request; the router picks a live one
                last = e
                self.retried += 1
                await asyncio.sleep(0.1 * (attempt + 1))
        raise HTTPException(503, f"{what} unavailable after {self.settings.retries + 1} tries: {type(last).__name__}")

    async def _search(self, vectors: np.ndarray, k: int, queries: list[str] | None) -> list[QueryResult]:
        from uae_ray.index.search import merge_topk

        parts = await asyncio.gather(
            *[self._call(f"shard {s}", h.search, vectors, k) for s, h in enumerate(self.shards)]
        )
        scores, ids = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
        meta: dict[int, tuple] = {}
        for p in parts:
            meta.update(p[2])
        results = []
        for row in range(len(vectors)):
            hits = [
                {"rank": r + 1, "pid": meta[i][0], "doc_id": meta[i][1], "score": float(s), "text": meta[i][2]}
                for r, (s, i) in enumerate(zip(scores[row].tolist(), ids[row].tolist(), strict=True))
                if i >= 0
            ]
            results.append(QueryResult(query=queries[row] if queries else None, hits=hits))
        return results

    # ---- routes
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness plus what is being served (index manifest summary, version)."""
        return {"status": "ok", "version": self.settings.version, "index": self.settings.index_info,
                "shards": len(self.shards), "retried_calls": self.retried}

    @api.post("/search", response_model=SearchResponse, openapi_extra=_request_schema(SearchRequest))
    async def search(self, request: Request) -> SearchResponse:
        """Top ``k`` passages for ``query`` (a string) or ``queries`` (a list of strings)."""
        t0 = time.perf_counter()
        self._authorize(request)
        req: SearchRequest = self._parse(SearchRequest, await self._body(request))
        self._check_k(req.k)
        texts = req.texts()
        if not 1 <= len(texts) <= self.settings.max_queries:
            raise HTTPException(422, f"queries: give 1 to {self.settings.max_queries} queries, got {len(texts)}")
        for n, text in enumerate(texts):
            if not text.strip():
                raise HTTPException(422, f"query {n}: empty")
            if len(text) > self.settings.max_query_chars:
                raise HTTPException(422, f"query {n}: longer than {self.settings.max_query_chars} characters")
        vectors = np.stack(await asyncio.gather(*[self._call("encoder", self.encoder, t) for t in texts]))
        t1 = time.perf_counter()
        results = await self._search(vectors, req.k, texts)
        t2 = time.perf_counter()
        timing = {"encode": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
        return SearchResponse(results=results, k=req.k, version=self.settings.version, timing_ms=timing)

    @api.post("/search/vectors", response_model=SearchResponse, openapi_extra=_request_schema(VectorSearchRequest))
    async def search_vectors(self, request: Request) -> SearchResponse:
        """Top ``k`` for pre-computed unit query vectors of the index dimension (no encoder in the loop)."""
        t0 = time.perf_counter()
        self._authorize(request)
        req: VectorSearchRequest = self._parse(VectorSearchRequest, await self._body(request))
        self._check_k(req.k)
        dim = int(self.settings.index_info["dim"])
        if not 1 <= len(req.vectors) <= self.settings.max_queries:
            raise HTTPException(422, f"vectors: give 1 to {self.settings.max_queries} vectors, got {len(req.vectors)}")
        if any(len(v) != dim for v in req.vectors):
            raise HTTPException(422, f"vectors: every vector must have {dim} numbers")
        vectors = np.asarray(req.vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise HTTPException(422, "vectors: NaN or infinite values")
        results = await self._search(vectors, req.k, None)
        total = (time.perf_counter() - t0) * 1e3
        return SearchResponse(results=results, k=req.k, version=self.settings.version,
                              timing_ms={"encode": 0.0, "search": total, "total": total})


# ------------------------------------------------------------------------------------------------------ build_app
def _version(args: AppArgs, manifest_text: str, encoder: str) -> str:
    """A label of what is served (index files, encoder), reported by /healthz and every response.

    Serve 2.60 versions deployments itself: every ``serve.run`` of a rebuilt app rolls all replicas (new ones start,
    old ones drain), and ``serve deploy`` rebuilds the app when its args change."""
    if args.version:
        return args.version
    key = json.dumps({"manifest": manifest_text, "encoder": encoder, "run_dir": args.run_dir, "index": args.index,
                      "mmap": args.mmap, "max_query_tokens": args.max_query_tokens}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The Serve application for ``args`` (a dict from ``serve run``/``serve deploy``, or :class:`AppArgs`)."""
    from uae_ray.index.build import MANIFEST
    from uae_ray.runtime import RunDir

    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    rd = RunDir(a.run_dir)
    manifest_name = f"{a.index}/{MANIFEST}"
    if not rd.dir_complete(a.index):
        raise FileNotFoundError(f"{rd.path(a.index)}: no complete index (run `uae-ray index` first)")
    manifest_text = rd.read_text(manifest_name)
    manifest = json.loads(manifest_text)
    encoder = a.encoder or manifest.get("encoder") or ""
    if not encoder:
        raise ValueError(f"{rd.path(manifest_name)}: no encoder recorded; pass encoder=...")
    version = _version(a, manifest_text, encoder)
    pin = {"resources": {a.node_resource: 0.001}} if a.node_resource else {}
    # a rollout (new index or encoder) starts the new replicas first and lets the old ones drain: no dropped request
    rollout = {"max_surge_percent": a.max_surge_percent, "graceful_shutdown_timeout_s": a.graceful_shutdown_timeout_s}
    token = os.environ.get(a.token_env)
    settings = RetrieverSettings(
        max_k=a.max_k, max_queries=a.max_queries, max_query_chars=a.max_query_chars, max_body_bytes=a.max_body_bytes,
        token_env=a.token_env, token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,
        retries=a.retries, version=version,
        index_info={k: manifest.get(k) for k in ("encoder", "dim", "factory", "num_shards", "vectors", "created_at")},
    )
    encoder_app = QueryEncoder.options(
        num_replicas=a.encoder_replicas, ray_actor_options={"num_cpus": a.encoder_num_cpus, **pin}, **rollout,
        user_config={"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s},
    ).bind(a.run_dir, encoder, a.index, a.max_query_tokens)
    shards = [
        IndexShard.options(
            name=shard_deployment(s), num_replicas=a.shard_replicas,
            ray_actor_options={"num_cpus": a.shard_num_cpus, **pin}, **rollout,
        ).bind(a.run_dir, a.index, s, a.mmap)
        for s in range(int(manifest["num_shards"]))
    ]
    return Retriever.options(
        num_replicas=a.ingress_replicas, ray_actor_options={"num_cpus": a.ingress_num_cpus, **pin}, **rollout,
    ).bind(encoder_app, shards, settings)
