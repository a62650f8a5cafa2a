"""The retrieval service: ``Retriever`` (FastAPI + gRPC ingress, query encoder inside) -> ``ShardGroup{g}``.

    serve run uae_ray.serve.app:build_app run_dir=runs/demo   # or: uae-ray serve --run-dir runs/demo
    serve run serve.app:build_app run_dir=runs/demo           # the same, from a checkout (serve/app.py re-exports)
    serve deploy serve/config.yaml                            # autoscaling settings live there

One index version per app: :func:`build_app` pins ``index_version`` (default: what ``index/CURRENT`` names then) and
every replica loads ``index/<version>/`` only, so a rebuilt index, a restarted or an autoscaled replica never brings
another version into the app. Each replica fails its health check unless it loaded the pinned version.

Two hops per request (proxy -> ingress -> shard group), not 2 + 1 + S:
- ``Retriever`` authorizes (``HTTPBearer``; fails closed), validates the typed body (4xx with a message on anything
  bad; bodies are cut off at ``max_body_bytes`` while they stream in), encodes the queries itself (the MiniLM
  encoder in this replica: concurrent requests are batched into one forward pass with ``@serve.batch``, batch size
  and wait from ``user_config``, changed live), calls every shard group once and keeps the answer only when every
  group answered for the ingress's own version. During a rollout, handles can reach replicas of two versions: the
  request is retried until one version answers it whole (or a 503 after ``version_wait_s``). A call whose replica
  died is retried; a request over ``request_timeout_s`` gets a 504. A group's answer for another version is used
  when that version was built with the same encoder (:func:`encoder_key`: the query vectors mean the same there),
  so old and new ingress replicas keep answering while a rollout swaps the shard groups under them.
- ``ShardGroup{g}`` (``shard_groups`` deployments, ``shard_replicas`` each) memory-maps its share of the shards and
  searches them with one FAISS thread per shard, merging the exact top k in process
  (:func:`uae_ray.index.search.merge_topk`); it returns pid/doc_id/text/n_tokens (from the version's
  ``passages.parquet``) with its version.
- Every hit carries ``expected_utility`` (nats) from the answering version's ``calibration.json``, applied by the
  shard group that loaded it (null without one); the request may ask for an adaptive k (``min_expected_utility``,
  ``max_context_tokens``: :func:`uae_ray.calibration.choose_k`; passage lengths from the index's ``n_tokens``, else
  counted with the query encoder's tokenizer).
- gRPC: ``uae_ray.Retrieval/Search`` (:mod:`uae_ray.serve.grpc_api`) reaches the same ingress through Serve's gRPC
  proxy when it is started with ``grpc_options`` (port + :data:`GRPC_SERVICER`).
"""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, NamedTuple

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from uae_ray.calibration import CALIBRATION_FILE, choose_k, load_calibration
from uae_ray.config import ConfigError
from uae_ray.data.schema import CORPUS
from uae_ray.serve.api import (
    AdaptiveK,
    AppArgs,
    QueryResult,
    RetrieverSettings,
    SearchRequest,
    SearchResponse,
    VectorSearchRequest,
)
from uae_ray.serve.guard import BodyLimit, Guard, bearer, client_host, is_loopback, token_sha256_from_env

log = logging.getLogger("uae_ray.serve")
#: the bearer token of a request, if it sent one (checked by Guard: a missing token fails closed there). No
#: `from __future__ import annotations` in this module: Serve's class-based FastAPI view needs real annotations.
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
INGRESS_DEPLOYMENT = "Retriever"
#: Serve's ``grpc_options.grpc_servicer_functions`` entry of the search service
GRPC_SERVICER = "uae_ray.serve.grpc_api.add_RetrievalServicer_to_server"


def shard_group_deployment(group: int) -> str:
    """Deployment name of shard group ``group``."""
    return f"ShardGroup{group}"


def group_shards(num_shards: int, groups: int) -> list[list[int]]:
    """Shards of each group, dealt round-robin (``groups`` is capped at ``num_shards``: no empty group)."""
    g = max(1, min(groups, num_shards))
    return [list(range(i, num_shards, g)) for i in range(g)]


def _load_version(run_dir: str, index: str, version: str) -> tuple[Any, Any, dict[str, Any]]:
    """(RunDir, local dir, manifest) of ``index/<version>``; errors name the directory."""
    from uae_ray.index.search import read_manifest
    from uae_ray.index.versions import fetch_index
    from uae_ray.runtime import RunDir

    rd = RunDir(run_dir)
    _, index_dir = fetch_index(rd, index, version)
    return rd, index_dir, read_manifest(index_dir)


