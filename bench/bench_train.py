"""Training benchmarks: Ray Train throughput at 1 and 2 workers, the dev-split sweep, and pool-setting R@1 / MAP.

Modes (each writes JSON under bench/results/ and prints a table):

    # examples/s of the student (and reward model) at 1 worker x 2 CPUs and 2 workers x 1 CPU
    .venv/bin/python bench/bench_train.py throughput --run-dir RUN [--steps 12]
    # small grid on the dev split (never test): each point trains a student copy and scores dev pools
    .venv/bin/python bench/bench_train.py sweep --run-dir RUN --grid tau_s=0.02,0.05 gold_mix=0.3,0.7
    # pool setting: rank each dev query's candidate pool with each encoder; Recall@1 and MAP against gold
    .venv/bin/python bench/bench_train.py pool-eval --run-dir RUN --encoders base run:encoder_infonce run:encoder

RUN is a run directory with queries, corpus, candidates, utilities/ and (for uae/kl) teacher_scores.parquet.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from uae_ray.config import TrainEncoderConfig, TrainRewardConfig, TrainScaling  # noqa: E402
from uae_ray.data import schema  # noqa: E402
from uae_ray.eval.stats import table_with_intervals  # noqa: E402
from uae_ray.runtime import RunDir, init_ray  # noqa: E402

RESULTS = ROOT / "bench" / "results"
METRICS = ("recall@1", "map", "exputil@1")  # pool-eval columns (names as evaluate's report)
SCALINGS = {"1x2cpu": TrainScaling(num_workers=1, cpus_per_worker=2), "2x1cpu": TrainScaling(num_workers=2)}


# ------------------------------------------------------------------------------------------------------- pool eval
def pool_metrics(run_dir: RunDir, encoder: str, split: str = "dev") -> dict[str, float | int | None]:
    """Recall@1, MAP and ExpUtil@1 of ``encoder`` ranking each ``split`` query's candidate pool, with the evaluate
    stage's own code (its pools, :class:`DenseSystem` + :func:`run_system`, :func:`retrieval_metrics`): gold from
    queries.parquet; ExpUtil@1 over the queries whose top-1 candidate is labeled (``exputil@1_n`` counts them).

    ``encoder``: ``base`` (the embedded MiniLM), ``run:<dir>`` (a model directory in the run dir) or a name/path.
    """
    from uae_ray.eval.report import retrieval_metrics, summarize, utilities_by_query
    from uae_ray.eval.runner import encode_rows
    from uae_ray.eval.systems import Corpus, DenseSystem, QueryTask, run_system
    from uae_ray.models.encoder import load_encoder
    from uae_ray.models.registry import resolve_model
    from uae_ray.stages.evaluate import _pools

    model = load_encoder(resolve_model("all-minilm-l6-v2" if encoder == "base" else encoder, run_dir))
    corpus = Corpus.from_table(run_dir.read_table(schema.CORPUS, columns=["pid", "doc_id", "text"]))
    q = {r["qid"]: r for r in run_dir.read_table(schema.QUERIES).to_pylist() if r["split"] == split}
    pools = _pools(run_dir, corpus, set(q))
    qids = sorted(qid for qid in pools if q[qid]["gold_pids"])
    vectors = encode_rows(model, corpus, np.concatenate([pools[qid] for qid in qids]) if qids else np.zeros(0, int))
    tasks = [QueryTask(qid, q[qid]["question"], pools[qid]) for qid in qids]
    depth = max((len(pools[qid]) for qid in qids), default=1)  # the whole pool, ranked
    ranked = run_system(DenseSystem(encoder, model, vectors), tasks, corpus, k=depth).to_pylist()
    labels = utilities_by_query(run_dir.read_table(schema.UTILITIES, columns=["qid", "pid", "utility"])
                                if run_dir.exists(schema.UTILITIES) else None)
    rows = [retrieval_metrics(r["pids"], set(q[r["qid"]]["gold_pids"]), labels.get(r["qid"]), ks=[1],
                              exp_util_ks=[1]) for r in ranked]
    gold_in_pool = sum(bool(set(q[qid]["gold_pids"]) & {corpus.pids[i] for i in pools[qid]}) for qid in qids)
    per_query = {r["qid"]: {m: row[m] for m in METRICS} for r, row in zip(ranked, rows, strict=True)}
    return {"gold_in_pool": gold_in_pool, **summarize(rows, list(METRICS)), "per_query": per_query}


# ------------------------------------------------------------------------------------------------------ throughput
def _throughput(history: list[dict], examples_per_step: int) -> float | None:
    """Examples/s over the steady state: from the end of step 1 (warm-up) to the last step."""
    if len(history) < 3:
        return None
    dt = history[-1]["seconds"] - history[0]["seconds"]
    return (len(history) - 1) * examples_per_step / dt if dt > 0 else None


def _scratch_copy(run_dir: RunDir) -> RunDir:
    """A scratch run dir with the input tables only, so benchmarking never touches the real models."""
    import tempfile

    scratch = RunDir(tempfile.mkdtemp(prefix="bench_train-"))
    for name in (schema.QUERIES, schema.CORPUS, schema.CANDIDATES, schema.TEACHER_SCORES):
        scratch.write_table(name, run_dir.read_table(name))
    scratch.write_table(f"{schema.UTILITIES}/part-00000.parquet", run_dir.read_table(schema.UTILITIES))
    return scratch


def throughput(run_dir: RunDir, steps: int, queries_per_step: int, scalings: list[str]) -> list[dict]:
    from uae_ray.stages import train_encoder, train_reward

    rows = []
    n_train = run_dir.read_table(schema.QUERIES, columns=["split"])["split"].to_pylist().count("train")
    for label in scalings:
        scaling = SCALINGS[label]
        epochs = max(1, -(-steps * scaling.num_workers * queries_per_step // max(1, n_train)))
        for model in ("encoder", "reward"):
            scratch = _scratch_copy(run_dir)
            t0 = time.perf_counter()
            if model == "encoder":
                cfg = TrainEncoderConfig(epochs=epochs, queries_per_step=queries_per_step, scaling=scaling)
                train_encoder.run(cfg, scratch)
                state = json.loads((scratch.local_path(schema.ENCODER) / "training.json").read_text())["state"]
            else:
                cfg = TrainRewardConfig(epochs=epochs, queries_per_step=queries_per_step, eval_max_queries=1,
                                        scaling=scaling)
                train_reward.run(cfg, scratch)
                state = json.loads((scratch.local_path(schema.REWARD_MODEL) / "training.json").read_text())["state"]
            wall = time.perf_counter() - t0
            shutil.rmtree(scratch.root, ignore_errors=True)
            per_step = scaling.num_workers * queries_per_step
            hist = state["history"][:steps]
            rows.append({"model": model, "scaling": label, "steps": len(hist), "queries_per_step": per_step,
                         "queries_per_s": _throughput(hist, per_step), "wall_s_incl_startup": round(wall, 1)})
            print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------- sweep
def sweep_points(grid: dict[str, list[float]], one_at_a_time: bool) -> list[dict[str, float]]:
    """The full product of ``grid``, or (one at a time) the defaults plus each value of each key alone."""
    keys = sorted(grid)
    if not one_at_a_time:
        return [dict(zip(keys, v, strict=True)) for v in itertools.product(*(grid[k] for k in keys))]
    return [{}] + [{k: v} for k in keys for v in grid[k]]


def sweep(run_dir: RunDir, points: list[dict[str, float]], base: dict) -> list[dict]:
    from uae_ray.stages import train_encoder

    rows = []
    for i, point in enumerate(points):
        out = f"sweep_{i:02d}"
        if run_dir.exists(out) and not run_dir.exists(f"{out}_report.json"):
            run_dir.remove(out)
        cfg = TrainEncoderConfig(**{**base, **point, "output": out})
        prev = run_dir.read_json(f"{out}_report.json")["config"] if run_dir.exists(f"{out}_report.json") else None
        if prev is not None and prev != cfg.model_dump():  # a different grid: retrain this slot
            for name in (out, f"{out}_report.json", f"checkpoints/train_encoder-{out}"):
                if run_dir.exists(name):
                    run_dir.remove(name)
        t0 = time.perf_counter()
        train_encoder.run(cfg, run_dir)
        metrics = pool_metrics(run_dir, f"run:{out}")
        shown = {k: getattr(cfg, k) for k in ("tau_s", "tau_t", "gold_mix", "n_hard_negatives", "lr")}
        changed = ",".join(f"{k}={v}" for k, v in point.items()) or "defaults"
        rows.append({"point": changed, **shown, **metrics, "seconds": round(time.perf_counter() - t0, 1)})
        print({k: v for k, v in rows[-1].items() if k != "per_query"}, flush=True)
    return rows


def _parse_grid(items: list[str]) -> dict[str, list[float]]:
    grid = {}
    for item in items:
        key, _, vals = item.partition("=")
        grid[key] = [int(v) if key == "n_hard_negatives" else float(v) for v in vals.split(",")]
    return grid


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    fmt = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for r in rows for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i in range(len(rows)):
        lines.append("| " + " | ".join(fmt[i * len(cols) : (i + 1) * len(cols)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["throughput", "sweep", "pool-eval"])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--queries-per-step", type=int, default=4)
    p.add_argument("--grid", nargs="*", default=[])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--one-at-a-time", action="store_true", help="sweep: vary one key at a time from the defaults")
    p.add_argument("--max-passage-length", type=int, default=128)
    p.add_argument("--sweep-queries-per-step", type=int, default=8)
    p.add_argument("--encoders", nargs="*", default=["base", "run:encoder_infonce", "run:encoder"])
    p.add_argument("--split", default="dev", choices=["train", "dev"])  # never test: defaults are picked on dev
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--scalings", nargs="*", default=list(SCALINGS), choices=list(SCALINGS), help="throughput order")
    p.add_argument("--synthetic-docs", type=int, default=0, help="first write the tests' fictional run into --run-dir")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.synthetic_docs:  # the tests' fictional run (real text, made-up labels): for throughput only
        sys.path.insert(0, str(ROOT / "tests"))
        from _training_data import build_tiny_run

        build_tiny_run(args.run_dir, n_docs=args.synthetic_docs)
    run_dir = RunDir(args.run_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.mode == "pool-eval":
        rows = [{"encoder": e, **pool_metrics(run_dir, e, args.split)} for e in args.encoders]
    else:
        init_ray(None, num_cpus=args.num_cpus)
        if args.mode == "throughput":
            rows = throughput(run_dir, args.steps, args.queries_per_step, args.scalings)
        else:
            base = {"epochs": args.epochs, "max_passage_length": args.max_passage_length,
                    "queries_per_step": args.sweep_queries_per_step}
            rows = sweep(run_dir, sweep_points(_parse_grid(args.grid), args.one_at_a_time), base)
    if args.mode != "throughput":  # paired differences to the first row (base / the defaults), 95% intervals and p
        rows = table_with_intervals(rows, "encoder" if args.mode == "pool-eval" else "point", METRICS)
    out = RESULTS / f"bench_train_{args.mode}{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "run_dir": args.run_dir, "rows": rows}, indent=2))
    print(_table(rows))
    print(f"wrote {out}")
    shutil.rmtree(RESULTS / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
