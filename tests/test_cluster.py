"""Cluster definitions parse, and every entry point, import path, stage and deployment they name exists."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_VERSION = "2.60.0"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _serve_config_checks(config: dict[str, Any], source: str) -> None:
    """Validate a Serve config with Ray's own schema, import its app, validate its args, match deployment names."""
    from ray.serve.schema import ServeDeploySchema

    from uae_ray.serve.api import AppArgs

    ServeDeploySchema.parse_obj(config)  # Ray's schema for `serve deploy` / RayService serveConfigV2
    for app in config["applications"]:
        module_name, _, attr = app["import_path"].partition(":")
        build = getattr(importlib.import_module(module_name), attr)
        assert callable(build), f"{source}: {app['import_path']} is not callable"
        args = AppArgs.model_validate(app["args"])  # unknown or bad args fail here, as they would on the cluster
        names = {d["name"] for d in app.get("deployments", [])}
        known = {"Retriever"}
        group_names = {n for n in names if n.startswith("ShardGroup")}
        assert names - known - group_names == set(), f"{source}: unknown deployments {names - known - group_names}"
        assert all(re.fullmatch(r"ShardGroup\d+", n) for n in group_names), group_names
        assert len(group_names) <= args.shard_groups, f"{source}: more ShardGroup deployments than args.shard_groups"
        for d in app.get("deployments", []):
            if "autoscaling_config" in d:
                a = d["autoscaling_config"]
                assert a["min_replicas"] <= a["max_replicas"], f"{source}: {d['name']} autoscaling bounds"
        # the token itself never sits in a config file: only the name of the variable that holds it
        assert args.token_env and {k for k in app["args"] if "token" in k.lower()} <= {"token_env"}
        # the app's fail-closed host check sees the host the proxies really bind, and nothing opts out of it
        assert args.host == config["http_options"]["host"], f"{source}: args.host != http_options.host"
        assert args.allow_unauthenticated is False, f"{source}: allow_unauthenticated in a shipped config"


def test_launcher_yaml_has_cpu_head_gpu_autoscaling_and_cpu_serving_workers():
    cfg = _load(CLUSTER / "aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] > 0
    serving = types["cpu_serve_worker"]
    assert "GPU" not in serving["resources"] and serving["max_workers"] > serving["min_workers"] >= 1
    assert cfg["max_workers"] >= gpu["max_workers"] + serving["max_workers"] - 0
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    images = {cfg["docker"]["image"], gpu["docker"]["worker_image"]}
    assert images == {"uae-ray:0.1.0", "uae-ray:0.1.0-gpu"}


def test_dockerfile_builds_from_the_pinned_ray_and_copies_what_jobs_need():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_VERSION}" in text
    for path in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", text, flags=re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


