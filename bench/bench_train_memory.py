"""Benchmark: peak memory and time of one student training step, by queries per step and activation checkpointing.

    .venv/bin/python bench/bench_train_memory.py --out bench/results/train_memory.json

One worker's step as ``train-encoder`` runs it: the student from :func:`~uae_ray.training.loop.build_student`
(the configured base model, default MiniLM), ``queries_per_step`` queries plus ``queries_per_step x (1 +
n_hard_negatives)`` passages padded to ``max_passage_length`` tokens (the worst case: every passage at the limit), one
forward and one backward pass with one torch thread (a 1-CPU Ray Train worker). Each setting runs in its own
process, so the peak RSS (``ru_maxrss``) is that setting's alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_step(queries: int, group: int, length: int, checkpointing: bool) -> dict[str, float]:
    """Forward + backward of one worker step; returns peak RSS (GB) and seconds."""
    import torch
    import torch.nn.functional as F

    from uae_ray.config import TrainEncoderConfig
    from uae_ray.training.loop import build_student

    torch.set_num_threads(1)
    model = build_student(TrainEncoderConfig(gradient_checkpointing=checkpointing))
    model.train()
    n = queries * (1 + group)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (n, length), generator=gen)
    feats = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    emb = F.normalize(model(feats)["sentence_embedding"], dim=-1)
    (emb[:queries] @ emb[queries:].T).logsumexp(dim=-1).mean().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"peak_rss_gb": round(peak, 2), "rss_before_step_gb": round(before, 2), "seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["8:off", "8:on", "4:off"],
                   help="queries_per_step:checkpointing (on/off) per run")
    p.add_argument("--n-hard-negatives", type=int, default=7)
    p.add_argument("--max-passage-length", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/train_memory.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one setting, in this process
        q, ckpt = args.child.split(":")
        print(json.dumps(one_step(int(q), args.n_hard_negatives, args.max_passage_length, ckpt == "on")))
        return
    rows = []
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--child", setting, "--n-hard-negatives", str(args.n_hard_negatives),
               "--max-passage-length", str(args.max_passage_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        q, ckpt = setting.split(":")
        rows.append({"queries_per_step": int(q), "gradient_checkpointing": ckpt == "on",
                     "sequences": int(q) * (2 + args.n_hard_negatives), **json.loads(out)})
    base = rows[0]
    print(f"| queries/step | checkpointing | sequences x {args.max_passage_length} tokens | peak RSS GB | s/step | "
          f"s per query | peak vs first |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['queries_per_step']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['sequences']} | "
              f"{r['peak_rss_gb']} | {r['seconds']} | {r['seconds'] / r['queries_per_step']:.1f} | "
              f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n_hard_negatives": args.n_hard_negatives,
                                    "max_passage_length": args.max_passage_length, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
