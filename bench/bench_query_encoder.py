"""Query-encoder latency (batch 1, as evaluate and serve encode) and passage throughput: torch vs ONNX Runtime vs
OpenVINO, one run each in one process, on the bundled sample's questions and passages; optionally the evaluate stage
on a demo run dir with each backend (UAE vs UPR / RankGPT speed-up in the same run).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_query_encoder.py [--model all-minilm-l6-v2] \
        [--eval-run-dir runs/bench_qenc] [--out bench/results/bench_query_encoder.json]

``--eval-run-dir`` needs a run dir after ``prepare`` and ``mine`` (configs/demo.yaml); a copy of ``--model`` is staged
as its ``encoder/`` when the run dir has none (the UAE student's architecture and cost; its quality is not the point).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np


def _demo_texts() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in files("uae_ray").joinpath("assets/demo.jsonl").read_text().splitlines()]
    return [r["question"] for r in rows if "question" in r], [r["text"] for r in rows if "text" in r]


def _latency(enc: Any, questions: list[str], warmup: int = 10) -> dict[str, float]:
    for q in questions[:warmup]:
        enc.encode([q], batch_size=1, max_length=64)
    ms = []
    for q in questions:
        t0 = time.perf_counter()
        enc.encode([q], batch_size=1, max_length=64)
        ms.append(1000 * (time.perf_counter() - t0))
    ms.sort()
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 3), "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def bench_encoders(model: str) -> dict[str, Any]:
    from uae_ray.models.fast_encoder import load_query_encoder

    questions, passages = _demo_texts()
    out: dict[str, Any] = {}
    ref_q = ref_p = None
    for backend in ("torch", "onnx", "openvino"):
        t0 = time.perf_counter()
        enc = load_query_encoder(model, backend)
        load_s = time.perf_counter() - t0
        lat = _latency(enc, questions)
        t0 = time.perf_counter()
        vec_p = enc.encode(passages, batch_size=32)
        pps = len(passages) / (time.perf_counter() - t0)
        vec_q = np.concatenate([enc.encode([q], batch_size=1, max_length=64) for q in questions])
        if ref_q is None:
            ref_q, ref_p = vec_q, vec_p
        out[backend] = {"load_s": round(load_s, 2), "query_batch1": lat, "passages_per_s_batch32": round(pps, 1),
                        "min_cosine_to_torch_queries": round(float((vec_q * ref_q).sum(1).min()), 6),
                        "min_cosine_to_torch_passages": round(float((vec_p * ref_p).sum(1).min()), 6)}
        print(backend, json.dumps(out[backend]), flush=True)
    for backend in ("onnx", "openvino"):
        out[backend]["speedup_p50_vs_torch"] = round(out["torch"]["query_batch1"]["p50_ms"]
                                                     / out[backend]["query_batch1"]["p50_ms"], 2)
    return out


def bench_evaluate(run_dir: str, model: str, llm_queries: int) -> dict[str, Any]:
    from uae_ray.config import EvaluateConfig
    from uae_ray.data.schema import ENCODER
    from uae_ray.models.registry import resolve
    from uae_ray.runtime import RunDir
    from uae_ray.stages import evaluate

    rd = RunDir(run_dir)
    if not rd.dir_complete(ENCODER):
        with rd.staged_dir(ENCODER) as d:
            shutil.copytree(resolve(model).path, d, dirs_exist_ok=True)
    out: dict[str, Any] = {}
    for backend in ("onnx", "torch"):  # the fast one first: its figures are the ones asked for
        cfg = EvaluateConfig(split="dev", systems=["base", "uae", "upr", "rankgpt"], settings=["pool"],
                             rerank_top_k=7, llm_rerank_max_queries=llm_queries, generate=False,
                             label_on_demand=False, ks=[1, 2, 3, 5], exp_util_ks=[1], encoder_backend=backend)
        shutil.rmtree(rd.local_path("eval") / "rankings", ignore_errors=True)  # measure, never reuse timings
        t0 = time.perf_counter()
        evaluate.run(cfg, rd)
        report = json.loads(Path(rd.local_path("eval") / "report.json").read_text())
        block = report["settings"]["pool"]
        sub = block.get("llm_subset", block)["systems"]
        out[backend] = {"evaluate_s": round(time.perf_counter() - t0, 1),
                        "latency_llm_subset": {n: s["latency"] for n, s in sub.items()},
                        "latency_all_queries": {n: s["latency"] for n, s in block["systems"].items()},
                        "speedup_vs_llm": block.get("speedup_vs_llm"),
                        "speedup_base_vs_llm": block.get("speedup_base_vs_llm")}
        print(backend, json.dumps(out[backend]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--eval-run-dir", default=None)
    ap.add_argument("--llm-queries", type=int, default=10)
    ap.add_argument("--out", default="bench/results/bench_query_encoder.json")
    args = ap.parse_args()
    result: dict[str, Any] = {"model": args.model, "encoders": bench_encoders(args.model)}
    if args.eval_run_dir:
        result["evaluate"] = bench_evaluate(args.eval_run_dir, args.model, args.llm_queries)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
