"""bench/gpu_check.sh --dry-run: the GPU check's arguments, imports and stage configs are checked on this (GPU-less)
machine, and it says what it would run on the GPU; bad arguments are refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def test_gpu_check_dry_run_plans_every_step_with_valid_configs(tmp_path) -> None:
    p = _sh("bench/gpu_check.sh", "--dry-run", "--staged", str(tmp_path), "--label-queries", "50")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"would run: cat {tmp_path}/part-*" in p.stdout  # nothing installed in a dry run
    plan = json.loads(p.stdout[p.stdout.index("{"):])
    assert plan["steps"] == ["env", "label", "train", "faiss", "serve"]
    assert plan["env"]["imports"]["ray.data.llm"] == "ok" and plan["env"]["imports"]["uae_ray.stages.label"] == "ok"
    assert plan["configs"] == {"label": "hf", "label-vllm": "vllm", "train": "train-encoder use_gpu=True",
                               "index": "use_gpu=True", "serve": "port=8123"}
    hf, vllm = plan["commands"]["label"]
    assert "--set pool.num_gpus=1" in hf and hf + " --set backend=vllm" == vllm.replace("/label/vllm", "/label/hf")
    assert "--set train-encoder.scaling.use_gpu=true" in plan["commands"]["train"][0]
    assert [c.split()[-1] for c in plan["commands"]["faiss"]] == ["use_gpu=false", "use_gpu=true"]
    assert plan["commands"]["serve"][0].split()[3] == "serve"


def test_gpu_check_refuses_bad_arguments() -> None:
    bad = _sh("bench/gpu_check.sh", "--bogus")
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
    step = _sh("bench/gpu_check.sh", "--dry-run", "--steps", "env,nope")
    assert step.returncode == 2 and "unknown step(s) ['nope']" in step.stderr
    chunk = _sh("bench/gpu_wheels.sh", "--chunk-mib", "80")
    assert chunk.returncode == 2 and "1..62" in chunk.stderr
    listed = _sh("bench/gpu_wheels.sh", "--list")
    assert listed.returncode == 0 and "ray[data,train,serve]==2.60.0" in listed.stdout
