"""Issue #15's results table: evaluate reports of one run dir, and archived per-query results of earlier runs, merged
into one table with paired intervals.

Each ``uae-ray evaluate`` output directory (``eval``, ``eval_answers``, ...) of the run dir holds its systems' stored
rankings (``rankings/<setting>__<system>.parquet``) and its on-demand utility labels. This script recomputes every
system's per-query Recall@1, MRR, MAP and ExpUtil@1 from them (the gold passages of ``queries.parquet``; ExpUtil@1 on
the queries that have labels: the evaluations' stated subset), checks them against each report's means (a system
evaluated twice must have identical rankings), and compares every system with each reference (``--compare-to``) on
their shared queries with :func:`uae_ray.eval.stats.compare_systems`: 95% paired-bootstrap interval, randomization p.
It also gives the share of the gold-only gain over base that each system reaches, (system - base) / (gold_only -
base), with a paired-bootstrap interval (``scipy.stats.bootstrap``, resampling queries jointly for the three systems).

Run dirs do not outlive a session, but their per-query results can: ``--archive`` writes ``<out>/per_query.parquet``
(system, qid, top-10 pids, the four metrics; kilobytes), and a later session passes it back with ``--with`` so its
systems are paired with new ones on the same queries (``queries.parquet`` must hold the same qids and gold: prepare
is deterministic). Writes ``<out>/table.json``, ``<out>/table.md`` and ``<out>/differences.png`` (every system minus
base, with intervals).

    python bench/qasper_table.py --run-dir runs/qasper_fulldev --evals eval eval_answers \
        --with bench/results/qasper_fulldev_14/per_query.parquet --out bench/results/qasper_fulldev_15 --archive
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uae_ray.data.schema import UTILITIES
from uae_ray.eval.report import retrieval_metrics
from uae_ray.eval.stats import CONFIDENCE, N_RESAMPLES, compare_systems, comparisons_markdown

RATIO_METRICS = ("recall@1", "mrr", "map")  # need no labels: recomputed from rankings + gold for every query
PAIRED_METRICS = (*RATIO_METRICS, "exputil@1")
ARCHIVE_DEPTH = 10

PerQuery = dict[str, dict[str, float | None]]  # qid -> metric -> value


def load_reports(run_dir: Path, evals: list[str], setting: str) -> tuple[
        dict[str, Any], dict[str, Path], dict[str, dict[str, list[str]]], list[str], list[dict[str, Any]]]:
    """(system -> report summary, system -> rankings dir, system -> qid -> ranked pids, the reports' compare_to
    references, the reports)."""
    reports: list[dict[str, Any]] = []
    systems: dict[str, Any] = {}
    where: dict[str, Path] = {}
    rankings: dict[str, dict[str, list[str]]] = {}
    references: list[str] = []
    for name in evals:
        report = json.loads((run_dir / name / "report.json").read_text())
        reports.append(report)
        block = report["settings"].get(setting)
        if block is None:
            raise SystemExit(f"{run_dir / name / 'report.json'}: no {setting!r} setting")
        references += [r for r in report.get("comparison_method", {}).get("references", []) if r not in references]
        for system, summary in block["systems"].items():
            ranking = _rankings(run_dir / name / "rankings", setting, system)
            if system in systems:
                _check_same_rankings(rankings[system], ranking,
                                     f"{system}: {where[system]} vs {run_dir / name / 'rankings'}")
                continue
            systems[system], where[system], rankings[system] = summary, run_dir / name / "rankings", ranking
    return systems, where, rankings, references, reports


def _rankings(rankings_dir: Path, setting: str, system: str) -> dict[str, list[str]]:
    rows = pq.read_table(rankings_dir / f"{setting}__{system}.parquet", columns=["qid", "pids"]).to_pylist()
    return {r["qid"]: list(r["pids"]) for r in rows}


def _check_same_rankings(a: dict[str, list[str]], b: dict[str, list[str]], what: str,
                         depth: int | None = None) -> None:
    differ = sum(a.get(q, [])[:depth] != ps[:depth] for q, ps in b.items())
    if differ or len(a) != len(b):
        raise SystemExit(f"{what}: rankings differ on {differ} of {len(b)} queries ({len(a)} vs {len(b)} queries)")


def stored_labels(run_dir: Path, reports: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """qid -> pid -> utility, as evaluate reads them: the label stage's ``utilities/`` and every evaluate output's
    on-demand labels (later files win), kept only on the reports' stated ExpUtil subset (``exp_util_max_queries``
    of the split's queries in evaluate's seed order; every query when None)."""
    from uae_ray.eval.runner import stable_order

    rules = {(r["config"]["split"], r["config"]["seed"], r["config"]["max_queries"],
              r["config"]["exp_util_max_queries"]) for r in reports}
    if len(rules) != 1:
        raise SystemExit(f"the evaluations state different ExpUtil subsets (split, seed, max_queries, "
                         f"exp_util_max_queries): {sorted(rules, key=str)}")
    split, seed, max_queries, max_util = rules.pop()
    q = pq.read_table(run_dir / "queries.parquet", columns=["qid", "split"]).to_pydict()
    qids = stable_order([x for x, s in zip(q["qid"], q["split"], strict=True) if s == split], seed)[:max_queries]
    subset = set(qids[:max_util])
    from uae_ray.stages.evaluate import ON_DEMAND

    paths = ([run_dir / UTILITIES] if (run_dir / UTILITIES).is_dir() else []) + \
        sorted(run_dir.glob(f"*/{ON_DEMAND}"))
    out: dict[str, dict[str, float]] = {}
    for path in paths:
        t = pq.read_table(path, columns=["qid", "pid", "utility"]).to_pydict()
        for qid, pid, u in zip(t["qid"], t["pid"], t["utility"], strict=True):
            if qid in subset:
                out.setdefault(qid, {})[pid] = float(u)
    return out


def per_query(ranking: dict[str, list[str]], gold: dict[str, set[str]],
              labels: dict[str, dict[str, float]]) -> PerQuery:
    """qid -> Recall@1, MRR, MAP (every query) and ExpUtil@1 (queries with labels whose top passage is labeled)."""
    out: PerQuery = {}
    for q, ps in ranking.items():
        if q not in gold:
            raise SystemExit(f"query {q!r} of a ranking is not in queries.parquet (another prepare?)")
        m = retrieval_metrics(ps, gold[q], labels.get(q), ks=[1], exp_util_ks=[1] if q in labels else [])
        out[q] = {k: m.get(k) for k in PAIRED_METRICS}
    return out


def check_means(name: str, rows: PerQuery, summary: dict[str, Any]) -> None:
    """The recomputed means must be the report's: retrieval exactly (same rankings, same gold), ExpUtil@1 within
    1e-3 nats (the same pair labeled by two evaluate outputs differs by float noise only)."""
    for metric, tol in (*((m, 1e-9) for m in RATIO_METRICS), ("exputil@1", 1e-3)):
        vals = [r[metric] for r in rows.values() if r[metric] is not None]
        if summary.get(metric) is None or not vals:
            if bool(vals) != (summary.get(metric) is not None):
                raise SystemExit(f"{name}: {metric} measured on {len(vals)} queries here, report: "
                                 f"{summary.get(metric)}")
            continue
        mean = float(np.mean(vals))
        if abs(mean - float(summary[metric])) > tol:
            raise SystemExit(f"{name}: {metric} recomputed {mean:.6f} on {len(vals)} queries, report "
                             f"{summary[metric]:.6f}")


def write_archive(path: Path, rankings: dict[str, dict[str, list[str]]], metrics: dict[str, PerQuery],
                  sources: dict[str, str]) -> None:
    """One row per (system, qid): source, top-``ARCHIVE_DEPTH`` pids and the paired metrics (None: unmeasured)."""
    cols: dict[str, list[Any]] = {"system": [], "source": [], "qid": [], "pids": [],
                                  **{m: [] for m in PAIRED_METRICS}}
    for name, by_q in rankings.items():
        for q in by_q:  # evaluate's query order: resampling from the archive reproduces the report's intervals
            cols["system"].append(name)
            cols["source"].append(sources[name])
            cols["qid"].append(q)
            cols["pids"].append(by_q[q][:ARCHIVE_DEPTH])
            for m in PAIRED_METRICS:
                cols[m].append(metrics[name][q][m])
    schema = pa.schema([("system", pa.string()), ("source", pa.string()), ("qid", pa.string()),
                        ("pids", pa.list_(pa.string())), *[(m, pa.float64()) for m in PAIRED_METRICS]])
    pq.write_table(pa.table(cols, schema=schema), path)


def read_archive(path: Path) -> tuple[dict[str, dict[str, list[str]]], dict[str, PerQuery], dict[str, str]]:
    """(system -> qid -> pids, system -> per-query metrics, system -> source) of a ``per_query.parquet``."""
    t = pq.read_table(path).to_pylist()
    rankings: dict[str, dict[str, list[str]]] = {}
    metrics: dict[str, PerQuery] = {}
    sources: dict[str, str] = {}
    for r in t:
        rankings.setdefault(r["system"], {})[r["qid"]] = list(r["pids"])
        metrics.setdefault(r["system"], {})[r["qid"]] = {m: r[m] for m in PAIRED_METRICS}
        sources[r["system"]] = r["source"]
    return rankings, metrics, sources


def gain_share(system: PerQuery, gold_only: PerQuery, base: PerQuery, metric: str,
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


def means(metrics: dict[str, PerQuery]) -> dict[str, dict[str, float | int | None]]:
    """system -> metric -> mean over the queries where it was measured, with ``<metric>_n``."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name, rows in metrics.items():
        out[name] = {"n_queries": len(rows)}
        for m in PAIRED_METRICS:
            vals = [r[m] for r in rows.values() if r[m] is not None]
            out[name][m] = float(np.mean(vals)) if vals else None
            out[name][f"{m}_n"] = len(vals)
    return out


