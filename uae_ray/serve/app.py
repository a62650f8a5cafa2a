"""The retrieval service: ``QueryEncoder`` -> ``IndexShard`` x S -> ``Retriever`` (FastAPI ingress).

    serve run serve.app:build_app run_dir=runs/demo          # or: uae-ray serve --run-dir runs/demo
    serve deploy serve/config.yaml                            # autoscaling settings live there

One index version per app: :func:`build_app` pins ``index_version`` (default: what ``index/CURRENT`` names then) and
every replica loads ``index/<version>/`` only, so a rebuilt index, a restarted or an autoscaled replica never brings
another version into the app. Each replica fails its health check unless it loaded the pinned version.

- ``QueryEncoder`` batches single queries with ``@serve.batch``; batch size and wait come from ``user_config``
  (changed live through ``reconfigure``, no restart). Each vector comes back with the version it was made for.
- ``IndexShard{s}`` (one deployment per shard, ``shard_replicas`` each) memory-maps its FAISS shard and returns its
  hits with their pid/doc_id/text (from the version's ``passages.parquet``) and its version.
- ``Retriever`` authorizes (bearer token), reads the body with a size limit while it streams in, validates (4xx with
  a message on anything bad), encodes, fans out to every shard through handles and merges the top k exactly
  (:func:`uae_ray.index.search.merge_topk`) only when the encoder and every shard answered for one version. During a
  rollout, handles can reach replicas of two versions: the request is retried until one version answers it whole
  (or a 503 after ``version_wait_s``). A call whose replica died is retried; a request over ``request_timeout_s``
  gets a 504.
"""

import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from serve.api import AppArgs, QueryResult, RetrieverSettings, SearchRequest, SearchResponse, VectorSearchRequest
from serve.guard import Guard, is_loopback, token_sha256_from_env
from uae_ray.config import ConfigError
from uae_ray.data.schema import CORPUS

log = logging.getLogger("uae_ray.serve")
ENCODER_DEPLOYMENT = "QueryEncoder"
INGRESS_DEPLOYMENT = "Retriever"


def shard_deployment(shard: int) -> str:
    """Deployment name of shard ``shard``."""
    return f"IndexShard{shard}"


def _load_version(run_dir: str, index: str, version: str) -> tuple[Any, Any, dict[str, Any]]:
    """(RunDir, local dir, manifest) of ``index/<version>``; errors name the directory."""
    from uae_ray.index.search import read_manifest
    from uae_ray.index.versions import fetch_index
    from uae_ray.runtime import RunDir

    rd = RunDir(run_dir)
    _, index_dir = fetch_index(rd, index, version)
    return rd, index_dir, read_manifest(index_dir)


class _Pinned:
    """Replica side of version pinning: remembers what was loaded; ``check_health`` raises on a mismatch."""

    pinned: str
    loaded: str | None

    def check_health(self) -> None:
        if self.loaded != self.pinned:
            raise RuntimeError(f"replica loaded index version {self.loaded!r}, the app pins {self.pinned!r}")


# --------------------------------------------------------------------------------------------------- QueryEncoder
@serve.deployment(name=ENCODER_DEPLOYMENT, max_ongoing_requests=256)
class QueryEncoder(_Pinned):
    """Encodes one query string per call; concurrent calls are batched into one forward pass."""

    def __init__(self, run_dir: str, encoder: str, index: str, version: str, max_query_tokens: int) -> None:
        from uae_ray.index.source import resolve_encoder
        from uae_ray.models.encoder import load_encoder

        rd, _, manifest = _load_version(run_dir, index, version)
        self.pinned, self.loaded = version, manifest.get("version")
        self.model = load_encoder(resolve_encoder(encoder, rd))
        self.max_query_tokens = max_query_tokens
        self.dim = int(self.model.get_embedding_dimension())
        self.batches = 0
        self.queries = 0
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
                "batches": self.batches, "queries": self.queries, "dim": self.dim, "version": self.loaded}

    async def __call__(self, text: str) -> tuple[np.ndarray, str | None]:
        """(unit query vector, the index version this encoder serves)."""
        return await self.encode_batch(text), self.loaded


