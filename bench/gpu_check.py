"""The GPU check's steps (run by bench/gpu_check.sh): one JSON of results, each step timed and bounded.

Steps (each a subprocess of the real CLI, with its own timeout; a step that cannot run says why in the JSON):

- ``env``: GPU, Python, torch/ray/vllm/faiss versions, which of them import;
- ``label``: the label stage with backend hf and with backend vllm (Ray Data LLM) on the same pairs, each actor on one
  GPU: per-pair log-prob differences, Spearman of the utilities, pairs/s of each (from label_report.json);
- ``train``: ``uae-ray run --until train-encoder`` on the demo-small config with ``use_gpu`` (NCCL) for both trainers;
- ``faiss``: ``uae-ray index`` with ``use_gpu=false`` and again with ``use_gpu=true``: the shard files must be equal;
- ``serve``: ``uae-ray serve`` over that index, 100 sequential ``POST /search``: p50 / p95 latency.

``--dry-run`` checks the arguments and the imports this machine has, prints every command it would run, and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("env", "label", "train", "faiss", "serve")
IMPORTS = ("torch", "ray", "ray.data.llm", "vllm", "faiss", "sentence_transformers", "transformers", "pydantic",
           "uae_ray.stages.label", "uae_ray.labeling.vllm_scorer")
DEMO = "configs/demo-small.yaml"
TRAIN_SETS = ["train-reward.scaling.use_gpu=true", "train-reward.scaling.num_workers=1",
              "train-reward.scaling.placement_strategy=PACK", "train-encoder.scaling.use_gpu=true",
              "train-encoder.scaling.num_workers=1", "train-encoder.scaling.placement_strategy=PACK",
              "label.pool.num_gpus=1", "label.pool.max_size=1", "score-reward.pool.num_gpus=1"]
LABEL_SETS = ["dtype=bfloat16", "pool.num_gpus=1", "pool.min_size=1", "pool.max_size=1", "pool.batch_size=64",
              "rows_per_batch=256", "rows_per_part=4096"]


def cli(*args: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "uae_ray.cli", *args]


def plan(work: Path, port: int, vllm_python: str = sys.executable) -> dict[str, list[list[str]]]:
    """Every command each step runs, in order."""
    run, lab = work / "run", work / "label"
    sets = lambda xs: [a for x in xs for a in ("--set", x)]  # noqa: E731
    return {
        "label": [cli("label", "--run-dir", str(lab / "hf"), *sets(LABEL_SETS)),
                  cli("label", "--run-dir", str(lab / "vllm"), *sets([*LABEL_SETS, "backend=vllm"]),
                      python=vllm_python)],
        "train": [cli("run", "--config", DEMO, "--run-dir", str(run), "--until", "train-encoder", *sets(TRAIN_SETS))],
        "faiss": [cli("index", "--config", DEMO, "--run-dir", str(run), "--force", "--set", "use_gpu=false"),
                  cli("index", "--config", DEMO, "--run-dir", str(run), "--force", "--set", "use_gpu=true")],
        "serve": [cli("serve", "--config", DEMO, "--run-dir", str(run), "--set", f"port={port}")],
    }


def validate_configs() -> dict[str, str]:
    """Every stage config the commands use, validated as the CLI will (a bad override fails here, not on the GPU)."""
    from uae_ray.cli import stage_config
    from uae_ray.config import load_pipeline_config

    out = {"label": stage_config("label", None, LABEL_SETS).backend,
           "label-vllm": stage_config("label", None, [*LABEL_SETS, "backend=vllm"]).backend}
    pipe = load_pipeline_config(ROOT / DEMO, TRAIN_SETS)
    dumped = pipe.model_dump(by_alias=True)
    out["train"] = f"train-encoder use_gpu={dumped['train-encoder']['scaling']['use_gpu']}"
    out["index"] = f"use_gpu={stage_config('index', str(ROOT / DEMO), ['use_gpu=true']).use_gpu}"
    out["serve"] = f"port={stage_config('serve', str(ROOT / DEMO), ['port=8123']).port}"
    return out


def _env() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "imports": {}}
    for name in IMPORTS:
        try:
            mod = importlib.import_module(name)
            out["imports"][name] = getattr(mod, "__version__", "ok")
        except Exception as e:  # a step that needs it records the reason
            out["imports"][name] = f"missing: {type(e).__name__}: {str(e)[:160]}"
    try:
        import faiss

        out["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        out["faiss_gpus"] = 0
    try:
        import torch

        out["cuda"] = torch.cuda.is_available()
        out["gpu"] = torch.cuda.get_device_name(0) if out["cuda"] else None
    except ImportError:
        out["cuda"] = False
    return out


def _has(env: dict[str, Any], *names: str) -> str | None:
    missing = [n for n in names if str(env["imports"].get(n, "missing")).startswith("missing")]
    return f"not importable here: {', '.join(missing)}" if missing else None


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, round(time.perf_counter() - t0, 1)


def write_label_pairs(root: Path, queries: int) -> int:
    """A label run dir of ``queries`` distinct questions x 6 passages (tests/_label_data.py, questions numbered so
    that every pair has its own content key)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pyarrow as pa
    from _label_data import write_label_run

    from uae_ray.data.schema import QUERIES

    rd, n = write_label_run(root, queries, n_passages=6)
    q = rd.read_table(QUERIES)
    numbered = [f"{text} (question {i})" for i, text in enumerate(q["question"].to_pylist())]
    rd.write_table(QUERIES, q.set_column(q.schema.get_field_index("question"), "question", pa.array(numbered)))
    return n


