"""The label stage on a real Ray cluster: report, skips, rerun, mismatch error, and kill-and-resume exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from uae_ray.config import LabelConfig
from uae_ray.data.schema import (
    CANDIDATES,
    CANDIDATES_SCHEMA,
    CORPUS,
    CORPUS_SCHEMA,
    LABEL_REPORT,
    LABEL_SKIPPED,
    QUERIES,
    QUERIES_SCHEMA,
    UTILITIES,
    UTILITIES_SCHEMA,
)
from uae_ray.runtime import RunDir

ROOT = Path(__file__).resolve().parent.parent
FACTS = [
    ("Marie Curie", "Who won Nobel prizes in both physics and chemistry?",
     "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911."),
    ("Canberra", "What is the capital of Australia?", "Canberra is the capital city of Australia."),
    ("Mount Everest", "What is the highest mountain on Earth?",
     "Mount Everest, in the Himalayas, is the highest mountain above sea level."),
    ("Jupiter", "Which is the largest planet in the Solar System?",
     "Jupiter is the largest planet in the Solar System, a gas giant."),
    ("Shakespeare", "Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("oxygen", "Which gas do plants release during photosynthesis?",
     "During photosynthesis plants take in carbon dioxide and release oxygen."),
]


def write_label_run(root: Path, n_queries: int, *, filler: int = 0) -> tuple[RunDir, int]:
    """Run dir with corpus, queries (the last has only empty answers) and candidates: every query x every passage."""
    rd = RunDir(root)
    pad = " It is a well known fact." * filler
    corpus = [{"pid": f"p{i}", "doc_id": f"d{i}", "title": "", "text": text + pad, "n_tokens": 20}
              for i, (_, _, text) in enumerate(FACTS)]
    rd.write_table(CORPUS, pa.Table.from_pylist(corpus, schema=CORPUS_SCHEMA))
    queries = []
    for i in range(n_queries):
        answer, question, _ = FACTS[i % len(FACTS)]
        answers = ["", " "] if i == n_queries - 1 else [answer]
        queries.append({"qid": f"q{i}", "doc_id": f"d{i % len(FACTS)}", "question": question, "answers": answers,
                        "gold_pids": [f"p{i % len(FACTS)}"], "split": "train"})
    rd.write_table(QUERIES, pa.Table.from_pylist(queries, schema=QUERIES_SCHEMA))
    cands = [{"qid": q["qid"], "pid": c["pid"], "rank": r, "base_score": 0.0, "is_gold": c["pid"] in q["gold_pids"]}
             for q in queries for r, c in enumerate(corpus[:4])]
    rd.write_table(CANDIDATES, pa.Table.from_pylist(cands, schema=CANDIDATES_SCHEMA))
    return rd, len(cands)


@pytest.mark.slow
def test_label_stage_report_skips_rerun_and_mismatch(ray_session, tmp_path) -> None:
    from uae_ray.stages import label

    rd, n_pairs = write_label_run(tmp_path / "run", n_queries=4)
    cfg = LabelConfig(rows_per_part=5, rows_per_batch=4, pool={"min_size": 1, "max_size": 1, "batch_size": 4})
    report = label.run(cfg, rd)
    util = rd.read_table(UTILITIES)
    assert util.schema == UTILITIES_SCHEMA
    assert report["pairs"] == n_pairs == 16
    assert report["labeled"] == util.num_rows == 12
    assert report["skipped"] == {"empty_answer": 4} and report["unaccounted"] == 0
    assert report["this_run"]["pairs_per_s"] > 0 and report["this_run"]["tokens_per_s"] > 0
    assert rd.read_json(LABEL_REPORT)["labeled"] == 12
    assert len(rd.listdir(UTILITIES)) >= 2  # several atomic parts
    keys = list(zip(util["qid"].to_pylist(), util["pid"].to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)
    # gold passages help: for each answerable query the gold passage has the highest utility
    rows = util.to_pylist()
    for q in ("q0", "q1", "q2"):
        best = max((r for r in rows if r["qid"] == q), key=lambda r: r["utility"])
        assert best["pid"] == f"p{q[1:]}", q
    # rerun: nothing pending, nothing written
    parts_before = rd.listdir(UTILITIES) + rd.listdir(LABEL_SKIPPED)
    again = label.run(cfg, rd)
    assert again["this_run"]["labeled"] == 0 and again["labeled"] == 12
    assert rd.listdir(UTILITIES) + rd.listdir(LABEL_SKIPPED) == parts_before
    # another prompt in the same run dir: a clear error, never mixed labels
    with pytest.raises(label.LabelMismatchError, match="never mix"):
        label.run(cfg.model_copy(update={"prompt": "qasper"}), rd)


@pytest.mark.slow
def test_label_killed_midway_resumes_exactly_once(tmp_path) -> None:
    """Start `uae-ray label` in a subprocess, SIGKILL its process group after the first part, rerun, count rows.

    The actor takes every CPU of the 2-CPU cluster: Ray Data must not need a CPU for anything else (it deadlocked
    with a repartition before the blocks were cut on the driver).
    """
    rd, n_pairs = write_label_run(tmp_path / "run", n_queries=8, filler=20)
    args = [sys.executable, "-m", "uae_ray.cli", "label", "--run-dir", rd.uri, "--num-cpus", "2",
            "--set", "rows_per_part=2", "--set", "rows_per_batch=2", "--set", "pool.max_size=1",
            "--set", "pool.num_cpus=2", "--set", "pool.batch_size=2", "--set", "dtype=float32"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    parts_dir = Path(rd.path(UTILITIES))
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if parts_dir.is_dir() and any(p.name.startswith("part-") for p in parts_dir.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"label exited early: {(tmp_path / 'first.log').read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its GCS and raylet; workers exit when the raylet dies
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    first = rd.read_table(UTILITIES).num_rows
    assert 0 < first < n_pairs - 4, f"the kill should land mid-run ({first} of {n_pairs - 4} labeled)"
    # SIGKILL may land inside a write: its temp file can stay, but only whole parts carry the name part-NNNNNN
    (parts_dir / ".part-999999.parquet.tmp-deadbeef").write_bytes(b"PAR1 half a part")  # as a killed write leaves
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not [p for p in parts_dir.iterdir() if not p.name.startswith("part-")]  # the rerun removed the temp files
    util = rd.read_table(UTILITIES)
    keys = Counter(zip(util["qid"].to_pylist(), util["pid"].to_pylist(), strict=True))
    skipped = rd.read_table(LABEL_SKIPPED)
    assert max(keys.values()) == 1, "a pair was labeled twice"
    assert util.num_rows + skipped.num_rows == n_pairs
    assert skipped.num_rows == 4 and set(skipped["reason"].to_pylist()) == {"empty_answer"}
    report = rd.read_json(LABEL_REPORT)
    assert report["labeled"] == n_pairs - 4 and report["this_run"]["labeled"] == n_pairs - 4 - first
