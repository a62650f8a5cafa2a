"""Parity: the label stage with backend vllm (vLLM engines through Ray Data LLM, run from .venv-vllm as a subprocess
with its own local Ray cluster) and with backend hf (the session's Ray cluster) agree on the same pairs.

The pairs: 3 questions x 4 passages (the gold passage of each among them) and a fourth question whose answers are all
empty (4 skips), from tests/_label_data.py. Tolerance, both in bfloat16: per pair |difference| of ``logp_with`` and of
``logp_without`` <= 0.3 nats, mean <= 0.1 (bf16 keeps 8 mantissa bits: logits of magnitude ~20 carry ~0.08 of
rounding each, and the two backends round different kernels), the same answer tokens scored, the same skips, and
the utility rankings agree: the same best passage per question and Spearman >= 0.9 over all pairs.
Skips (not fails) only when .venv-vllm is absent; `make test` builds it, so CI runs this.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _label_data import write_label_run
from scipy.stats import spearmanr

from uae_ray.config import LabelConfig
from uae_ray.data.schema import LABEL_REPORT, LABEL_SKIPPED, UTILITIES
from uae_ray.runtime import RunDir

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PER_PAIR_TOL = 0.3
MEAN_TOL = 0.1
LABEL = {"dtype": "bfloat16", "rows_per_batch": 8, "rows_per_part": 64,
         "pool": {"min_size": 1, "max_size": 1, "batch_size": 8}}


def _rows(rd: RunDir) -> dict[tuple[str, str], dict]:
    return {(r["qid"], r["pid"]): r for r in rd.read_table(UTILITIES).to_pylist()}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PY.exists(), reason=".venv-vllm is absent (make vllm-env builds it)")
def test_label_stage_vllm_and_hf_backends_agree(ray_session, tmp_path) -> None:
    import yaml

    from uae_ray.stages import label

    hf_rd, n_pairs = write_label_run(tmp_path / "hf", n_queries=4)
    shutil.copytree(tmp_path / "hf", tmp_path / "vllm")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"label": {**LABEL, "backend": "vllm"}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [str(VLLM_PY), "-m", "uae_ray.cli", "label", "--run-dir", str(tmp_path / "vllm"), "--config", str(config),
         "--num-cpus", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "MapBatches(vLLMEngineStageUDF)" in proc.stdout + proc.stderr  # the engines ran as Ray Data LLM's vLLM stage
    hf_report = label.run(LabelConfig(**LABEL), hf_rd)
    vllm_rd = RunDir(tmp_path / "vllm")
    v_report = json.loads((tmp_path / "vllm" / LABEL_REPORT).read_text())
    assert v_report["backend"] == "vllm" and hf_report["backend"] == "hf"
    for r in (v_report, hf_report):  # every pair labeled or skipped with its reason, none lost
        assert (r["pairs"], r["labeled"], r["skipped"], r["unaccounted"]) == (n_pairs, 12, {"empty_answer": 4}, 0)
    assert sorted(vllm_rd.read_table(LABEL_SKIPPED)["pid"].to_pylist()) == sorted(
        hf_rd.read_table(LABEL_SKIPPED)["pid"].to_pylist())

    v, h = _rows(vllm_rd), _rows(hf_rd)
    assert set(v) == set(h) and len(v) == 12
    keys = sorted(h)
    assert [v[k]["n_answer_tokens"] for k in keys] == [h[k]["n_answer_tokens"] for k in keys]  # same tokens scored
    measured = {}
    for column in ("logp_with", "logp_without"):
        diff = np.abs(np.array([v[k][column] for k in keys]) - np.array([h[k][column] for k in keys]))
        assert diff.max() <= PER_PAIR_TOL, f"{column}: per-pair differences {diff.round(3).tolist()}"
        assert diff.mean() <= MEAN_TOL, f"{column}: mean difference {diff.mean():.4f}"
        measured[column] = (round(float(diff.max()), 3), round(float(diff.mean()), 3))

    v_util = np.array([v[k]["utility"] for k in keys]).reshape(3, 4)  # keys sort as q0..q2 x p0..p3
    h_util = np.array([h[k]["utility"] for k in keys]).reshape(3, 4)
    assert v_util.argmax(1).tolist() == h_util.argmax(1).tolist() == [0, 1, 2]  # the gold passage, both backends
    rho = float(spearmanr(v_util.ravel(), h_util.ravel()).statistic)
    assert rho >= 0.9
    print(f"\nparity (max, mean |difference|): {measured}; max |d utility| {np.abs(v_util - h_util).max():.3f}; "
          f"Spearman {rho:.3f}; pairs/s vllm {v_report['this_run']['pairs_per_s']} "
          f"({v_report['this_run']['seconds']} s) hf {hf_report['this_run']['pairs_per_s']} "
          f"({hf_report['this_run']['seconds']} s)")


def test_answer_span_is_read_from_the_returned_prompt_ids() -> None:
    from uae_ray.labeling.vllm_scorer import _answer_span_mean

    ids = [5, 6, 7, 8]
    lps = [None, {6: {"logprob": -1.0}}, {7: {"logprob": -2.0}, 3: {"logprob": -0.1}}, {"8": {"logprob": -4.0}}]
    assert _answer_span_mean(2, ids, ids, lps) == (-3.0, 2)  # positions 2..3; a key through Arrow may be a string
    with pytest.raises(ValueError, match="differ from the 4 sent"):
        _answer_span_mean(2, ids, [5, 6, 7, 9], lps)
    with pytest.raises(ValueError, match="lack token 7 at position 2"):
        _answer_span_mean(2, ids, ids, [None, None, {3: {"logprob": -0.1}}, lps[3]])
    with pytest.raises(ValueError, match="3 prompt logprobs for 4 tokens"):
        _answer_span_mean(2, ids, ids, lps[:3])


def test_vllm_pass_groups_answers_and_reports_engine_errors_as_skips() -> None:
    """The driver side of one engine pass, fed engine results directly: a pair is labeled when all its answers are
    back (max aggregate), a pair the engine failed on is reported with its error (never dropped, never cached as a
    label), a pair without answers is skipped."""
    import pyarrow as pa

    from uae_ray.labeling.vllm_scorer import VLLMPass, pair_requests

    queries = pa.table({"qid": ["a", "b", "c"], "question": ["Qa?", "Qb?", "Qc?"],
                        "answers": [["x", "y"], ["z"], [" "]]})
    pending = pa.table({"qid": ["a", "b", "c"], "text": ["ta", "tb", "tc"], "fingerprint": ["fa", "fb", "fc"]})
    requests = pair_requests(pending, queries, "max")
    assert requests["answers"].to_pylist() == [["x", "y"], ["z"], []]
    rows = pa.table({"qid": ["a", "b", "c"], "pid": ["p", "p", "p"], "question": ["Qa?", "Qb?", "Qc?"],
                     "text": ["ta", "tb", "tc"], "answers": [["x", "y"], ["z"], []],
                     "base_logp": [[-3.0, -1.0], [-2.0], []], "base_n": [[2, 1], [1], []],
                     "fingerprint": ["fa", "fb", "fc"]})
    vp = VLLMPass(LabelConfig(backend="vllm", rows_per_part=64), {"version": "v", "settings": "s", "dtype": "bf16"},
                  requests)
    vp._results = iter([(0, 0, -1.0, 2, 10, ""), (1, 0, float("nan"), 0, 0, "EngineDeadError: boom"),
                        (0, 1, -0.5, 1, 9, "")])
    (chunk, errors), = list(vp.pairs(rows))
    assert errors == {"fb": "EngineDeadError: boom"}
    got = {r["fingerprint"]: r for r in chunk.to_pylist()}
    assert set(got) == {"fa", "fc"} and got["fc"]["skip_reason"] == "empty_answer"
    # answer x: -1.0 - -3.0 = 2.0 beats answer y: -0.5 - -1.0 = 0.5
    assert (got["fa"]["utility"], got["fa"]["n_answer_tokens"], got["fa"]["skip_reason"]) == (2.0, 2, "")
    assert sum(chunk["tokens"].to_pylist()) == 19