def step_label(cmds: list[list[str]], work: Path, queries: int, log: Path, no_vllm: str | None) -> dict[str, Any]:
    import numpy as np
    from scipy.stats import spearmanr

    n = write_label_pairs(work / "label" / "hf", queries)
    shutil.copytree(work / "label" / "hf", work / "label" / "vllm")
    out: dict[str, Any] = {"pairs": n}
    for backend, cmd in zip(("hf", "vllm"), cmds, strict=True):
        if backend == "vllm" and no_vllm:
            out[backend] = {"skipped": no_vllm, "rc": None}
            continue
        rc, secs = _run(cmd, 240, log)
        out[backend] = {"rc": rc, "wall_s": secs}
        report = work / "label" / backend / "label_report.json"
        if rc == 0 and report.exists():
            r = json.loads(report.read_text())
            out[backend].update(labeled=r["labeled"], skipped=r["skipped"], pairs_per_s=r["this_run"]["pairs_per_s"],
                                tokens_per_s=r["this_run"]["tokens_per_s"], stage_s=r["this_run"]["seconds"])
    if out["hf"]["rc"] == 0 and out["vllm"]["rc"] == 0:
        import pyarrow.parquet as pq

        rows = {b: {(r["qid"], r["pid"]): r for r in pq.read_table(work / "label" / b / "utilities").to_pylist()}
                for b in ("hf", "vllm")}
        keys = sorted(set(rows["hf"]) & set(rows["vllm"]))
        for col in ("logp_with", "logp_without"):
            d = np.abs(np.array([rows["hf"][k][col] for k in keys]) - np.array([rows["vllm"][k][col] for k in keys]))
            out[f"{col}_abs_diff"] = {"max": round(float(d.max()), 4), "mean": round(float(d.mean()), 4)}
        out["common_pairs"] = len(keys)
        out["spearman_utility"] = round(float(spearmanr([rows["hf"][k]["utility"] for k in keys],
                                                        [rows["vllm"][k]["utility"] for k in keys]).statistic), 4)
    return out


def _shard_digests(run: Path) -> dict[str, dict[str, str]]:
    """version -> {shard file: sha256} for every published index version."""
    out = {}
    for v in sorted((run / "index").glob("*/")):
        shards = sorted(v.glob("shard-*.faiss"))
        if shards:
            out[v.name] = {s.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in shards}
    return out


