"""Labeling benchmark + label quality on real data (QASPER dev, SQuAD dev), in one run.

Measures, on this machine and in the same process:
- machine limit: matmul FLOP/s (bf16, fp32) -> tokens/s limit = FLOP/s / (2 x generator parameters);
- the `label` stage (Ray Data actor pool, HF backend, --dtype): pairs/s and tokens/s with 1 actor x 2 CPUs and with
  2 actors x 1 CPU, on the same pairs;
- the in-process batched scorer (label_pairs_local) on a subset, and a naive loop on the same subset: one pair at a
  time with transformers, full logits over the vocabulary, the no-passage term recomputed for every pair;
- label quality: mean utility of gold vs non-gold candidates, and the fraction of queries whose highest-utility
  candidate is gold (queries with a gold passage in their pool).

Data: the real pipeline stages on a deterministic document sample (`prepare` with max_docs_per_split, `mine`).

    .venv/bin/python bench/bench_label.py --squad-docs 4 --qasper-docs 4 --naive-pairs 24
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from uae_ray.config import LabelConfig, MineConfig, PrepareConfig  # noqa: E402
from uae_ray.data.schema import CANDIDATES, CORPUS, QUERIES, UTILITIES  # noqa: E402
from uae_ray.runtime import RunDir, init_ray  # noqa: E402

DATA = Path(os.environ.get("UAE_RAY_SHARED_DATA", ROOT.parent / "shared" / "data"))
GEN = "smollm2-135m-instruct"


def matmul_flops(dtype: str, n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of an n x n x n ``F.linear`` (the model's own kernel) in ``dtype`` on all threads (best of ``reps``).

    ``torch.matmul`` in bf16 takes a much slower path than ``F.linear`` on this CPU (0.1 vs 2 GFLOP/s measured under
    load), so the limit is measured with the kernel the generator's layers use.
    """
    import torch
    import torch.nn.functional as F

    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    x, w = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    F.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def prepare_and_mine(out: Path, fmt: str, path: Path, split: str | None, docs: int, pool_size: int) -> RunDir:
    from uae_ray.config import InputSpec
    from uae_ray.stages import mine, prepare

    rd = RunDir(out)
    spec = InputSpec(path=str(path), split=split)  # type: ignore[arg-type]
    prepare.run(PrepareConfig(format=fmt, inputs=[spec], max_docs_per_split=docs), rd)  # type: ignore[arg-type]
    mine.run(MineConfig(pool_size=pool_size, splits=["dev"], pool={"min_size": 1, "max_size": 1, "batch_size": 64}),
             rd)
    return rd


def label_run(src: RunDir, dst: Path, cfg: LabelConfig) -> dict:
    """Label a copy of ``src``'s inputs in ``dst`` with ``cfg`` (the stage, as `uae-ray label` runs it)."""
    from uae_ray.stages import label

    shutil.rmtree(dst, ignore_errors=True)
    rd = RunDir(dst)
    for name in (CORPUS, QUERIES, CANDIDATES):
        rd.write_table(name, src.read_table(name))
    t = time.perf_counter()
    report = label.run(cfg, rd)
    report["wall_s"] = round(time.perf_counter() - t, 2)
    return report


def quality(rd: RunDir) -> dict:
    """Gold vs non-gold mean utility; fraction of queries whose top-utility candidate is gold; base-encoder top-1."""
    util = rd.read_table(UTILITIES).to_pandas()
    cands = rd.read_table(CANDIDATES).to_pandas()
    df = util.merge(cands, on=["qid", "pid"], how="inner")
    with_gold = df.groupby("qid")["is_gold"].transform("any")
    df = df[with_gold]
    top = df.loc[df.groupby("qid")["utility"].idxmax()]
    base_top = df.loc[df.groupby("qid")["rank"].idxmin()]
    return {
        "queries": int(df["qid"].nunique()),
        "pairs": len(df),
        "mean_pool": round(len(df) / max(1, df["qid"].nunique()), 2),
        "mean_utility_gold": round(float(df.loc[df.is_gold, "utility"].mean()), 3),
        "mean_utility_nongold": round(float(df.loc[~df.is_gold, "utility"].mean()), 3),
        "top_utility_is_gold": round(float(top["is_gold"].mean()), 3),
        "base_encoder_top1_is_gold": round(float(base_top["is_gold"].mean()), 3),
    }


