"""Parity: the vLLM scorer (run in .venv-vllm as a subprocess) and the HF scorer agree on the same pairs.

Tolerance, both in bfloat16: per item |mean log-prob difference| <= 0.3 nats and mean difference <= 0.1 nats
(bf16 keeps 8 mantissa bits: logits of magnitude ~20 carry ~0.08 of rounding each, and the two backends round
different kernels; measured here: max 0.19, mean 0.07 over these 15 items), and the utility rankings agree: the same
best passage per question and Spearman >= 0.9 over all pairs.
Skips (not fails) only when .venv-vllm is absent; `make test` builds it, so CI runs this.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from uae_ray.labeling.prompts import PROMPTS
from uae_ray.labeling.scorers import HFScorer, ScoreItem

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
GEN = "smollm2-135m-instruct"
PER_ITEM_TOL = 0.3
MEAN_TOL = 0.1

QUESTIONS = [
    ("Who first walked on the Moon?", "Neil Armstrong"),
    ("Which city is the capital of France?", "Paris"),
    ("Who wrote Hamlet?", "William Shakespeare"),
]
PASSAGES = [
    "Neil Armstrong was an American astronaut. On 20 July 1969, as commander of Apollo 11, he became the first "
    "person to walk on the Moon.",
    "Paris is the capital and largest city of France, on the river Seine.",
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "The Nile is a major river in northeastern Africa and flows into the Mediterranean Sea.",
]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PY.exists(), reason=".venv-vllm is absent (make vllm-env builds it)")
def test_vllm_and_hf_scorers_agree(tmp_path) -> None:
    from uae_ray.models.registry import hf_folder

    items = [ScoreItem(q, a, None) for q, a in QUESTIONS]
    items += [ScoreItem(q, a, p) for q, a in QUESTIONS for p in PASSAGES]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer, "passage": i.passage}) + "\n"
                            for i in items))
    out = tmp_path / "vllm.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(VLLM_PY), "-m", "uae_ray.labeling.vllm_scorer", "--generator", hf_folder(GEN), "--prompt", "extractive",
         "--items", str(path), "--out", str(out), "--dtype", "bfloat16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(out.read_text())["scores"]
    hf = HFScorer(GEN, PROMPTS["extractive"], dtype="bfloat16").answer_logprobs(items)

    v_lp = np.array([x[0] for x in got])
    h_lp = np.array([x[0] for x in hf])
    assert [x[1] for x in got] == [x[1] for x in hf]  # same answer tokens scored
    diff = np.abs(v_lp - h_lp)
    assert diff.max() <= PER_ITEM_TOL, f"per-item log-prob differences {diff.round(3).tolist()}"
    assert diff.mean() <= MEAN_TOL, f"mean difference {diff.mean():.4f}"

    nq, npass = len(QUESTIONS), len(PASSAGES)
    v_util = v_lp[nq:].reshape(nq, npass) - v_lp[:nq, None]
    h_util = h_lp[nq:].reshape(nq, npass) - h_lp[:nq, None]
    assert v_util.argmax(1).tolist() == h_util.argmax(1).tolist() == [0, 1, 2]  # the gold passage, both backends
    assert _spearman(v_util.ravel(), h_util.ravel()) >= 0.9
