"""``uae-ray serve``: start the retrieval app (:mod:`uae_ray.serve.app`, part of the installed package) over the
run dir's index and block until Ctrl-C.

The replicas' CPU requests are fitted to the cluster: with the defaults (the ingress, which runs the query encoder,
1 CPU; each shard-group replica 0.5) three shard-group replicas ask for 2.5 CPUs, more than a 2-CPU machine has, and
Serve would wait forever for the missing share. When the sum exceeds ``ray.cluster_resources()["CPU"]`` every
request is scaled down by the same factor (CPU requests are a scheduling share, not a limit) and the log says so.
"""

from __future__ import annotations

import logging
from typing import Any

from uae_ray.config import ServeConfig
from uae_ray.runtime import RunDir

log = logging.getLogger("uae_ray.serve")


#: CPUs per replica the stage asks for when the cluster has room (AppArgs defaults; the ingress runs the encoder).
DEFAULT_CPUS = {"shard_num_cpus": 0.5, "ingress_num_cpus": 1.0}


def fit_cpus(cfg: ServeConfig, cluster_cpus: float) -> dict[str, float]:
    """Per-replica ``num_cpus`` of the ingress (with the encoder) and the shard groups (one group by default),
    scaled down so their sum fits ``cluster_cpus``.

    Raises:
        ValueError: the cluster has no CPU at all (nothing to scale into).
    """
    replicas = {"shard_num_cpus": cfg.shard_replicas, "ingress_num_cpus": cfg.encoder_replicas}
    need = sum(DEFAULT_CPUS[k] * n for k, n in replicas.items())
    if cluster_cpus <= 0:
        raise ValueError("the Ray cluster has no CPUs for the serving replicas")
    if need <= cluster_cpus:
        return dict(DEFAULT_CPUS)
    scale = cluster_cpus / need
    fitted = {k: int(v * scale * 1000) / 1000 for k, v in DEFAULT_CPUS.items()}  # round down: the sum stays inside
    log.info("serve: %d ingress (encoder) + %d shard-group replicas ask for %.2f CPUs, the cluster has %.2f: CPU "
             "requests scaled by %.2f to %s (lower shard_replicas / encoder_replicas to keep full shares)",
             replicas["ingress_num_cpus"], replicas["shard_num_cpus"], need, cluster_cpus, scale, fitted)
    return fitted


def app_args(cfg: ServeConfig, run_dir: RunDir, cpus: dict[str, float] | None = None) -> dict[str, Any]:
    """The :class:`uae_ray.serve.api.AppArgs` fields for this stage's config (``cpus``: from :func:`fit_cpus`);
    ``encoder_replicas`` are ingress replicas (the ingress holds the query encoder)."""
    return {
        "run_dir": run_dir.uri,
        "index_version": cfg.index_version,
        "encoder": cfg.encoder,
        "shard_replicas": cfg.shard_replicas,
        "ingress_replicas": cfg.encoder_replicas,
        "encoder_backend": cfg.encoder_backend,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "max_k": cfg.max_k,
        "token_env": cfg.token_env,
        "host": cfg.host,
        "allow_unauthenticated": cfg.allow_unauthenticated,
        "request_timeout_s": cfg.request_timeout_s,
        **(cpus or {}),
    }


def preflight(cfg: ServeConfig) -> None:
    """The refusals that need no cluster (an empty token, a non-loopback host without one), checked before Ray
    starts: :func:`uae_ray.serve.app.check_auth` raises a ConfigError."""
    from uae_ray.serve.app import check_auth

    check_auth(cfg.host, cfg.token_env, cfg.allow_unauthenticated)


def run(cfg: ServeConfig, run_dir: RunDir, *, blocking: bool = True) -> dict[str, Any]:
    """Deploy the app on ``cfg.host:cfg.port`` (127.0.0.1 unless told otherwise); block until interrupted."""
    import ray
    from ray import serve

    from uae_ray.index.versions import current_version
    from uae_ray.serve.app import GRPC_SERVICER, build_app

    version = cfg.index_version or current_version(run_dir, "index")
    cpus = fit_cpus(cfg, float(ray.cluster_resources().get("CPU", 0.0)))
    app = build_app(app_args(cfg.model_copy(update={"index_version": version}), run_dir, cpus))
    # the proxy's own timeout is a backstop behind the ingress's 504 (the proxy answers 408, and a client header
    # can lift it), so it is set a little longer
    http = {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + 5}
    grpc = {"port": cfg.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]} if cfg.grpc_port else None
    serve.start(http_options=http, grpc_options=grpc, logging_config={"enable_access_log": False})
    url = f"http://{cfg.host}:{cfg.port}"
    log.info("serve: starting the retrieval app at %s (POST /search, GET /healthz, docs at /docs)%s", url,
             f"; gRPC uae_ray.Retrieval/Search on port {cfg.grpc_port}" if cfg.grpc_port else "")
    try:
        serve.run(app, blocking=blocking, logging_config={"enable_access_log": False})
    except KeyboardInterrupt:
        log.info("serve: interrupted, shutting down")
        serve.shutdown()
    return {"url": url, "run_dir": run_dir.uri, "index_version": version, "blocking": blocking}