# ----------------------------------------------------------------------------------------------------- IndexShard
@serve.deployment(max_ongoing_requests=64)
class IndexShard(_Pinned):
    """One FAISS shard of one index version (memory-mapped where the index type allows) plus the pid/doc_id/text of
    its vectors."""

    def __init__(self, run_dir: str, index: str, version: str, shard: int, mmap: bool) -> None:
        import pyarrow.parquet as pq

        from uae_ray.index.build import IDS, PASSAGES
        from uae_ray.index.search import load_shard

        rd, index_dir, manifest = _load_version(run_dir, index, version)
        self.pinned, self.loaded = version, manifest.get("version")
        if not 0 <= shard < manifest["num_shards"]:
            raise ValueError(f"{index_dir}: shard {shard} does not exist ({manifest['num_shards']} shards)")
        self.shard = shard
        self.index = load_shard(index_dir, shard, mmap=mmap, manifest=manifest)
        if (index_dir / PASSAGES).exists():  # the version's own texts
            t = pq.read_table(index_dir / PASSAGES, filters=[("shard", "=", shard)], columns=["id", "pid", "doc_id",
                                                                                            "text"])
            cols = [t.column(c).to_pylist() for c in ("id", "pid", "doc_id", "text")]
            self.meta = {int(i): (p, d, x) for i, p, d, x in zip(*cols, strict=True)}
        else:  # an index built without passages: texts from the run dir's corpus
            ids = pq.read_table(index_dir / IDS, filters=[("shard", "=", shard)], columns=["id", "pid"])
            self.meta = _meta_from_corpus(rd, ids)
        if len(self.meta) != self.index.ntotal:
            raise ValueError(f"{index_dir}: shard {shard}: {self.index.ntotal} vectors but {len(self.meta)} ids")

    def stats(self) -> dict[str, Any]:
        """Shard size, version and this replica's memory (RSS, and USS: pages only this process holds; mapped files
        are shared through the page cache and count in RSS only once they are touched)."""
        import psutil

        mem = psutil.Process().memory_full_info()
        return {"shard": self.shard, "ntotal": int(self.index.ntotal), "version": self.loaded,
                "rss_mb": mem.rss / 2**20, "uss_mb": mem.uss / 2**20}

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict[int, tuple], str | None]:
        """(scores [n, k'], global ids [n, k'], {id: (pid, doc_id, text)} of the returned ids, version),
        k' = min(k, size)."""
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, int(self.index.ntotal)))
        return scores, ids, {int(i): self.meta[int(i)] for i in np.unique(ids) if i >= 0}, self.loaded


def _meta_from_corpus(rd: Any, ids: Any) -> dict[int, tuple[str, str | None, str | None]]:
    import pyarrow.compute as pc

    meta: dict[str, tuple[str | None, str | None]] = {}
    if rd.exists(CORPUS):
        corpus = rd.read_table(CORPUS, columns=["pid", "doc_id", "text"])
        corpus = corpus.filter(pc.is_in(corpus.column("pid"), value_set=ids.column("pid")))
        cols = [corpus.column(c).to_pylist() for c in ("pid", "doc_id", "text")]
        meta = {p: (d, t) for p, d, t in zip(*cols, strict=True)}
    return {int(i): (p, *meta.get(p, (None, None)))
            for i, p in zip(ids.column("id").to_pylist(), ids.column("pid").to_pylist(), strict=True)}


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


