"""The label stage on a real Ray cluster: report, skips, rerun, and kill-and-resume exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from _label_data import write_label_run

from uae_ray.config import LabelConfig
from uae_ray.data.schema import LABEL_CACHE, LABEL_REPORT, LABEL_SKIPPED, UTILITIES, UTILITIES_VIEW_SCHEMA

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_label_stage_report_skips_and_rerun(ray_session, tmp_path) -> None:
    from uae_ray.stages import label

    rd, n_pairs = write_label_run(tmp_path / "run", n_queries=4)
    cfg = LabelConfig(rows_per_part=5, rows_per_batch=4, pool={"min_size": 1, "max_size": 1, "batch_size": 4})
    report = label.run(cfg, rd)
    util = rd.read_table(UTILITIES)
    assert util.schema == UTILITIES_VIEW_SCHEMA
    assert report["pairs"] == n_pairs == 16
    assert report["labeled"] == util.num_rows == 12
    assert report["skipped"] == {"empty_answer": 4} and report["unaccounted"] == 0
    assert report["this_run"]["pairs_per_s"] > 0 and report["this_run"]["tokens_per_s"] > 0
    assert rd.read_json(LABEL_REPORT)["labeled"] == 12
    assert len(rd.listdir(LABEL_CACHE)) >= 2  # several atomic cache parts
    keys = list(zip(util["qid"].to_pylist(), util["pid"].to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)
    # gold passages help: for each answerable query the gold passage has the highest utility
    rows = util.to_pylist()
    for q in ("q0", "q1", "q2"):
        best = max((r for r in rows if r["qid"] == q), key=lambda r: r["utility"])
        assert best["pid"] == f"p{q[1:]}", q
    # rerun: nothing pending, nothing labeled, the same view
    parts_before = rd.listdir(LABEL_CACHE)
    again = label.run(cfg, rd)
    assert again["this_run"]["labeled"] == 0 and again["labeled"] == 12
    assert again["reused"] == 16 and again["new"] == 0
    assert rd.listdir(LABEL_CACHE) == parts_before
    assert rd.read_table(UTILITIES).equals(util)


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
    parts_dir = Path(rd.path(LABEL_CACHE))
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
    # q6 asks what q0 asks (same question, answers and passages): 7 distinct contents x 4 passages, 4 of them skips
    distinct = 7 * 4
    first = rd.read_table(LABEL_CACHE).num_rows
    assert 0 < first < distinct - 4, f"the kill should land mid-run ({first} of {distinct - 4} labels)"
    assert not rd.exists(UTILITIES)  # the view is written at the end only
    # SIGKILL may land inside a write: its temp file can stay (readers skip dot files); the next run holds the run
    # dir's lease, so no other writer may be writing: every other writer's temp goes, old or fresh (without a lease
    # only old ones or a dead process's go: tests/test_storage.py)
    stale = parts_dir / ".part-x-999999.parquet.tmp-deadhost0000-1-deadbeef"  # <writer id>-<random>
    fresh = parts_dir / ".part-y-000000.parquet.tmp-otherhost123-1-cafe0000"
    for temp in (stale, fresh):
        temp.write_bytes(b"PAR1 half a part")  # as a killed write leaves it
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not stale.exists() and not fresh.exists()
    cache = rd.read_table(LABEL_CACHE)
    assert cache.num_rows == distinct and len(set(cache["fingerprint"].to_pylist())) == distinct, \
        "a pair was labeled twice"
    assert len({p.name.rsplit("-", 1)[0] for p in parts_dir.iterdir() if p.name.startswith("part-")}) == 2  # writers
    util = rd.read_table(UTILITIES)
    keys = Counter(zip(util["qid"].to_pylist(), util["pid"].to_pylist(), strict=True))
    skipped = rd.read_table(LABEL_SKIPPED)
    assert max(keys.values()) == 1, "a pair is in the view twice"
    assert util.num_rows + skipped.num_rows == n_pairs
    assert skipped.num_rows == 4 and set(skipped["reason"].to_pylist()) == {"empty_answer"}
    u = {(q, p): x for q, p, x in zip(util["qid"].to_pylist(), util["pid"].to_pylist(), util["utility"].to_pylist(),
                                      strict=True)}
    assert all(u[("q6", p)] == u[("q0", p)] for p in ("p0", "p1", "p2", "p3"))  # same content, one label
    report = rd.read_json(LABEL_REPORT)
    assert report["labeled"] == n_pairs - 4
    assert report["this_run"]["labeled"] + sum(report["this_run"]["skipped"].values()) == distinct - first
    assert report["reused"] + report["new"] == n_pairs and report["unaccounted"] == 0


@pytest.mark.slow
def test_two_concurrent_label_commands_one_is_refused_and_labels_exactly_once(tmp_path) -> None:
    """Two `uae-ray label` on one run dir (a second `uae-ray run`, a job resubmitted while the first still runs):
    the second is refused at once with the holder named, the first labels every pair exactly once."""
    rd, n_pairs = write_label_run(tmp_path / "run", n_queries=4)
    args = [sys.executable, "-m", "uae_ray.cli", "label", "--run-dir", rd.uri, "--num-cpus", "2",
            "--set", "rows_per_part=4", "--set", "pool.max_size=1", "--set", "pool.num_cpus=2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not rd.exists("_lease.json"):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        t0 = time.perf_counter()
        second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        refused_s = time.perf_counter() - t0
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    line = [ln for ln in second.stderr.splitlines() if ln.startswith("uae-ray label: ")]
    assert len(line) == 1 and "lease held" in line[0] and f"pid {first.pid}" in line[0], second.stderr[-2000:]
    assert refused_s < 30  # refused at once, without starting Ray or waiting for the holder
    util, skipped = rd.read_table(UTILITIES), rd.read_table(LABEL_SKIPPED)
    keys = list(zip(util["qid"].to_pylist(), util["pid"].to_pylist(), strict=True))
    keys += list(zip(skipped["qid"].to_pylist(), skipped["pid"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == n_pairs
    cache = rd.read_table(LABEL_CACHE)["fingerprint"].to_pylist()
    assert len(cache) == len(set(cache)), "a pair was labeled twice"
    writers = {p.name.rsplit("-", 1)[0] for p in Path(rd.path(LABEL_CACHE)).iterdir() if p.name.startswith("part-")}
    assert len(writers) == 1  # one writer wrote the cache
    assert not rd.exists("_lease.json")  # released when the first finished