def pair_subset(rd: RunDir, n: int):
    """The first ``n`` candidate pairs (by qid, rank) with queries and passage text, for the in-process timings."""
    import pyarrow as pa

    cands = rd.read_table(CANDIDATES).sort_by([("qid", "ascending"), ("rank", "ascending")]).slice(0, n)
    corpus = rd.read_table(CORPUS, columns=["pid", "text"])
    row = {p: i for i, p in enumerate(corpus["pid"].to_pylist())}
    text = corpus["text"].take(pa.array([row[p] for p in cands["pid"].to_pylist()]))
    pairs = pa.table({"qid": cands["qid"], "pid": cands["pid"], "text": text})
    queries = rd.read_table(QUERIES)
    return queries.filter(pc.is_in(queries["qid"], pairs["qid"])), pairs


def naive_loop(queries, pairs, dtype: str, system_prompt: str) -> dict:
    """One pair at a time, full-vocabulary logits, no-passage term recomputed per pair (first answer)."""
    import torch

    from uae_ray.labeling.scorers import PromptEncoder, ScoreItem
    from uae_ray.models.registry import load_causal_lm

    model, tok = load_causal_lm(GEN, dtype)
    enc = PromptEncoder(tok, system_prompt, 256, 1024)
    qrow = {q: i for i, q in enumerate(queries["qid"].to_pylist())}
    tokens, t0, utils = 0, time.perf_counter(), []
    for qid, text in zip(pairs["qid"].to_pylist(), pairs["text"].to_pylist(), strict=True):
        i = qrow[qid]
        question = queries["question"][i].as_py()
        answer = next(a for a in queries["answers"][i].as_py() if a.strip())
        vals = []
        for passage in (text, None):
            e = enc.encode(ScoreItem(question, answer, passage))
            ids = torch.tensor([e.prompt_ids + e.answer_ids])
            with torch.inference_mode():
                logp = model(ids).logits[0].float().log_softmax(-1)
            a, t = len(e.answer_ids), ids.shape[1]
            vals.append(logp[t - a - 1 : t - 1].gather(-1, ids[0, t - a :].unsqueeze(-1)).mean().item())
            tokens += t
        utils.append(vals[0] - vals[1])
    s = time.perf_counter() - t0
    return {"pairs": pairs.num_rows, "seconds": round(s, 2), "pairs_per_s": round(pairs.num_rows / s, 3),
            "tokens_per_s": round(tokens / s, 1), "dtype": dtype}


