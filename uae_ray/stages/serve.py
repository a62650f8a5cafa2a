"""``uae-ray serve``: start the retrieval app (``serve/app.py``) over the run dir's index and block until Ctrl-C.

The app lives in the repository's ``serve`` package (what ``serve run`` / ``serve deploy`` / RayService import as
``serve.app:build_app``); this stage puts the repository root on the path when needed and registers the package to
be pickled by value, so Serve replicas do not depend on the driver's working directory.

The replicas' CPU requests are fitted to the cluster: with the defaults (encoder 1, each shard replica 0.5, ingress
0.25) two shards ask for 2.25 CPUs, more than a 2-CPU machine has, and Serve would wait forever for the missing
quarter. When the sum exceeds ``ray.cluster_resources()["CPU"]`` every request is scaled down by the same factor
(CPU requests are a scheduling share, not a limit) and the log says so.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from uae_ray.config import ServeConfig
from uae_ray.runtime import RunDir

log = logging.getLogger("uae_ray.serve")


def import_app_module() -> ModuleType:
    """``serve.app`` from the repository that holds this package (the repo root is added to ``sys.path``)."""
    try:
        return importlib.import_module("serve.app")
    except ModuleNotFoundError as e:
        if e.name not in ("serve", "serve.app"):
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "serve" / "app.py").exists():
        raise ModuleNotFoundError(f"serve/app.py not found next to the uae_ray package ({root}); run from a checkout")
    sys.path.insert(0, str(root))
    return importlib.import_module("serve.app")


#: CPUs per replica the stage asks for when the cluster has room (AppArgs defaults).
DEFAULT_CPUS = {"encoder_num_cpus": 1.0, "shard_num_cpus": 0.5, "ingress_num_cpus": 0.25}


def fit_cpus(cfg: ServeConfig, num_shards: int, cluster_cpus: float) -> dict[str, float]:
    """Per-replica ``num_cpus`` of the three deployments, scaled down so their sum fits ``cluster_cpus``.

    Raises:
        ValueError: the cluster has no CPU at all (nothing to scale into).
    """
    replicas = {"encoder_num_cpus": cfg.encoder_replicas, "shard_num_cpus": cfg.shard_replicas * num_shards,
                "ingress_num_cpus": 1}
    need = sum(DEFAULT_CPUS[k] * n for k, n in replicas.items())
    if cluster_cpus <= 0:
        raise ValueError("the Ray cluster has no CPUs for the serving replicas")
    if need <= cluster_cpus:
        return dict(DEFAULT_CPUS)
    scale = cluster_cpus / need
    fitted = {k: int(v * scale * 1000) / 1000 for k, v in DEFAULT_CPUS.items()}  # round down: the sum stays inside
    log.info("serve: %d encoder + %d shard + 1 ingress replicas ask for %.2f CPUs, the cluster has %.2f: CPU "
             "requests scaled by %.2f to %s (lower shard_replicas / encoder_replicas to keep full shares)",
             cfg.encoder_replicas, replicas["shard_num_cpus"], need, cluster_cpus, scale, fitted)
    return fitted


def app_args(cfg: ServeConfig, run_dir: RunDir, cpus: dict[str, float] | None = None) -> dict[str, Any]:
    """The :class:`serve.api.AppArgs` fields for this stage's config (``cpus``: from :func:`fit_cpus`)."""
    return {
        "run_dir": run_dir.uri,
        "index_version": cfg.index_version,
        "encoder": cfg.encoder,
        "shard_replicas": cfg.shard_replicas,
        "encoder_replicas": cfg.encoder_replicas,
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
    starts: :func:`serve.app.check_auth` raises a ConfigError."""
    import_app_module().check_auth(cfg.host, cfg.token_env, cfg.allow_unauthenticated)


def run(cfg: ServeConfig, run_dir: RunDir, *, blocking: bool = True) -> dict[str, Any]:
    """Deploy the app on ``cfg.host:cfg.port`` (127.0.0.1 unless told otherwise); block until interrupted."""
    import ray
    from ray import serve

    from uae_ray.index.versions import current_version

    module = import_app_module()
    ray.cloudpickle.register_pickle_by_value(sys.modules["serve"])
    version = cfg.index_version or current_version(run_dir, "index")
    num_shards = int(run_dir.read_json(f"index/{version}/manifest.json")["num_shards"])
    cpus = fit_cpus(cfg, num_shards, float(ray.cluster_resources().get("CPU", 0.0)))
    app = module.build_app(app_args(cfg.model_copy(update={"index_version": version}), run_dir, cpus))
    # the proxy's own timeout is a backstop behind the ingress's 504 (the proxy answers 408, and a client header
    # can lift it), so it is set a little longer
    http = {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + 5}
    serve.start(http_options=http, logging_config={"enable_access_log": False})
    url = f"http://{cfg.host}:{cfg.port}"
    log.info("serve: starting the retrieval app at %s (POST /search, GET /healthz, docs at /docs)", url)
    try:
        serve.run(app, blocking=blocking, logging_config={"enable_access_log": False})
    except KeyboardInterrupt:
        log.info("serve: interrupted, shutting down")
        serve.shutdown()
    return {"url": url, "run_dir": run_dir.uri, "index_version": version, "blocking": blocking}