def _kuberay_docs() -> dict[str, dict[str, Any]]:
    return {p.stem: _load(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def test_kuberay_manifests_parse_with_the_right_kinds_and_ray_version():
    docs = _kuberay_docs()
    assert {k: v["kind"] for k, v in docs.items()} == {
        "raycluster": "RayCluster", "rayjob": "RayJob", "rayservice": "RayService"
    }
    specs = [docs["raycluster"]["spec"], docs["rayjob"]["spec"]["rayClusterSpec"],
             docs["rayservice"]["spec"]["rayClusterConfig"]]
    for spec in specs:
        assert all(d["apiVersion"] == "ray.io/v1" for d in docs.values())
        assert spec["rayVersion"] == RAY_VERSION
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [g for g in docs["raycluster"]["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    limits = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and gpu_groups[0]["minReplicas"] == 0


def _entrypoints() -> list[tuple[str, str]]:
    """(source, command line) of every `python jobs/...` in the cluster files and the README."""
    found = []
    for path in [*CLUSTER.rglob("*.yaml"), ROOT / "README.md"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.search(r"python (jobs/\S+\.py.*)$", line)
            if m:
                found.append((path.name, m.group(1).rstrip("`").strip()))
    return found


def test_every_named_entry_point_exists_and_its_arguments_parse():
    from uae_ray.cli import build_parser

    entries = _entrypoints()
    assert any(src == "rayjob.yaml" for src, _ in entries)
    for src, cmd in entries:
        argv = shlex.split(cmd.replace("\\", " "), comments=True)
        script = ROOT / argv[0]
        assert script.exists(), f"{src}: {argv[0]} does not exist"
        stage = {"pipeline": "run"}.get(script.stem, script.stem.replace("_", "-"))
        args = [a for a in argv[1:] if not a.startswith("<")]
        parsed = build_parser().parse_args([stage, *args])  # SystemExit (a failure) on unknown flags
        assert parsed.stage == stage


def test_rayjob_runs_the_labeling_stage_on_gpu_workers():
    job = _kuberay_docs()["rayjob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/label.py"] and "--run-dir" in argv
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert "env_vars" in runtime_env
    assert job["shutdownAfterJobFinishes"] is True
    groups = job["rayClusterSpec"]["workerGroupSpecs"]
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups)
    from uae_ray.config import LabelConfig, apply_overrides

    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    LabelConfig.model_validate(apply_overrides({}, sets))  # the overrides are valid label settings


@pytest.mark.parametrize("source", ["serve/config.yaml", "cluster/kuberay/rayservice.yaml"])
def test_serve_configs_validate_and_name_importable_app_and_real_deployments(source):
    doc = _load(ROOT / source)
    config = yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc.get("kind") == "RayService" else doc
    _serve_config_checks(config, source)


def test_readme_documents_ray_job_submit_for_every_stage():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for job in sorted((ROOT / "jobs").glob("*.py")):
        assert f"jobs/{job.name}" in readme, f"README does not show how to submit jobs/{job.name}"
    assert "ray job submit" in readme and "serve deploy serve/config.yaml" in readme


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kuberay_clusters_turn_ray_token_auth_on_with_the_token_from_a_secret():
    """Ray's own auth: without it anyone on the pod network can submit a job to the dashboard (run code)."""
    docs = _kuberay_docs()
    specs = {"raycluster": docs["raycluster"]["spec"], "rayjob": docs["rayjob"]["spec"]["rayClusterSpec"],
             "rayservice": docs["rayservice"]["spec"]["rayClusterConfig"]}
    for name, spec in specs.items():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: authOptions.mode is not token"
        secret = spec["authOptions"].get("secretName")
        assert secret, f"{name}: authOptions names no Secret"
        for c in _containers(spec):
            env = _env(c)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}/{c['name']}: RAY_AUTH_MODE"
            token = env.get("RAY_AUTH_TOKEN", {})
            assert "value" not in token, f"{name}/{c['name']}: a literal RAY_AUTH_TOKEN"
            assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}, f"{name}/{c['name']}"
        host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
        assert host in ("127.0.0.1", "localhost") or spec["authOptions"]["mode"] == "token"


def test_kuberay_serving_pods_take_the_search_token_from_a_secret():
    docs = _kuberay_docs()
    service = docs["rayservice"]["spec"]
    serving = _containers(service["rayClusterConfig"])
    cluster = docs["raycluster"]["spec"]
    serving += [c for g in cluster["workerGroupSpecs"] if g["groupName"] == "cpu-serve-workers"
                for c in g["template"]["spec"]["containers"]]
    for c in serving:
        token = _env(c).get("UAE_RAY_TOKEN", {})
        assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"], c["name"]
    config = yaml.safe_load(service["serveConfigV2"])
    assert config["http_options"]["host"] == "0.0.0.0"  # exposed, so the app must see the token (checked above)


def test_launcher_turns_ray_token_auth_on_and_keeps_the_dashboard_on_loopback():
    cfg = _load(CLUSTER / "aws.yaml")
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=" in cmd, cmd
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    mounts = cfg["file_mounts"]
    assert any("auth_token" in str(src) for src in mounts.values())  # the token travels as a file, not in YAML
    assert any("UAE_RAY_TOKEN=" in c for c in cfg["worker_start_ray_commands"])
