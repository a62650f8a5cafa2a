"""Real Ray clusters on this machine for the cluster tests and bench: `ray start --block` processes, each in its own
process group, each with its own ports, stopped by killing exactly those groups.

Never `ray stop` here: it kills every Ray instance on the machine (other test sessions' too), and
``ray.cluster_utils.AutoscalingCluster.start()/shutdown()`` call ``ray stop --force`` (and in the Ray 2.60 wheel its
``fake_multi_node/example.yaml`` template is missing), so :func:`start_autoscaling_head` builds the same fake
multi-node config itself and starts the head the same way (``RAY_FAKE_CLUSTER=1``, ``--autoscaling-config``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: the environment that runs the tests: its bin first on PATH, so the nodes' `python` (what a job's entrypoint runs)
#: and `ray` are this environment's
VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (bound to 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a `ray start`: the venv's bin first on PATH, this checkout on PYTHONPATH (workers and job
    drivers import ``uae_ray`` from it), offline hub, no auth token, no usage stats."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


#: worker-port blocks this process has handed out (each node gets a block of its own)
_WORKER_PORT_BLOCKS: set[int] = set()
WORKER_PORTS_PER_NODE = 500


def _all_bindable(start: int, size: int) -> bool:
    socks: list[socket.socket] = []
    try:
        for port in range(start, start + size):
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def worker_port_range(size: int = WORKER_PORTS_PER_NODE) -> tuple[int, int]:
    """A block of ``size`` worker ports, all bindable now, below the kernel's ephemeral range (so outgoing
    connections cannot take them meanwhile) and not handed to another node of this process.

    Every Ray worker process holds one port of its node's range for its life; a pipeline job starts far more than a
    few dozen over its stages (Data actors, Train workers, Serve replicas), and a 41-port range ran out in CI
    ("Failed to register worker to Raylet: No available ports"), leaving the job hanging.
    """
    starts = list(range(12000, 32000 - size, size))
    random.shuffle(starts)
    for start in starts:
        if start not in _WORKER_PORT_BLOCKS and _all_bindable(start, size):
            _WORKER_PORT_BLOCKS.add(start)
            return start, start + size - 1
    raise RuntimeError(f"no free block of {size} worker ports in 12000-32000")


def _node_ports() -> list[str]:
    p = free_ports(6)
    lo, hi = worker_port_range()
    return [
        f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
        f"--dashboard-agent-grpc-port={p[3]}", f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
        # a worker-port range of its own (Ray's default 10002-19999 is shared by every instance on the machine)
        f"--min-worker-port={lo}", f"--max-worker-port={hi}",
    ]


@dataclass
class RayNode:
    """One `ray start --block` process (its own session / process group) and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the node's process group, then SIGKILL what is left of it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