def markdown(avg: dict[str, Any], sources: dict[str, str], comparisons: dict[str, Any], shares: dict[str, Any],
             gold_only: str) -> str:
    """The means, the paired differences against each reference and the gain shares."""
    out = ["| system | source | n | R@1 | MRR | MAP | ExpUtil@1 (n) |", "|---|---|---|---|---|---|---|"]
    for name, m in avg.items():
        cells = [f"{100 * m[k]:.1f}" for k in RATIO_METRICS]
        eu = f"{m['exputil@1']:.3f} ({m['exputil@1_n']})" if m["exputil@1"] is not None else "-"
        out.append(f"| {name} | {sources[name]} | {m['n_queries']} | " + " | ".join(cells) + f" | {eu} |")
    out += ["", "Paired differences, system minus reference (points; ExpUtil in nats): mean [95% paired bootstrap] "
            "randomization p; n: queries compared (ExpUtil@1 on its labeled subset).", "",
            comparisons_markdown(comparisons, order=list(avg)), ""]
    if shares:
        out += [f"Share of the gain of {gold_only} over base, (system - base) / ({gold_only} - base), 95% paired "
                "bootstrap:", "", "| system | " + " | ".join(RATIO_METRICS) + " |",
                "|---|" + "---|" * len(RATIO_METRICS)]
        for name, by_metric in shares.items():
            out.append(f"| {name} | " + " | ".join(
                f"{r['share']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" for r in by_metric.values()) + " |")
        undefined = {m: r["undefined_resamples"] for b in shares.values() for m, r in b.items()
                     if r["undefined_resamples"]}
        if undefined:
            out += ["", f"Resamples where {gold_only} - base = 0 (no ratio; left out of the interval): {undefined}"]
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
    ap.add_argument("--evals", nargs="*", default=["eval"])
    ap.add_argument("--with", dest="archives", nargs="*", type=Path, default=[],
                    help="per_query.parquet files of earlier runs: their systems join the table")
    ap.add_argument("--setting", default="pool")
    ap.add_argument("--compare-to", nargs="*", default=None, help="references (default: the reports' compare_to)")
    ap.add_argument("--gold-only", default="gold_only")
    ap.add_argument("--archive", action="store_true", help="write <out>/per_query.parquet")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    summaries, where, rankings, references, reports = load_reports(args.run_dir, args.evals, args.setting)
    queries = pq.read_table(args.run_dir / "queries.parquet", columns=["qid", "gold_pids"]).to_pylist()
    gold = {q["qid"]: set(q["gold_pids"]) for q in queries}
    labels = stored_labels(args.run_dir, reports) if reports else {}
    metrics = {s: per_query(rankings[s], gold, labels) for s in summaries}
    for s in summaries:
        check_means(s, metrics[s], summaries[s])
    sources = {s: f"{args.run_dir.name}/{where[s].parent.name}" for s in summaries}
    for path in args.archives:
        a_rank, a_metrics, a_sources = read_archive(path)
        for s in a_rank:
            if s in rankings:  # the same system (base, bm25) measured again: must rank identically
                _check_same_rankings(rankings[s], a_rank[s], f"{s}: {sources[s]} vs {path}", depth=ARCHIVE_DEPTH)
                continue
            missing = [q for q in a_metrics[s] if q not in gold]
            if missing:
                raise SystemExit(f"{path}: {s} has {len(missing)} queries not in {args.run_dir}/queries.parquet")
            recomputed = per_query(a_rank[s], gold, {})
            for q, r in a_metrics[s].items():  # the archive's retrieval metrics must follow from its pids and gold
                if any(abs(r[m] - recomputed[q][m]) > 1e-9 for m in RATIO_METRICS):
                    raise SystemExit(f"{path}: {s} query {q}: stored metrics differ from its pids with this gold")
            rankings[s], metrics[s], sources[s] = a_rank[s], a_metrics[s], a_sources[s]
    refs = [r for r in (args.compare_to if args.compare_to is not None else references) if r in metrics]
    comparisons = compare_systems(metrics, metrics=PAIRED_METRICS, references=refs)
    shares: dict[str, Any] = {}
    if args.gold_only in metrics and "base" in metrics:
        for s in metrics:
            if s not in ("base", args.gold_only):
                shares[s] = {m: gain_share(metrics[s], metrics[args.gold_only], metrics["base"], m)
                             for m in RATIO_METRICS}
    args.out.mkdir(parents=True, exist_ok=True)
    avg = means(metrics)
    text = markdown(avg, sources, comparisons, shares, args.gold_only)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps(
        {"run_dir": str(args.run_dir), "evals": args.evals, "archives": [str(p) for p in args.archives],
         "setting": args.setting, "means": avg, "sources": sources, "comparisons": comparisons,
         "gold_only": args.gold_only, "gain_share_of_gold_only": shares}, indent=1))
    if args.archive:
        write_archive(args.out / "per_query.parquet", rankings, metrics, sources)
    plot(comparisons, args.out / "differences.png")
    print(text)


if __name__ == "__main__":
    main()
