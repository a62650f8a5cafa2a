"""Ray start-up, Ray Data helpers (:func:`split_blocks`), and the run directory's names re-exported from
:mod:`uae_ray.storage` (where the commit protocol and the single-writer lease live)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uae_ray.storage import (
    SUCCESS_MARKER,
    LeaseHeldError,
    LeaseLostError,
    RunDir,
    StorageOptions,
)

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["SUCCESS_MARKER", "LeaseHeldError", "LeaseLostError", "RunDir", "StorageOptions", "ensure_ray",
           "init_ray", "split_blocks", "worker_env_vars"]

log = logging.getLogger("uae_ray")

#: Variables handed on to Ray workers when the driver has them. Object-store *locations* travel (endpoint, region),
#: credentials never do: every node takes those from its own environment (instance profile, IRSA, a Secret).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def worker_env_vars() -> dict[str, str]:
    """Environment every Ray worker gets: offline hub (the embedded models need none), quiet tokenizers, and the
    object-store location variables of :data:`FORWARDED_ENV` that the driver has."""
    env = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    }
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


# ------------------------------------------------------------------------------------------------------------- Ray
def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a running Ray cluster, or start a local one sized to this machine.

    Which one: ``address`` (``auto``, ``host:port``, ``ray://``) if given, else ``RAY_ADDRESS`` if set (the Job API
    sets it in a job's driver), else a new local cluster with ``num_cpus`` (default: all cores). A running cluster
    is never asked for ``num_cpus``: its nodes say what they have, so passing one there is an error.

    The runtime environment sets the worker env vars; a ``ray://`` client also ships the ``uae_ray`` package so
    workers import the same code as the driver (``ray job submit --working-dir .`` does this for jobs).
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {"env_vars": worker_env_vars()}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(
            address="local",  # a new cluster: never attach to another `ray start` on this machine by accident
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        return
    if num_cpus is not None:
        raise ValueError(f"--num-cpus sizes a new local cluster; this run connects to the cluster at {address!r}, "
                         "whose nodes declare their own CPUs: drop --num-cpus")
    if address.startswith("ray://"):
        import uae_ray

        runtime_env["py_modules"] = [str(Path(uae_ray.__file__).parent)]
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)


def ensure_ray() -> None:
    """Start a local cluster unless Ray is already up (stages call this; the CLI connects first)."""
    init_ray(None)


def split_blocks(table: pa.Table, n: int) -> list[pa.Table]:
    """``table`` as ``n`` contiguous slices: Ray Data blocks made on the driver.

    ``from_arrow(table).repartition(n)`` would need a CPU for the repartition tasks, and an actor pool that holds
    every CPU of the cluster (one actor with ``num_cpus`` = all) then waits for them forever.
    """
    n = max(1, min(n, table.num_rows))
    step = max(1, -(-table.num_rows // n))  # an empty table is one empty block
    return [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
