"""bench/qasper_table.py: per-query results recomputed from evaluate's stored rankings and labels, archived, and
merged back in a later run with the same paired statistics as the reports."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_evaluate import _tiny_run_dir, _write_utilities

from uae_ray.config import EvaluateConfig, LabelConfig
from uae_ray.stages import evaluate

ROOT = Path(__file__).resolve().parents[1]


def _table_module():
    spec = importlib.util.spec_from_file_location("qasper_table", ROOT / "bench" / "qasper_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, monkeypatch: pytest.MonkeyPatch, *argv: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["qasper_table.py", *argv])
    mod.main()
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "table.json").read_text())


def test_table_reproduces_reports_and_pairs_archived_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rd, _, queries, utils = _tiny_run_dir(tmp_path / "run")
    label = LabelConfig()
    _write_utilities(rd, utils, label)
    common = dict(split="dev", label=label, settings=["pool"], ks=[1], exp_util_ks=[1], exp_util_max_queries=3,
                  generate=False, label_on_demand=False, compare_to=["base"])
    evaluate.run(EvaluateConfig(systems=["bm25", "base"], **common), rd)  # -> eval/
    evaluate.run(EvaluateConfig(systems=["base"], output="eval_b", **common), rd)
    report = json.loads((rd.local_path("eval") / "report.json").read_text())["settings"]["pool"]
    mod = _table_module()

    first = _run(mod, monkeypatch, "--run-dir", str(rd.root), "--evals", "eval", "--out", str(tmp_path / "t1"),
                 "--archive")
    # the same numbers as the report: means, and the paired differences (same query order, same seed)
    for metric in ("recall@1", "mrr", "map", "exputil@1"):
        assert first["means"]["bm25"][metric] == pytest.approx(report["systems"]["bm25"][metric], abs=1e-9)
        assert first["comparisons"]["base"]["bm25"][metric] == report["comparisons"]["base"]["bm25"][metric]
    assert first["means"]["base"]["exputil@1_n"] == 3 and first["means"]["base"]["n_queries"] == len(queries)
    archive = tmp_path / "t1" / "per_query.parquet"
    rows = pq.read_table(archive).to_pylist()
    assert {r["system"] for r in rows} == {"bm25", "base"} and len(rows) == 2 * len(queries)
    assert sum(r["exputil@1"] is not None for r in rows) == 2 * 3  # ExpUtil only on the stated subset

    # a later run evaluates base only; bm25 comes from the archive and is paired with it as before
    second = _run(mod, monkeypatch, "--run-dir", str(rd.root), "--evals", "eval_b", "--with", str(archive),
                  "--out", str(tmp_path / "t2"))
    assert second["sources"]["bm25"] == "run/eval" and second["sources"]["base"] == "run/eval_b"
    assert second["comparisons"] == first["comparisons"]

    # an archive whose base ranks differently from this run's base is refused, naming the system
    table = pq.read_table(archive)
    t = table.to_pylist()
    for r in t:
        if r["system"] == "base" and len(r["pids"]) > 1:
            r["pids"] = list(reversed(r["pids"]))
            break
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(t, schema=table.schema), bad)
    with pytest.raises(SystemExit, match=r"base: .*rankings differ on 1 of"):
        _run(mod, monkeypatch, "--run-dir", str(rd.root), "--evals", "eval_b", "--with", str(bad),
             "--out", str(tmp_path / "t3"))