class VersionConflict(Exception):
    """The encoder and the shards did not all answer for one index version (a rollout is under way)."""


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress(api)
class Retriever:
    """HTTP ingress: authorize, validate, encode, fan out to every shard, merge the exact top k of one version."""

    def __init__(self, encoder: DeploymentHandle, shards: list[DeploymentHandle], settings: RetrieverSettings) -> None:
        self.encoder = encoder
        self.shards = shards
        self.settings = settings
        # the replica's own environment wins (a Secret on the serving nodes); set but empty is an error, not "open"
        sha = token_sha256_from_env(settings.token_env) or settings.token_sha256
        self.guard = Guard(sha, settings.max_body_bytes, allow_unauthenticated=settings.allow_unauthenticated)
        self.retried = 0
        self.version_conflicts = 0

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.settings.max_k:
            raise HTTPException(422, f"k: must be between 1 and {self.settings.max_k}, got {k}")

    def _parse(self, model: type, body: bytes) -> Any:
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise HTTPException(422, _validation_message(e)) from e

    async def _timed(self, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=self.settings.request_timeout_s)
        except TimeoutError as e:
            raise HTTPException(504, f"request took longer than {self.settings.request_timeout_s} s") from e

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

    async def _once(self, texts: list[str] | None, vectors: np.ndarray | None, k: int) -> tuple[str, list, float]:
        """One pass: encode (if texts), search every shard, merge; raises VersionConflict on mixed versions.
        Returns (version, results, encode ms)."""
        from uae_ray.index.search import merge_topk

        t0 = time.perf_counter()
        if texts is not None:
            encoded = await asyncio.gather(*[self._call("encoder", self.encoder, t) for t in texts])
            versions = {v for _, v in encoded}
            if len(versions) != 1:
                raise VersionConflict(f"encoder replicas of versions {sorted(map(str, versions))}")
            version = versions.pop()
            vectors = np.stack([vec for vec, _ in encoded])
        else:
            version = self.settings.version  # client vectors are for the pinned version's encoder and dimension
        encode_ms = (time.perf_counter() - t0) * 1e3
        parts = await asyncio.gather(
            *[self._call(f"shard {s}", h.search, vectors, k) for s, h in enumerate(self.shards)]
        )
        if {p[3] for p in parts} != {version}:  # never merge hits of two versions: their ids mean other passages
            raise VersionConflict(f"version {version} wanted, shards answered {[p[3] for p in parts]}")
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
            results.append(QueryResult(query=texts[row] if texts else None, hits=hits))
        return str(version), results, encode_ms

    async def _search(self, texts: list[str] | None, vectors: np.ndarray | None, k: int) -> tuple[str, list, float]:
        """:meth:`_once`, retried while replicas of two versions answer (a rollout), for ``version_wait_s``."""
        deadline = time.monotonic() + self.settings.version_wait_s
        attempt = 0
        while True:
            try:
                return await self._once(texts, vectors, k)
            except VersionConflict as e:
                self.version_conflicts += 1
                if time.monotonic() >= deadline:
                    raise HTTPException(503, f"index version changing under this request ({e}); retry") from e
                attempt += 1
                await asyncio.sleep(min(0.02 * 2**attempt, 0.5))

    # ---- routes
    @api.get("/healthz")
    async def healthz(self, request: Request) -> dict[str, Any]:
        """Liveness and the served index version; with the bearer token also the index summary and counters."""
        status = {"status": "ok", "version": self.settings.version}
        if not self.guard.authorized(request):
            return status
        return {**status, "index": self.settings.index_info, "shards": len(self.shards),
                "retried_calls": self.retried, "version_conflicts": self.version_conflicts}

    @api.post("/search", response_model=SearchResponse, openapi_extra=_request_schema(SearchRequest))
    async def search(self, request: Request) -> SearchResponse:
        """Top ``k`` passages for ``query`` (a string) or ``queries`` (a list of strings)."""
        return await self._timed(self._text_search(request))

    async def _text_search(self, request: Request) -> SearchResponse:
        t0 = time.perf_counter()
        self.guard.authorize(request)
        req: SearchRequest = self._parse(SearchRequest, await self.guard.read_body(request))
        self._check_k(req.k)
        texts = req.texts()
        if not 1 <= len(texts) <= self.settings.max_queries:
            raise HTTPException(422, f"queries: give 1 to {self.settings.max_queries} queries, got {len(texts)}")
        for n, text in enumerate(texts):
            if not text.strip():
                raise HTTPException(422, f"query {n}: empty")
            if len(text) > self.settings.max_query_chars:
                raise HTTPException(422, f"query {n}: longer than {self.settings.max_query_chars} characters")
        version, results, encode_ms = await self._search(texts, None, req.k)
        total = (time.perf_counter() - t0) * 1e3
        return SearchResponse(results=results, k=req.k, version=version,
                              timing_ms={"encode": encode_ms, "search": total - encode_ms, "total": total})

    @api.post("/search/vectors", response_model=SearchResponse, openapi_extra=_request_schema(VectorSearchRequest))
    async def search_vectors(self, request: Request) -> SearchResponse:
        """Top ``k`` for pre-computed unit query vectors of the index dimension (no encoder in the loop)."""
        return await self._timed(self._vector_search(request))

    async def _vector_search(self, request: Request) -> SearchResponse:
        t0 = time.perf_counter()
        self.guard.authorize(request)
        req: VectorSearchRequest = self._parse(VectorSearchRequest, await self.guard.read_body(request))
        self._check_k(req.k)
        dim = int(self.settings.index_info["dim"])
        if not 1 <= len(req.vectors) <= self.settings.max_queries:
            raise HTTPException(422, f"vectors: give 1 to {self.settings.max_queries} vectors, got {len(req.vectors)}")
        if any(len(v) != dim for v in req.vectors):
            raise HTTPException(422, f"vectors: every vector must have {dim} numbers")
        version, results, _ = await self._search(None, req.array(), req.k)
        total = (time.perf_counter() - t0) * 1e3
        return SearchResponse(results=results, k=req.k, version=version,
                              timing_ms={"encode": 0.0, "search": total, "total": total})