def encoder_key(manifest: dict[str, Any]) -> str:
    """What makes query vectors interchangeable between index versions: the encoder weights the index stage
    fingerprinted (``source.encoder_sha1``), else the encoder spec the manifest names, with the dimension."""
    source = manifest.get("source") or {}
    return f"{source.get('encoder_sha1') or manifest.get('encoder')}/{manifest.get('dim')}"


class _Pinned:
    """Replica side of version pinning: remembers what was loaded; ``check_health`` raises on a mismatch."""

    pinned: str
    loaded: str | None

    def check_health(self) -> None:
        if self.loaded != self.pinned:
            raise RuntimeError(f"replica loaded index version {self.loaded!r}, the app pins {self.pinned!r}")


# ----------------------------------------------------------------------------------------------------- ShardGroup
Meta = tuple[str, str | None, str | None, int | None]  # pid, doc_id, text, n_tokens


class GroupAnswer(NamedTuple):
    """What a shard group returns for a batch of query vectors."""

    scores: np.ndarray  # [n, k'] float32, best first
    ids: np.ndarray  # [n, k'] int64 global ids (-1: no hit)
    meta: dict[int, Meta]  # of the returned ids
    version: str | None  # the index version the group loaded
    encoder_key: str  # encoder_key() of that version
    expected_utility: np.ndarray | None  # [n, k'] from the version's calibration.json; None: not calibrated
    ms: float  # searching + merging inside the group