def batched_local(queries, pairs, dtype: str, system_prompt: str, batch_size: int) -> dict:
    from uae_ray.labeling.pipeline import label_pairs_with_skips
    from uae_ray.labeling.scorers import HFScorer

    scorer = HFScorer(GEN, system_prompt, dtype=dtype, batch_size=batch_size)
    t0 = time.perf_counter()
    res = label_pairs_with_skips(scorer, queries, pairs, aggregate="first", generator=GEN, prompt_version="bench")
    s = time.perf_counter() - t0
    return {"pairs": pairs.num_rows, "seconds": round(s, 2), "pairs_per_s": round(pairs.num_rows / s, 3),
            "tokens_per_s": round(res.tokens / s, 1), "dtype": dtype, "batch_size": batch_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--squad-docs", type=int, default=4, help="SQuAD documents per split (the dev split is labeled)")
    p.add_argument("--qasper-docs", type=int, default=4, help="QASPER dev papers")
    p.add_argument("--squad-pool", type=int, default=8)
    p.add_argument("--qasper-pool", type=int, default=10)
    p.add_argument("--naive-pairs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_label")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_label.json")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"], help="label path and naive loop")
    p.add_argument("--compare-dtypes", action="store_true",
                   help="also time the other dtype in-process (bf16 is emulated, so very slow, on CPUs without it)")
    args = p.parse_args()
    from uae_ray.labeling.prompts import PROMPTS
    from uae_ray.models.registry import load_causal_lm

    init_ray(None, num_cpus=2)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpus": os.cpu_count()}
    model, _ = load_causal_lm(GEN, "bfloat16")
    n_params = sum(p.numel() for p in model.parameters())
    flops = {dt: matmul_flops(dt) for dt in ("bfloat16", "float32")}
    results["machine"] = {
        "generator_params": n_params,
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "limit_tokens_per_s": {k: round(v / (2 * n_params), 1) for k, v in flops.items()},
    }
    print(json.dumps(results["machine"]), flush=True)

    squad = prepare_and_mine(args.work / "squad_src", "mrqa", DATA / "squad" / "SQuAD-dev-v1.1.mrqa.jsonl.gz",
                             None, args.squad_docs, args.squad_pool)
    qasper = prepare_and_mine(args.work / "qasper_src", "qasper", DATA / "qasper" / "qasper-dev-v0.3.json", "dev",
                              args.qasper_docs, args.qasper_pool)
    base = {"dtype": args.dtype, "splits": ["dev"], "rows_per_part": 256, "rows_per_batch": 32}
    one = {"min_size": 1, "max_size": 1, "num_cpus": 2, "batch_size": args.batch_size}
    two = {"min_size": 2, "max_size": 2, "num_cpus": 1, "batch_size": args.batch_size}

    runs = {}
    runs["squad_1actor"] = label_run(squad, args.work / "squad_1", LabelConfig(**base, prompt="extractive", pool=one))
    results["quality_squad"] = quality(RunDir(args.work / "squad_1"))
    print("squad 1 actor", json.dumps(runs["squad_1actor"]["this_run"]), json.dumps(results["quality_squad"]),
          flush=True)
    if not args.skip_scaling:
        runs["squad_2actors"] = label_run(squad, args.work / "squad_2", LabelConfig(**base, prompt="extractive",
                                                                                    pool=two))
        print("squad 2 actors", json.dumps(runs["squad_2actors"]["this_run"]), flush=True)
    runs["qasper_1actor"] = label_run(qasper, args.work / "qasper_1", LabelConfig(
        **base, prompt="qasper", answer_aggregate="first", pool=one))
    results["quality_qasper"] = quality(RunDir(args.work / "qasper_1"))
    print("qasper 1 actor", json.dumps(runs["qasper_1actor"]["this_run"]), json.dumps(results["quality_qasper"]),
          flush=True)
    results["label_stage"] = {k: {**v["this_run"], "wall_s": v["wall_s"], "pairs": v["pairs"],
                                  "skipped": v["skipped"]} for k, v in runs.items()}

    queries, pairs = pair_subset(squad, args.naive_pairs)
    sp = PROMPTS["extractive"]
    short_of = {"bfloat16": "bf16", "float32": "fp32"}
    dtypes = ["bfloat16", "float32"] if args.compare_dtypes else [args.dtype]
    ip = results["in_process"] = {}
    for dt in dtypes:
        ip[f"batched_{short_of[dt]}"] = batched_local(queries, pairs, dt, sp, args.batch_size)
        ip[f"naive_{short_of[dt]}"] = naive_loop(queries, pairs, dt, sp)
    short = short_of[args.dtype]
    lim = results["machine"]["limit_tokens_per_s"][args.dtype]
    stage = runs["squad_1actor"]["this_run"]
    batched, naive = ip[f"batched_{short}"], ip[f"naive_{short}"]
    results["ratios"] = {
        "dtype": args.dtype,
        "batched_vs_naive_pairs": round(batched["pairs_per_s"] / naive["pairs_per_s"], 2),
        "stage_vs_naive_pairs": round((stage["pairs_per_s"] or 0) / naive["pairs_per_s"], 2),
        "batched_tokens_vs_limit": round(batched["tokens_per_s"] / lim, 3),
        "stage_tokens_vs_limit": round((stage["tokens_per_s"] or 0) / lim, 3),
    }
    if "squad_2actors" in runs:
        results["ratios"]["two_vs_one_actor_pairs"] = round(
            (runs["squad_2actors"]["this_run"]["pairs_per_s"] or 0) / (stage["pairs_per_s"] or 1), 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'path':34s} {'pairs/s':>9s} {'tokens/s':>10s}")
    for name, r in [*((f"label stage {k}", v) for k, v in results["label_stage"].items()),
                    *((f"in-process {k}", v) for k, v in ip.items())]:
        print(f"{name:34s} {r['pairs_per_s'] or 0:9.2f} {r['tokens_per_s'] or 0:10.1f}")
    print(f"{'limit (' + short + ' FLOP/s / 2P)':34s} {'':9s} {lim:10.1f}")
    print(json.dumps(results["ratios"], indent=2))
    print(json.dumps({"squad": results["quality_squad"], "qasper": results["quality_qasper"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