# ------------------------------------------------------------------------------------------------------ build_app
def check_auth(host: str, token_env: str, allow_unauthenticated: bool) -> str | None:
    """Fail closed, before anything starts: the sha256 of the bearer token in ``token_env`` (None: no token).

    Raises:
        ConfigError: the variable is set but empty, or ``host`` is not loopback and there is no token while
            ``allow_unauthenticated`` is off.
    """
    token_sha256 = token_sha256_from_env(token_env)
    if token_sha256 is not None:
        return token_sha256
    if not allow_unauthenticated:
        if not is_loopback(host):
            raise ConfigError(f"refusing to serve on host {host!r} without a bearer token: set the {token_env} "
                              "environment variable (or token_env), or set allow_unauthenticated: true")
        log.info("serve: no %s set: only loopback clients are served", token_env)
        return None
    log.warning("serve: " + "!" * 20 + " allow_unauthenticated: true: ANYONE who reaches %s can search this index "
                "(no %s set) " + "!" * 20, host, token_env)
    return None


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The Serve application for ``args`` (a dict from ``serve run``/``serve deploy``, or :class:`AppArgs`).

    Pins the index version (``args.index_version`` or what ``index/CURRENT`` names now) into every deployment."""
    from uae_ray.index.versions import current_version

    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    token_sha256 = check_auth(a.host, a.token_env, a.allow_unauthenticated)
    from uae_ray.runtime import RunDir

    version = a.index_version or current_version(RunDir(a.run_dir), a.index)
    _, _, manifest = _load_version(a.run_dir, a.index, version)
    if manifest.get("version") != version:
        raise ValueError(f"index/{version}/manifest.json names version {manifest.get('version')!r}")
    encoder = a.encoder or manifest.get("encoder") or ""
    if not encoder:
        raise ValueError(f"index/{version}/manifest.json: no encoder recorded; pass encoder=...")
    pin = {"resources": {a.node_resource: 0.001}} if a.node_resource else {}
    # a rollout (new index or encoder) starts the new replicas first and lets the old ones drain
    rollout = {"max_surge_percent": a.max_surge_percent, "graceful_shutdown_timeout_s": a.graceful_shutdown_timeout_s}
    settings = RetrieverSettings(
        max_k=a.max_k, max_queries=a.max_queries, max_query_chars=a.max_query_chars, max_body_bytes=a.max_body_bytes,
        token_env=a.token_env, token_sha256=token_sha256, allow_unauthenticated=a.allow_unauthenticated,
        request_timeout_s=a.request_timeout_s, version_wait_s=a.version_wait_s, retries=a.retries, version=version,
        index_info={k: manifest.get(k) for k in ("version", "encoder", "dim", "factory", "num_shards", "vectors",
                                                 "created_at")},
    )
    log.info("serve: pinned index version %s (%s vectors, %s shards)", version, manifest.get("vectors"),
             manifest.get("num_shards"))
    encoder_app = QueryEncoder.options(
        num_replicas=a.encoder_replicas, ray_actor_options={"num_cpus": a.encoder_num_cpus, **pin}, **rollout,
        user_config={"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s},
    ).bind(a.run_dir, encoder, a.index, version, a.max_query_tokens)
    shards = [
        IndexShard.options(
            name=shard_deployment(s), num_replicas=a.shard_replicas,
            ray_actor_options={"num_cpus": a.shard_num_cpus, **pin}, **rollout,
        ).bind(a.run_dir, a.index, version, s, a.mmap)
        for s in range(int(manifest["num_shards"]))
    ]
    return Retriever.options(
        num_replicas=a.ingress_replicas, ray_actor_options={"num_cpus": a.ingress_num_cpus, **pin}, **rollout,
    ).bind(encoder_app, shards, settings)