def _search_one(index: Any, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return index.search(vectors, min(k, int(index.ntotal)))


def _one_faiss_thread() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # per thread: OpenMP settings do not carry over from the main thread


@serve.deployment(max_ongoing_requests=64)
class ShardGroup(_Pinned):
    """Some FAISS shards of one index version (memory-mapped where the index type allows), searched with one thread
    each and merged here, plus the pid/doc_id/text/n_tokens of their vectors."""

    def __init__(self, run_dir: str, index: str, version: str, shards: list[int], mmap: bool) -> None:
        from uae_ray.index.search import load_shard

        rd, index_dir, manifest = _load_version(run_dir, index, version)
        self.pinned, self.loaded = version, manifest.get("version")
        self.encoder_key = encoder_key(manifest)
        path = index_dir / CALIBRATION_FILE
        self.calibration = load_calibration(path) if path.exists() else None
        bad = [s for s in shards if not 0 <= s < manifest["num_shards"]]
        if bad or not shards:
            raise ValueError(f"{index_dir}: shards {bad or shards} do not exist ({manifest['num_shards']} shards)")
        self.shards = list(shards)
        self.indexes = [load_shard(index_dir, s, mmap=mmap, manifest=manifest) for s in self.shards]
        self.meta = _load_meta(rd, index_dir, self.shards)
        total = sum(int(ix.ntotal) for ix in self.indexes)
        if len(self.meta) != total:
            raise ValueError(f"{index_dir}: shards {self.shards}: {total} vectors but {len(self.meta)} ids")
        _one_faiss_thread()
        self.pool = ThreadPoolExecutor(len(self.indexes), thread_name_prefix="faiss", initializer=_one_faiss_thread)

    def stats(self) -> dict[str, Any]:
        """Shards, size, version and this replica's memory (RSS, and USS: pages only this process holds; mapped
        files are shared through the page cache and count in RSS only once they are touched)."""
        import psutil

        mem = psutil.Process().memory_full_info()
        return {"shards": self.shards, "ntotal": sum(int(ix.ntotal) for ix in self.indexes), "version": self.loaded,
                "rss_mb": mem.rss / 2**20, "uss_mb": mem.uss / 2**20}

    async def search(self, vectors: np.ndarray, k: int) -> GroupAnswer:
        """The top k' = min(k, size) of every query over this group's shards (all searched at once, merged exactly),
        with the hits' pid/doc_id/text/n_tokens and expected utility."""
        from uae_ray.index.search import merge_topk

        t0 = time.perf_counter()
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(self.indexes) == 1:
            scores, ids = _search_one(self.indexes[0], q, k)
        else:
            loop = asyncio.get_running_loop()
            parts = await asyncio.gather(*[loop.run_in_executor(self.pool, _search_one, ix, q, k)
                                           for ix in self.indexes])
            scores, ids = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
        meta = {int(i): self.meta[int(i)] for i in np.unique(ids) if i >= 0}
        eu = self.calibration.expected_utility(scores) if self.calibration is not None else None
        return GroupAnswer(scores, ids, meta, self.loaded, self.encoder_key, eu, (time.perf_counter() - t0) * 1e3)


def _load_meta(rd: Any, index_dir: Any, shards: list[int]) -> dict[int, Meta]:
    """{global id: (pid, doc_id, text, n_tokens)} of ``shards``: from the version's own ``passages.parquet``
    (n_tokens when the index stage wrote it), else from the run dir's corpus."""
    import pyarrow.parquet as pq

    from uae_ray.index.build import IDS, PASSAGES

    if (index_dir / PASSAGES).exists():
        names = set(pq.read_schema(index_dir / PASSAGES).names)
        cols = ["id", "pid", "doc_id", "text"] + (["n_tokens"] if "n_tokens" in names else [])
        t = pq.read_table(index_dir / PASSAGES, filters=[("shard", "in", shards)], columns=cols)
        values = [t.column(c).to_pylist() for c in cols]
        if len(values) == 4:
            values.append([None] * t.num_rows)
        return {int(i): (p, d, x, n) for i, p, d, x, n in zip(*values, strict=True)}
    ids = pq.read_table(index_dir / IDS, filters=[("shard", "in", shards)], columns=["id", "pid"])
    return _meta_from_corpus(rd, ids)


def _meta_from_corpus(rd: Any, ids: Any) -> dict[int, Meta]:
    import pyarrow.compute as pc

    meta: dict[str, tuple[str | None, str | None, int | None]] = {}
    if rd.exists(CORPUS):
        corpus = rd.read_table(CORPUS, columns=["pid", "doc_id", "text", "n_tokens"])
        corpus = corpus.filter(pc.is_in(corpus.column("pid"), value_set=ids.column("pid")))
        cols = [corpus.column(c).to_pylist() for c in ("pid", "doc_id", "text", "n_tokens")]
        meta = {p: (d, t, n) for p, d, t, n in zip(*cols, strict=True)}
    return {int(i): (p, *meta.get(p, (None, None, None)))
            for i, p in zip(ids.column("id").to_pylist(), ids.column("pid").to_pylist(), strict=True)}


# ------------------------------------------------------------------------------------------------------ Retriever
api = FastAPI(
    title="uae-ray retrieval",
    description="Dense retrieval over a sharded FAISS index with a utility-aligned query encoder. Every hit carries "
                "its expected utility (nats) when the index version is calibrated.",
    version="2",
)
api.add_middleware(BodyLimit)


#: pydantic's Python-side wording -> the JSON terms a client sent (FastAPI validates the parsed body in Python mode)
_JSON_TERMS = {"list_type": "Input should be a valid array", "dict_type": "Input should be a valid object",
               "model_type": "Input should be a valid object"}


def validation_message(errors: Any) -> str:
    """``field: message; ...`` of pydantic/FastAPI errors (the request body's own fields, not ``body.field``)."""
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        parts.append(f"{'.'.join(loc) or 'body'}: {_JSON_TERMS.get(err.get('type', ''), err.get('msg', 'invalid'))}")
    return "; ".join(parts)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": validation_message(e.errors())})


class VersionConflict(Exception):
    """The encoder and the shard groups did not all answer for one index version (a rollout is under way)."""


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=256)
@serve.ingress(api)
class Retriever(_Pinned):
    """Ingress (HTTP and gRPC): authorize, validate, encode (batched, in this replica), one call per shard group,
    merge, expected utility, adaptive k."""

    def __init__(self, groups: list[DeploymentHandle], settings: RetrieverSettings, run_dir: str, encoder: str,
                 index: str, max_query_tokens: int, encoder_backend: str = "torch") -> None:
        import torch

        from uae_ray.models.fast_encoder import load_query_encoder
        from uae_ray.models.registry import resolve_model

        self.groups = groups
        self.settings = settings
        rd, _, manifest = _load_version(run_dir, index, settings.version)
        self.pinned, self.loaded = settings.version, manifest.get("version")
        self.encoder_key = encoder_key(manifest)
        # torch, or the same model exported to ONNX and run by ONNX Runtime / OpenVINO (once per node, cached)
        self.model = load_query_encoder(resolve_model(encoder, rd), encoder_backend, max_length=max_query_tokens,
                                        device="cuda" if torch.cuda.is_available() else "cpu")
        self.max_query_tokens = max_query_tokens
        self.dim = int(self.model.dim)
        if manifest["dim"] != self.dim:
            raise ValueError(f"encoder {encoder!r} gives {self.dim}-d vectors, the index holds {manifest['dim']}-d")
        # the replica's own environment wins (a Secret on the serving nodes); set but empty is an error, not "open"
        sha = token_sha256_from_env(settings.token_env) or settings.token_sha256
        self.guard = Guard(sha, allow_unauthenticated=settings.allow_unauthenticated)
        BodyLimit.set_limit(settings.max_body_bytes)
        self.encoder_pool = ThreadPoolExecutor(1, thread_name_prefix="encoder")  # the event loop keeps serving
        self.n_tokens_cache: dict[tuple[str, str], int] = {}
        self.batch_settings = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}
        self.batches = 0
        self.queries = 0
        self.retried = 0
        self.version_conflicts = 0

    # ---- the query encoder, batched across concurrent requests
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings: ``max_batch_size`` and ``batch_wait_timeout_s`` of the encoder's batching queue."""
        self.batch_settings = {"max_batch_size": int(user_config.get("max_batch_size", 32)),
                               "batch_wait_timeout_s": float(user_config.get("batch_wait_timeout_s", 0.005))}
        self.encode_batch.set_max_batch_size(self.batch_settings["max_batch_size"])
        self.encode_batch.set_batch_wait_timeout_s(self.batch_settings["batch_wait_timeout_s"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(
            self.encoder_pool,
            lambda: self.model.encode(texts, batch_size=len(texts), max_length=self.max_query_tokens))
        self.batches += 1
        self.queries += len(texts)
        return list(vectors)

    def stats(self) -> dict[str, Any]:
        """Live batching settings, the batches formed so far and the backend counters."""
        return {**self.batch_settings, "batches": self.batches, "queries": self.queries, "dim": self.dim,
                "encoder_backend": self.model.backend,
                "version": self.loaded, "retried_calls": self.retried, "version_conflicts": self.version_conflicts}

    # ---- backend calls with retry on dead replicas
    async def _timed(self, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=self.settings.request_timeout_s)
        except TimeoutError as e:
            raise HTTPException(504, f"request took longer than {self.settings.request_timeout_s} s") from e

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

    async def _once(self, vectors: np.ndarray, k: int) -> GroupAnswer:
        """One call per shard group, merged; raises VersionConflict unless every group answered for one version
        whose encoder is this replica's."""
        from uae_ray.index.search import merge_topk

        parts: list[GroupAnswer] = await asyncio.gather(
            *[self._call(shard_group_deployment(g), h.search, vectors, k) for g, h in enumerate(self.groups)]
        )
        versions = {p.version for p in parts}
        if len(versions) != 1:  # never merge hits of two versions: their ids mean other passages
            raise VersionConflict(f"shard groups answered for versions {sorted(map(str, versions))}")
        if parts[0].encoder_key != self.encoder_key:  # the query vectors are this replica's encoder's
            raise VersionConflict(f"version {parts[0].version} was built with another encoder than version "
                                  f"{self.loaded}'s")
        if len(parts) == 1:
            return parts[0]
        scores, ids = merge_topk([p.scores for p in parts], [p.ids for p in parts], k)
        meta: dict[int, Meta] = {}
        for p in parts:
            meta.update(p.meta)
        eu = None
        if parts[0].expected_utility is not None:  # the same calibration in every group of one version
            by_hit = {(r, int(i)): float(e) for p in parts for r in range(len(p.ids))
                      for i, e in zip(p.ids[r].tolist(), p.expected_utility[r].tolist(), strict=True)}
            eu = np.array([[by_hit.get((r, int(i)), np.nan) for i in row] for r, row in enumerate(ids.tolist())])
        return GroupAnswer(scores, ids, meta, parts[0].version, parts[0].encoder_key, eu, max(p.ms for p in parts))

    async def _search(self, vectors: np.ndarray, k: int) -> GroupAnswer:
        """:meth:`_once`, retried while replicas of two versions answer (a rollout), for ``version_wait_s``."""
        deadline = time.monotonic() + self.settings.version_wait_s
        attempt = 0
        while True:
            try:
                return await self._once(vectors, k)
            except VersionConflict as e:
                self.version_conflicts += 1
                if time.monotonic() >= deadline:
                    raise HTTPException(503, f"index version changing under this request ({e}); retry") from e
                attempt += 1
                await asyncio.sleep(min(0.02 * 2**attempt, 0.5))

    def _n_tokens(self, version: str | None, meta: Meta) -> int | None:
        """The index's token count of a hit, else the query encoder's tokenizer's count of its text (cached)."""
        pid, _, text, known = meta
        if known is not None or text is None:
            return known
        key = (str(version), pid)
        if key not in self.n_tokens_cache:
            if len(self.n_tokens_cache) > 100_000:
                self.n_tokens_cache.clear()
            self.n_tokens_cache[key] = len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.n_tokens_cache[key]

    def _check(self, req: AdaptiveK) -> None:
        if not 1 <= req.k <= self.settings.max_k:
            raise HTTPException(422, f"k: must be between 1 and {self.settings.max_k}, got {req.k}")

    async def _answer(self, texts: list[str] | None, vectors: np.ndarray | None, req: AdaptiveK,
                      t0: float) -> SearchResponse:
        """Encode (texts), search, expected utility, adaptive k: the response of one request."""
        encode_ms = 0.0
        if texts is not None:
            vectors = np.stack(await asyncio.gather(*[self.encode_batch(t) for t in texts]))
            encode_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        answer = await self._search(vectors, req.k)
        search_ms = (time.perf_counter() - t1) * 1e3
        if req.min_expected_utility is not None and answer.expected_utility is None:
            raise HTTPException(422, f"min_expected_utility: index version {answer.version} has no "
                                     f"{CALIBRATION_FILE} (no expected utility to compare with); drop the field or "
                                     "serve a calibrated index version")
        meta = answer.meta
        adaptive = req.min_expected_utility is not None or req.max_context_tokens is not None
        results = []
        for row in range(len(vectors)):
            keep = [(float(s), int(i), c) for c, (s, i) in
                    enumerate(zip(answer.scores[row].tolist(), answer.ids[row].tolist(), strict=True)) if i >= 0]
            eu = ([float(answer.expected_utility[row][c]) for _, _, c in keep] if answer.expected_utility is not None
                  else [None] * len(keep))
            n_tok = [meta[i][3] if req.max_context_tokens is None else self._n_tokens(answer.version, meta[i])
                     for _, i, _ in keep]
            n = len(keep)
            if adaptive:
                n = choose_k(np.array([0.0 if e is None else e for e in eu]),
                             np.array([0 if t is None else t for t in n_tok]) if req.max_context_tokens else None,
                             min_expected_utility=req.min_expected_utility,
                             max_context_tokens=req.max_context_tokens)
            hits = [{"rank": r + 1, "pid": meta[i][0], "doc_id": meta[i][1], "score": s, "expected_utility": eu[r],
                     "n_tokens": n_tok[r], "text": meta[i][2]} for r, (s, i, _) in enumerate(keep[:n])]
            results.append(QueryResult(query=texts[row] if texts else None, hits=hits))
        total = (time.perf_counter() - t0) * 1e3
        return SearchResponse(results=results, k=req.k, version=str(answer.version),
                              timing_ms={"encode": encode_ms, "search": total - encode_ms, "total": total,
                                         "shard_groups": search_ms, "shard_search": answer.ms})

    def _texts(self, req: SearchRequest) -> list[str]:
        texts = req.texts()
        if not 1 <= len(texts) <= self.settings.max_queries:
            raise HTTPException(422, f"queries: give 1 to {self.settings.max_queries} queries, got {len(texts)}")
        for n, text in enumerate(texts):
            if not text.strip():
                raise HTTPException(422, f"query {n}: empty")
            if len(text) > self.settings.max_query_chars:
                raise HTTPException(422, f"query {n}: longer than {self.settings.max_query_chars} characters")
        return texts

    # ---- HTTP routes
    @api.get("/healthz")
    async def healthz(self, request: Request,
                      credentials: Credentials) -> dict[str, Any]:
        """Liveness and the served index version; with the bearer token also the index summary and counters."""
        status = {"status": "ok", "version": self.settings.version}
        if not self.guard.authorized(client_host(request), credentials):
            return status
        return {**status, "index": self.settings.index_info, "shard_groups": len(self.groups),
                "calibrated": self.settings.calibrated, "retried_calls": self.retried,
                "version_conflicts": self.version_conflicts}

    @api.post("/search")
    async def search(self, req: SearchRequest, request: Request,
                     credentials: Credentials) -> SearchResponse:
        """Top ``k`` passages for ``query`` (a string) or ``queries`` (a list of strings), each hit with its
        expected utility; ``min_expected_utility`` / ``max_context_tokens`` choose k per query."""
        t0 = time.perf_counter()
        self.guard.authorize(client_host(request), credentials)
        self._check(req)
        return await self._timed(self._answer(self._texts(req), None, req, t0))

    @api.post("/search/vectors")
    async def search_vectors(self, req: VectorSearchRequest, request: Request,
                             credentials: Credentials) -> SearchResponse:
        """Top ``k`` for pre-computed unit query vectors of the index dimension (no encoder in the loop)."""
        t0 = time.perf_counter()
        self.guard.authorize(client_host(request), credentials)
        self._check(req)
        dim = int(self.settings.index_info["dim"])
        if not 1 <= len(req.vectors) <= self.settings.max_queries:
            raise HTTPException(422, f"vectors: give 1 to {self.settings.max_queries} vectors, got {len(req.vectors)}")
        if any(len(v) != dim for v in req.vectors):
            raise HTTPException(422, f"vectors: every vector must have {dim} numbers")
        return await self._timed(self._answer(None, req.array(), req, t0))

    # ---- gRPC (Serve's gRPC proxy calls the method named like the RPC)
    async def Search(self, request: Any, grpc_context: Any = None) -> Any:
        """``uae_ray.Retrieval/Search``: the same checks and answer as ``POST /search``; the token travels as
        ``authorization: Bearer <token>`` metadata; errors are gRPC status codes with the HTTP message."""
        from uae_ray.serve import grpc_api

        return await grpc_api.handle(self, request, grpc_context)


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

    Pins the index version (``args.index_version`` or what ``index/CURRENT`` names now) into every deployment and
    checks that version's ``calibration.json`` loads (absent: hits carry ``expected_utility: null``)."""
    from uae_ray.index.versions import current_version
    from uae_ray.runtime import RunDir

    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    token_sha256 = check_auth(a.host, a.token_env, a.allow_unauthenticated)
    version = a.index_version or current_version(RunDir(a.run_dir), a.index)
    _, index_dir, manifest = _load_version(a.run_dir, a.index, version)
    if manifest.get("version") != version:
        raise ValueError(f"index/{version}/manifest.json names version {manifest.get('version')!r}")
    encoder = a.encoder or manifest.get("encoder") or ""
    if not encoder:
        raise ValueError(f"index/{version}/manifest.json: no encoder recorded; pass encoder=...")
    calibration = load_calibration(index_dir / CALIBRATION_FILE) if (index_dir / CALIBRATION_FILE).exists() else None
    pin = {"resources": {a.node_resource: 0.001}} if a.node_resource else {}
    # a rollout (new index or encoder) starts the new replicas first and lets the old ones drain
    rollout = {"max_surge_percent": a.max_surge_percent, "graceful_shutdown_timeout_s": a.graceful_shutdown_timeout_s}
    settings = RetrieverSettings(
        max_k=a.max_k, max_queries=a.max_queries, max_query_chars=a.max_query_chars, max_body_bytes=a.max_body_bytes,
        token_env=a.token_env, token_sha256=token_sha256, allow_unauthenticated=a.allow_unauthenticated,
        request_timeout_s=a.request_timeout_s, version_wait_s=a.version_wait_s, retries=a.retries, version=version,
        index_info={k: manifest.get(k) for k in ("version", "encoder", "dim", "factory", "num_shards", "vectors",
                                                 "created_at")},
        calibrated=calibration is not None,
    )
    groups = group_shards(int(manifest["num_shards"]), a.shard_groups)
    log.info("serve: pinned index version %s (%s vectors, %s shards in %d group(s), calibration: %s)", version,
             manifest.get("vectors"), manifest.get("num_shards"), len(groups), "yes" if calibration else "none")
    shard_apps = [
        ShardGroup.options(
            name=shard_group_deployment(g), num_replicas=a.shard_replicas,
            ray_actor_options={"num_cpus": a.shard_num_cpus, **pin}, **rollout,
        ).bind(a.run_dir, a.index, version, shards, a.mmap)
        for g, shards in enumerate(groups)
    ]
    return Retriever.options(
        num_replicas=a.ingress_replicas, ray_actor_options={"num_cpus": a.ingress_num_cpus, **pin}, **rollout,
        user_config={"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s},
    ).bind(shard_apps, settings, a.run_dir, encoder, a.index, a.max_query_tokens, a.encoder_backend)
