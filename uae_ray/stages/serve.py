"""``uae-ray serve``: start the retrieval app (``serve/app.py``) over the run dir's index and block until Ctrl-C.

The app lives in the repository's ``serve`` package (what ``serve run`` / ``serve deploy`` / RayService import as
``serve.app:build_app``); this stage puts the repository root on the path when needed and registers the package to
be pickled by value, so Serve replicas do not depend on the driver's working directory.
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


def app_args(cfg: ServeConfig, run_dir: RunDir) -> dict[str, Any]:
    """The :class:`serve.api.AppArgs` fields for this stage's config."""
    return {
        "run_dir": run_dir.uri,
        "encoder": cfg.encoder,
        "shard_replicas": cfg.shard_replicas,
        "encoder_replicas": cfg.encoder_replicas,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "max_k": cfg.max_k,
        "token_env": cfg.token_env,
    }


def run(cfg: ServeConfig, run_dir: RunDir, *, blocking: bool = True) -> dict[str, Any]:
    """Deploy the app on ``cfg.host:cfg.port`` (127.0.0.1 unless told otherwise); block until interrupted."""
    import ray
    from ray import serve

    module = import_app_module()
    ray.cloudpickle.register_pickle_by_value(sys.modules["serve"])
    app = module.build_app(app_args(cfg, run_dir))
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"enable_access_log": False})
    url = f"http://{cfg.host}:{cfg.port}"
    log.info("serve: starting the retrieval app at %s (POST /search, GET /healthz, docs at /docs)", url)
    try:
        serve.run(app, blocking=blocking, logging_config={"enable_access_log": False})
    except KeyboardInterrupt:
        log.info("serve: interrupted, shutting down")
        serve.shutdown()
    return {"url": url, "run_dir": run_dir.uri, "blocking": blocking}
