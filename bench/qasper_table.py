"""Issue #15's results table: several evaluate reports of one run dir merged into one table with paired intervals.

Each ``uae-ray evaluate`` output directory (``eval``, ``eval_answers``, ...) of the run dir holds its systems' means
and paired comparisons (95% bootstrap interval, randomization p) against its ``compare_to`` references. This script
merges them (a system evaluated twice must have identical rankings: checked), prints one markdown table of means,
one of differences against each reference, and the share of the gold-only gain over base that each system reaches
(the issue's "within 90%" goal) with a paired-bootstrap interval recomputed from the stored per-query rankings
(``scipy.stats.bootstrap``, resampling queries jointly for the three systems). Writes ``<out>/table.json``,
``<out>/table.md`` and ``<out>/differences.png`` (every system minus base, with intervals).

    python bench/qasper_table.py --run-dir runs/qasper_fulldev --evals eval eval_answers \
        --out bench/results/qasper_fulldev
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from uae_ray.eval.report import markdown_table, ordered_systems, retrieval_metrics
from uae_ray.eval.stats import CONFIDENCE, N_RESAMPLES, comparisons_markdown

RATIO_METRICS = ("recall@1", "mrr", "map")  # need no labels: recomputed from rankings + gold for every query


def load_reports(run_dir: Path, evals: list[str], setting: str) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """(system -> summary, reference -> system -> metric -> difference, system -> rankings dir) over ``evals``."""
    systems: dict[str, Any] = {}
    comparisons: dict[str, dict[str, Any]] = {}
    where: dict[str, Path] = {}
    for name in evals:
        report = json.loads((run_dir / name / "report.json").read_text())
        block = report["settings"].get(setting)
        if block is None:
            raise SystemExit(f"{run_dir / name / 'report.json'}: no {setting!r} setting")
        for system, summary in block["systems"].items():
            if system in systems:
                _check_same_rankings(where[system], run_dir / name / "rankings", setting, system)
                continue
            systems[system], where[system] = summary, run_dir / name / "rankings"
        for ref, rows in block.get("comparisons", {}).items():
            for system, diffs in rows.items():
                comparisons.setdefault(ref, {}).setdefault(system, diffs)
    return systems, comparisons, where


def _check_same_rankings(a: Path, b: Path, setting: str, system: str) -> None:
    ra = pq.read_table(a / f"{setting}__{system}.parquet", columns=["qid", "pids"]).to_pylist()
    rb = pq.read_table(b / f"{setting}__{system}.parquet", columns=["qid", "pids"]).to_pylist()
    key = {r["qid"]: r["pids"] for r in ra}
    differ = sum(key.get(r["qid"]) != r["pids"] for r in rb)
    if differ or len(ra) != len(rb):
        raise SystemExit(f"{system}: rankings in {a} and {b} differ on {differ} of {len(rb)} queries")


def per_query(rankings_dir: Path, setting: str, system: str, gold: dict[str, set[str]]) -> dict[str, dict]:
    """qid -> label-free retrieval metrics of one system's stored ranking."""
    rows = pq.read_table(rankings_dir / f"{setting}__{system}.parquet", columns=["qid", "pids"]).to_pylist()
    return {r["qid"]: retrieval_metrics(r["pids"], gold[r["qid"]], None, ks=[1], exp_util_ks=[]) for r in rows}


def gain_share(system: dict[str, dict], gold_only: dict[str, dict], base: dict[str, dict], metric: str,
               seed: int = 0) -> dict[str, float | int | None]:
    """(system - base) / (gold_only - base) over shared queries, with a 95% paired-bootstrap percentile interval."""
    from scipy import stats

    qids = sorted(set(system) & set(gold_only) & set(base))
    s, g, b = (np.array([m[q][metric] for q in qids], dtype=np.float64) for m in (system, gold_only, base))

    def ratio(x: np.ndarray, y: np.ndarray, z: np.ndarray, axis: int = -1) -> np.ndarray:
        den = y.mean(axis=axis) - z.mean(axis=axis)
        return np.where(den != 0, (x.mean(axis=axis) - z.mean(axis=axis)) / np.where(den != 0, den, 1.0), np.nan)

    point = float(ratio(s, g, b))
    res = stats.bootstrap((s, g, b), ratio, paired=True, vectorized=True, confidence_level=CONFIDENCE,
                          n_resamples=N_RESAMPLES, method="percentile", rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution  # resamples where gold_only - base is 0 have no ratio: left out, counted
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = (float(np.nanpercentile(dist, q)) for q in (tail, 100 - tail))
    return {"n": len(qids), "share": point, "ci_low": low, "ci_high": high,
            "undefined_resamples": int(np.isnan(dist).sum())}


def markdown(systems: dict[str, Any], comparisons: dict[str, Any], shares: dict[str, Any]) -> str:
    """The means (the report's own table), the paired differences (the report's own) and the gain shares."""
    out = [markdown_table({"systems": systems}, ks=[1], exp_util_ks=[1], gen_cols=[]), "",
           "Paired differences, system minus reference (points; ExpUtil in nats): mean [95% paired bootstrap] "
           "randomization p; n: queries compared (ExpUtil@1 on its labeled subset).", "",
           comparisons_markdown(comparisons, order=ordered_systems(systems)), ""]
    if shares:
        out += ["Share of the gold-only gain over base (system - base) / (gold_only - base), 95% paired bootstrap:", "",
                "| system | " + " | ".join(RATIO_METRICS) + " |", "|---|" + "---|" * len(RATIO_METRICS)]
        for name, by_metric in shares.items():
            out.append(f"| {name} | " + " | ".join(
                f"{r['share']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" for r in by_metric.values()) + " |")
        undefined = {m: r["undefined_resamples"] for b in shares.values() for m, r in b.items()
                     if r["undefined_resamples"]}
        if undefined:
            out += ["", f"Resamples where gold_only - base = 0 (no ratio; left out of the interval): {undefined}"]
        out.append("")
    return "\n".join(out)


def plot(comparisons: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparisons.get("base", {})
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.5 * len(names) + 1.5), sharey=True)
    for ax, metric in zip(axes, RATIO_METRICS, strict=True):
        for i, name in enumerate(names):
            d = rows[name].get(metric, {})
            if d.get("diff") is None:
                continue
            err = [[100 * (d["diff"] - d["ci_low"])], [100 * (d["ci_high"] - d["diff"])]]
            ax.errorbar(100 * d["diff"], i, xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"{metric} minus base (points)")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()  # the table's order, top to bottom
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--evals", nargs="+", default=["eval"])
    ap.add_argument("--setting", default="pool")
    ap.add_argument("--gold-only", default="gold_only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    systems, comparisons, where = load_reports(args.run_dir, args.evals, args.setting)
    queries = pq.read_table(args.run_dir / "queries.parquet", columns=["qid", "gold_pids"]).to_pylist()
    gold = {q["qid"]: set(q["gold_pids"]) for q in queries}
    shares: dict[str, Any] = {}
    if args.gold_only in systems and "base" in systems:
        pq_of = {s: per_query(where[s], args.setting, s, gold) for s in systems}
        for s in systems:
            if s not in ("base", args.gold_only):
                shares[s] = {m: gain_share(pq_of[s], pq_of[args.gold_only], pq_of["base"], m) for m in RATIO_METRICS}
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(systems, comparisons, shares)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(
        {"run_dir": str(args.run_dir), "evals": args.evals, "setting": args.setting, "systems": systems,
         "comparisons": comparisons, "gain_share_of_gold_only": shares}, indent=1))
    plot(comparisons, args.out / "differences.png")
    print(text)


if __name__ == "__main__":
    main()