def step_faiss(cmds: list[list[str]], run: Path, log: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, cmd in zip(("cpu", "gpu"), cmds, strict=True):
        before = set(_shard_digests(run))
        rc, secs = _run(cmd, 120, log)
        new = [v for v in _shard_digests(run) if v not in before]
        out[name] = {"rc": rc, "wall_s": secs, "version": new[-1] if new else None}
    digests = _shard_digests(run)
    if out["cpu"]["version"] and out["gpu"]["version"]:
        out["shards_equal"] = digests[out["cpu"]["version"]] == digests[out["gpu"]["version"]]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_serve(cmd: list[str], port: int, log: Path, n: int = 100) -> dict[str, Any]:
    import httpx
    import numpy as np

    f = log.open("a")
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    out: dict[str, Any] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 120:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                return {"error": f"uae-ray serve exited with {proc.returncode} (see the log)"}
            time.sleep(1)
        else:
            return {"error": "not healthy within 120 s"}
        out["ready_s"] = round(time.perf_counter() - t0, 1)
        lat = []
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(n + 5):
                t = time.perf_counter()
                r = client.post("/search", json={"query": f"question {i} about the demo documents", "k": 5})
                r.raise_for_status()
                if i >= 5:  # the first requests warm the encoder (CUDA kernels)
                    lat.append((time.perf_counter() - t) * 1000)
        out.update(requests=n, p50_ms=round(float(np.percentile(lat, 50)), 2),
                   p95_ms=round(float(np.percentile(lat, 95)), 2))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        f.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--work", type=Path, default=Path("/tmp/uae-gpu-check"), help="scratch folder (emptied)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--label-queries", type=int, default=200, help="distinct questions (x 6 passages) to label")
    p.add_argument("--dry-run", action="store_true", help="check arguments and imports, print the plan, exit 0")
    p.add_argument("--cpu", action="store_true", help="rehearse on a machine without a GPU: no GPU overrides")
    p.add_argument("--vllm-python", default=sys.executable, help="the Python that runs the vllm label (has vllm)")
    args = p.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad or not 1 <= args.label_queries <= 100_000:
        p.error(f"unknown step(s) {bad}; use {STEPS}" if bad else "--label-queries: 1..100000")
    port = _free_port()
    if args.cpu:
        gpu = ("num_gpus=1", "use_gpu=true")
        for sets in (LABEL_SETS, TRAIN_SETS):
            sets[:] = [x for x in sets if not x.endswith(gpu)]
    commands = plan(args.work, port, args.vllm_python)
    env = _env()
    configs = validate_configs()
    if args.dry_run:
        shown = {s: [" ".join(c) for c in commands[s]] for s in steps if s in commands}
        print(json.dumps({"steps": steps, "env": env, "configs": configs, "commands": shown}, indent=2))
        return 0
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    log = args.out.with_suffix(".log")
    results: dict[str, Any] = {"env": env, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2))

    need = {"label": ("ray",), "train": ("ray",), "faiss": ("ray", "faiss"),
            "serve": ("ray", "faiss")}
    for step in steps:
        if step == "env":
            continue
        why = _has(env, *need[step])
        if step in ("faiss", "serve") and "train" not in steps:
            why = why or "needs the train step's run dir"
        if why:
            results[step] = {"skipped": why}
            save()
            continue
        t0 = time.perf_counter()
        try:
            if step == "label":
                no_vllm = None if args.vllm_python != sys.executable else _has(env, "vllm", "ray.data.llm")
                results[step] = step_label(commands["label"], args.work, args.label_queries, log, no_vllm)
            elif step == "train":
                rc, secs = _run(commands["train"][0], 300, log)
                results[step] = {"rc": rc, "wall_s": secs}
                report = args.work / "run" / "encoder_report.json"
                if report.exists():
                    results[step]["report"] = json.loads(report.read_text())
            elif step == "faiss":
                results[step] = step_faiss(commands["faiss"], args.work / "run", log)
                # the index stage falls back to CPU (with a warning) when faiss sees no GPU: then both builds are CPU
                results[step]["built_on_gpu"] = env["faiss_gpus"] > 0
            elif step == "serve":
                results[step] = step_serve(commands["serve"][0], port, log)
        except Exception as e:  # record and go on: the other steps still say something
            results[step] = {"error": f"{type(e).__name__}: {e}"}
        results[step]["step_s"] = round(time.perf_counter() - t0, 1)
        save()
    save()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