@dataclass
class LocalCluster:
    """A head (and workers) started with `ray start`; ``gcs`` for drivers, ``dashboard`` for the Job API."""

    temp_dir: Path
    gcs: str
    dashboard: str
    env: dict[str, str]
    nodes: list[RayNode] = field(default_factory=list)

    def _start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> RayNode:
        log_path = self.temp_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", *args], stdout=log, stderr=subprocess.STDOUT,
                env={**self.env, **(extra_env or {})}, start_new_session=True, cwd=ROOT,
            )
        node = RayNode(name, proc, log_path)
        self.nodes.append(node)
        return node

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> RayNode:
        # its own temp dir, as on a real node: nodes sharing one would unpack the same job package into the same
        # runtime_resources folder and pull files from under each other (seen: "No module named ...")
        name = f"worker{len(self.nodes)}"
        args = [f"--address={self.gcs}", f"--num-cpus={num_cpus}", *_node_ports(), f"--temp-dir={self.temp_dir / name}",
                "--object-store-memory=300000000"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return self._start(name, args)

    def wait_for_nodes(self, n: int, timeout_s: float = 90.0) -> None:
        """Until the dashboard reports ``n`` alive nodes (a node process that died fails at once with its log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [x for x in self.nodes if not x.alive()]
            if dead:
                raise RuntimeError(f"ray node {dead[0].name} exited ({dead[0].proc.returncode}):\n"
                                   f"{dead[0].log_tail()}")
            if len(alive_nodes(self.dashboard)) >= n:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray nodes not up after {timeout_s} s:\n{self.nodes[0].log_tail()}")

    def stop(self) -> None:
        """Workers first, then the head; each by its own process group. Leaves nothing of this cluster running."""
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def all_nodes(dashboard: str) -> list[dict[str, Any]]:
    """Every node the dashboard's state API knows, dead ones included ([] while it is not answering yet)."""
    try:
        with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=1000&detail=1", timeout=5) as r:
            data = json.load(r)
    except OSError:
        return []
    return list(data["data"]["result"]["result"])


def alive_nodes(dashboard: str) -> list[dict[str, Any]]:
    return [n for n in all_nodes(dashboard) if n["state"] == "ALIVE"]


def start_head(num_cpus: int, *, resources: dict[str, float] | None = None,
               autoscaling: dict[str, Any] | None = None) -> LocalCluster:
    """`ray start --head --block` with its own ports and temp dir (short: Ray's socket paths must stay < 108 chars).

    ``autoscaling``: ``{"worker_types": {...}, "idle_timeout_minutes": m, "max_workers": n}`` starts Ray's autoscaler
    with the fake multi-node provider (``RAY_FAKE_CLUSTER=1``, as ``AutoscalingCluster`` does): it launches and
    removes real raylets of those node types on this machine.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="uaeray-", dir="/tmp"))
    gcs_port, dash_port, client_port = free_ports(3)
    cluster = LocalCluster(temp_dir=temp_dir, gcs=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}",
                           env=node_env())
    args = ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={client_port}",
            f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--object-store-memory=300000000", *_node_ports()]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    extra_env: dict[str, str] = {}
    if autoscaling is not None:
        config = fake_autoscaling_config(cluster.gcs, **autoscaling)
        (temp_dir / "autoscaling.json").write_text(json.dumps(config))
        args.append(f"--autoscaling-config={temp_dir / 'autoscaling.json'}")
        extra_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cluster._start("head", args, extra_env)
    return cluster


def fake_autoscaling_config(gcs: str, worker_types: dict[str, Any], *, idle_timeout_minutes: float,
                            max_workers: int) -> dict[str, Any]:
    """The fake multi-node provider's cluster config (what ``AutoscalingCluster`` generates): the provider launches
    real raylets on this machine for the worker node types and points them at the head's GCS ``gcs``."""
    return {
        "cluster_name": "uae-ray-fake",
        "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs},
        "available_node_types": {
            **worker_types,
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


# ------------------------------------------------------------------------------------------------ jobs
def ray_cli(cluster: LocalCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A `ray` CLI command as a user runs it from the checkout (the venv's `ray`, first on PATH)."""
    return subprocess.run(["ray", *args], cwd=ROOT, env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)


def submit_job(cluster: LocalCluster, submission_id: str, entrypoint: list[str], attempts: int = 10) -> str:
    """`ray job submit --no-wait`; right after start-up the job agent may not be registered yet ("No available
    agent to submit job"): retried. Returns the CLI output (it names the uploaded package)."""
    for _ in range(attempts):
        r = ray_cli(cluster, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
                    "--working-dir", ".", "--no-wait", "--", *entrypoint)
        if r.returncode == 0:
            return r.stdout + r.stderr
        if "No available agent" not in r.stdout + r.stderr:
            raise RuntimeError(f"ray job submit failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        time.sleep(3)
    raise RuntimeError(f"no job agent after {attempts} tries:\n{r.stdout}\n{r.stderr}")


def wait_for_job(cluster: LocalCluster, submission_id: str, timeout_s: float) -> str:
    """Follow the job through the Job SDK until it ends; anything but SUCCEEDED raises with its logs (a job still
    running at the timeout is stopped first)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(submission_id)
        if not status.is_terminal():
            client.stop_job(submission_id)
        raise RuntimeError(f"job {submission_id} ended {status} (info: {client.get_job_info(submission_id)}):\n"
                           f"{logs[-6000:]}")
    return status.value
