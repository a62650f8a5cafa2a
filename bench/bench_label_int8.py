"""Does dynamic int8 keep label quality? Answer log-probs of SmolLM2 in fp32 vs int8 (torch dynamic quantisation).

Same six (question, answer, passage) items as the labeling tests; fp32 is the reference. Variants: int8 linear
layers of the decoder (per-tensor, per-channel) and of the whole model incl. the vocabulary head (per-channel).
Writes bench/results/bench_label_int8.json and prints the table.

    .venv/bin/python bench/bench_label_int8.py
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from uae_ray.labeling.prompts import PROMPTS  # noqa: E402
from uae_ray.labeling.scorers import HFScorer, ScoreItem  # noqa: E402

MOON = ("Neil Armstrong was an American astronaut. On 20 July 1969, as commander of Apollo 11, he became the first "
        "person to walk on the Moon.")
PARIS = "Paris is the capital and largest city of France, on the river Seine."
RIVER = "The Nile is a major river in northeastern Africa and flows into the Mediterranean Sea."
ITEMS = [ScoreItem("Who first walked on the Moon?", "Neil Armstrong", p) for p in (MOON, PARIS, None)] + [
    ScoreItem("Which city is the capital of France?", "Paris", p) for p in (PARIS, RIVER, None)]


def _utilities(lp: np.ndarray) -> list[float]:
    return [float(lp[0] - lp[2]), float(lp[1] - lp[2]), float(lp[3] - lp[5]), float(lp[4] - lp[5])]


def main() -> int:
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    warnings.simplefilter("ignore")  # torch marks its quantised-tensor API deprecated
    scorer = HFScorer("smollm2-135m-instruct", PROMPTS["extractive"], dtype="float32", batch_size=3,
                      max_passage_tokens=48)
    fp32 = scorer.model
    t0 = time.perf_counter()
    ref = np.array([lp for lp, _ in scorer.answer_logprobs(ITEMS)])
    rows = [{"variant": "fp32", "max_abs_logp_diff": 0.0, "utilities": _utilities(ref),
             "seconds": round(time.perf_counter() - t0, 3)}]
    variants = {
        "int8 decoder linears, per-tensor": ("model", default_dynamic_qconfig),
        "int8 decoder linears, per-channel": ("model", per_channel_dynamic_qconfig),
        "int8 all linears incl. head, per-channel": ("all", per_channel_dynamic_qconfig),
    }
    for name, (scope, qconfig) in variants.items():
        m = copy.deepcopy(fp32)
        if scope == "model":
            m.model = quantize_dynamic(m.model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
        else:
            m = quantize_dynamic(m, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
        scorer.model = m
        t0 = time.perf_counter()
        lp = np.array([x for x, _ in scorer.answer_logprobs(ITEMS)])
        rows.append({"variant": name, "max_abs_logp_diff": round(float(np.abs(lp - ref).max()), 3),
                     "utilities": [round(u, 3) for u in _utilities(lp)], "seconds": round(time.perf_counter() - t0, 3)})
    out = ROOT / "bench" / "results" / "bench_label_int8.json"
    out.write_text(json.dumps({"command": "python bench/bench_label_int8.py", "reference_logp": ref.round(3).tolist(),
                               "rows": rows}, indent=2) + "\n")
    print(f"{'variant':42s} {'max |dlogp|':>11s}  utilities (moon: gold, other; paris: gold, other)")
    for r in rows:
        print(f"{r['variant']:42s} {r['max_abs_logp_diff']:11.3f}  {[round(u, 2) for u in r['utilities']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
