"""Arguments of the retrieval app and the typed request/response models of ``POST /search`` (FastAPI builds the
OpenAPI schema from them).

Requests are validated strictly (no type coercion: ``"k": "5"`` is a 422, not a 5) so a bad request is always a 4xx
with a message naming the field, never a 500.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator, model_validator


class AppArgs(BaseModel):
    """Arguments of :func:`uae_ray.serve.app.build_app` (``serve deploy`` passes them as ``args:`` in the config YAML).

    Layout: the ``Retriever`` ingress (``ingress_replicas``) encodes the queries itself (batched with
    ``@serve.batch``) and calls ``ShardGroup{g}`` (``shard_groups`` deployments, ``shard_replicas`` each); a group
    holds a share of the index's shards and searches them with one FAISS thread per shard, merging in process.

    Attributes:
        run_dir: the run directory (local path or ``s3://`` / ``gs://`` URI) holding ``index/`` and the encoder.
        index: name of the index directory inside the run dir.
        index_version: the index version to serve (``index/<version>/``); None: the one ``index/CURRENT`` names
            when the app is built. Either way the app pins it: replicas started later (restarts, autoscaling) load
            that version, never a newer one. Redeploy (``serve run`` / ``serve deploy``) to serve a new version.
        encoder: encoder spec (``run:encoder``, a registry name or a path); None: the encoder named in the index
            manifest, so queries and passages always come from the same model.
        host: the address the Serve HTTP proxies bind (``http_options.host``; keep the two equal). Not loopback and
            no token: the app refuses to build unless ``allow_unauthenticated`` is true.
        allow_unauthenticated: serve without a bearer token to non-loopback clients (logged as a warning).
        request_timeout_s: a request running longer gets a 504.
        version_wait_s: how long a request may wait (retrying) for replicas of one index version when a rollout
            leaves replicas of two versions behind the handles; then a 503. Never a merged answer of two versions.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str
    index: str = "index"
    index_version: str | None = None
    encoder: str | None = None
    shard_groups: int = Field(1, ge=1)  # deployments ShardGroup0..; shards are dealt round-robin to the groups
    shard_replicas: int = Field(1, ge=1)  # replicas of each shard group (each holds all of its group's shards)
    ingress_replicas: int = Field(1, ge=1)  # the ingress holds the query encoder: this is the encoder's scale too
    shard_num_cpus: float = Field(0.5, ge=0)
    ingress_num_cpus: float = Field(1.0, ge=0)
    node_resource: str | None = None  # custom node resource (e.g. serve_node) that pins replicas to serving nodes
    max_batch_size: int = Field(32, ge=1)  # the ingress's encoder @serve.batch, changed live through user_config
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_query_tokens: int = Field(64, ge=8)
    encoder_backend: Literal["torch", "onnx", "openvino"] = "torch"  # the ingress's query encoder runtime (CPU)
    mmap: bool = True
    max_k: int = Field(100, ge=1)
    max_queries: int = Field(32, ge=1)  # queries per request
    max_query_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(262_144, ge=1024)  # enforced while the body streams in (chunked bodies too)
    token_env: str = "UAE_RAY_TOKEN"
    host: str = "127.0.0.1"
    allow_unauthenticated: bool = False
    request_timeout_s: float = Field(30.0, gt=0)
    version_wait_s: float = Field(20.0, ge=0)
    retries: int = Field(2, ge=0)  # per shard / encoder call, when a replica died under the request
    max_surge_percent: int = Field(100, ge=0, le=100)  # rollouts start new replicas before old ones stop
    graceful_shutdown_timeout_s: float = Field(60.0, gt=0)  # old replicas finish in-flight requests


class RetrieverSettings(BaseModel):
    """What the ingress needs at run time (derived from :class:`AppArgs` on the driver)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_k: int
    max_queries: int
    max_query_chars: int
    max_body_bytes: int
    token_env: str
    token_sha256: str | None  # sha256 of the bearer token seen by build_app (never the token itself)
    allow_unauthenticated: bool
    request_timeout_s: float
    version_wait_s: float
    retries: int
    version: str  # the pinned index version
    index_info: dict[str, Any]
    calibrated: bool  # the pinned version has a calibration.json (the shard groups apply it)


class AdaptiveK(BaseModel):
    """Per-query k chosen by :func:`uae_ray.calibration.choose_k` among the top ``k`` hits: the longest prefix whose
    hits all have ``expected_utility >= min_expected_utility`` and whose passages fit ``max_context_tokens``."""

    model_config = ConfigDict(extra="forbid")

    k: StrictInt = Field(10, description="hits per query (the most, when min_expected_utility / max_context_tokens "
                                         "are given)")
    min_expected_utility: StrictFloat | StrictInt | None = Field(
        None, description="keep hits while their expected utility (nats) is at least this; needs a calibrated index")
    max_context_tokens: StrictInt | None = Field(
        None, ge=1, description="keep hits while their passages fit this many tokens together")

    @field_validator("min_expected_utility")
    @classmethod
    def _finite(cls, v: float | int | None) -> float | int | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class SearchRequest(AdaptiveK):
    """``POST /search``: exactly one of ``query`` / ``queries``; ``k`` hits per query."""

    query: StrictStr | None = None
    queries: list[StrictStr] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> SearchRequest:
        if (self.query is None) == (self.queries is None):
            raise ValueError("give exactly one of 'query' (a string) or 'queries' (a list of strings)")
        return self

    def texts(self) -> list[str]:
        return [self.query] if self.query is not None else list(self.queries or [])


FLOAT32_MAX = float(np.finfo(np.float32).max)


class VectorSearchRequest(AdaptiveK):
    """``POST /search/vectors``: pre-computed unit query vectors (clients that encode themselves, benchmarks).

    Every number must fit a float32 (finite, magnitude at most ~3.4e38): a huge integer, 1e39, NaN or Infinity is a
    422 naming its position, never a 500 from the conversion."""

    vectors: list[list[StrictFloat | StrictInt]]

    @field_validator("vectors")
    @classmethod
    def _fits_float32(cls, v: list[list[float | int]]) -> list[list[float | int]]:
        for i, row in enumerate(v):
            for j, x in enumerate(row):
                # ints are compared as ints (float(10**400) itself overflows); floats must be finite
                ok = abs(x) <= FLOAT32_MAX if isinstance(x, int) else math.isfinite(x) and abs(x) <= FLOAT32_MAX
                if not ok:
                    text = repr(x) if len(repr(x)) <= 24 else f"{repr(x)[:12]}... ({len(repr(x))} digits)"
                    raise ValueError(f"vectors[{i}][{j}] = {text} does not fit a float32 (finite, |x| <= 3.4e38)")
        return v

    def array(self) -> np.ndarray:
        """The vectors as float32 [n, d] (every number checked to fit)."""
        return np.asarray(self.vectors, dtype=np.float32)


class Hit(BaseModel):
    rank: int
    pid: str
    doc_id: str | None
    score: float
    expected_utility: float | None = Field(
        description="expected answer log-perplexity reduction (nats) from the index version's calibration.json; "
                    "null when the version has none")
    n_tokens: int | None = Field(description="passage length in tokens (the index's count); null when unknown")
    text: str | None


class QueryResult(BaseModel):
    query: str | None
    hits: list[Hit]


class SearchResponse(BaseModel):
    results: list[QueryResult]
    k: int
    version: str
    timing_ms: dict[str, float]
