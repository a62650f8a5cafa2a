"""Per-query metrics from stored rankings, their means per system and setting, and report.json / report.md."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from uae_ray import metrics as M
from uae_ray.eval.stats import comparisons_markdown, format_difference

LLM_SYSTEMS = ("upr", "rankgpt")
SYSTEM_ORDER = ("bm25", "base", "infonce", "uae", "reward_rerank", "upr", "rankgpt")


def ordered_systems(names: Iterable[str]) -> list[str]:
    """``names`` in report order: the built-in systems as :data:`SYSTEM_ORDER` has them, with every other name (the
    extra dense students, in their given order) right after the built-in dense students."""
    names = list(dict.fromkeys(names))
    extra = [n for n in names if n not in SYSTEM_ORDER]
    out = []
    for s in SYSTEM_ORDER:
        if s in names:
            out.append(s)
        if s == "uae":
            out += extra
    return out


def utilities_by_query(table: pa.Table | None) -> dict[str, dict[str, float]]:
    """qid -> pid -> utility, from a utilities table (later rows win)."""
    out: dict[str, dict[str, float]] = {}
    if table is None:
        return out
    for q, p, u in zip(table.column("qid").to_pylist(), table.column("pid").to_pylist(),
                       table.column("utility").to_pylist(), strict=True):
        out.setdefault(str(q), {})[str(p)] = float(u)
    return out


def retrieval_metrics(ranking: Sequence[str], gold: set[str], labels: Mapping[str, float] | None, *,
                      ks: Sequence[int], exp_util_ks: Sequence[int]) -> dict[str, float | None]:
    """Every retrieval metric of one query's ranking.

    ``ndcg@10`` is graded by utility where the query has labels (else binary gold, as ``ndcg@10_gold``);
    ``exputil@k`` is None when a top-k passage has no label.
    """
    out: dict[str, float | None] = {f"recall@{k}": M.recall_at_k(ranking, gold, k) for k in ks}
    out["mrr"] = M.reciprocal_rank(ranking, gold)
    out["map"] = M.average_precision(ranking, gold)
    out["ndcg@10_gold"] = M.ndcg_at_k(ranking, M.binary_gains(gold), 10)
    out["ndcg@10"] = M.ndcg_at_k(ranking, M.utility_gains(labels), 10) if labels else out["ndcg@10_gold"]
    for k in exp_util_ks:
        try:
            out[f"exputil@{k}"] = M.exp_util_at_k(ranking, labels or {}, k)
        except KeyError:
            out[f"exputil@{k}"] = None
    return out


def summarize(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> dict[str, Any]:
    """Means over queries of each metric (queries where a metric is None are left out and counted)."""
    out: dict[str, Any] = {"n_queries": len(rows)}
    for name in metric_names:
        vals = [float(r[name]) for r in rows if r.get(name) is not None]
        out[name] = M.mean(vals)
        if len(vals) != len(rows):
            out[f"{name}_n"] = len(vals)
    return out


def speedups(setting_block: Mapping[str, Any], student: str = "uae") -> dict[str, float]:
    """Per-query latency ratio (mean) of each LLM re-ranker over ``student`` in one setting's systems."""
    systems = setting_block.get("systems", {})
    if student not in systems:
        return {}
    base = systems[student]["latency"]["mean_ms"]
    out = {}
    for name in LLM_SYSTEMS:
        if name in systems and base:
            out[name] = systems[name]["latency"]["mean_ms"] / base
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.3f}"
    return str(v)


def markdown_table(block: Mapping[str, Any], ks: Sequence[int], exp_util_ks: Sequence[int],
                   gen_cols: Sequence[str]) -> str:
    """One setting's systems as a GitHub table (Recall/MRR/MAP/nDCG in %, ExpUtil in nats, latency in ms)."""
    cols = [f"recall@{k}" for k in ks] + ["mrr", "map", "ndcg@10"] + [f"exputil@{k}" for k in exp_util_ks]
    head = ["system", "n", *[c.replace("recall", "R") for c in cols], *gen_cols, "ms/query"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    systems = block.get("systems", {})
    for name in ordered_systems(systems):
        m = systems[name]
        cells = [name, str(m["n_queries"])]
        cells += [_fmt(m.get(c), pct=not c.startswith("exputil")) for c in cols]
        cells += [_fmt(m.get("generation", {}).get(c), pct=True) for c in gen_cols]
        cells.append(_fmt(m["latency"]["mean_ms"]) if m["latency"]["mean_ms"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: a header with the data and models, a table per setting, the LLM-subset tables and speed-ups."""
    ks, eks = report["ks"], report["exp_util_ks"]
    gen_cols = report.get("generation_columns", [])
    ds = report["dataset"]
    out = [
        f"# UAE evaluation: {ds['run_dir']} ({report['split']} split)",
        "",
        f"{ds['queries']} queries, {ds['passages']} passages in {ds['documents']} documents; open scope: "
        f"{report['open_scope']}. Generator: {report['models'].get('generator')}; base encoder: "
        f"{report['models'].get('base')}. Recall/MRR/MAP/nDCG/F1/ROUGE-L in %, ExpUtil in nats (mean utility of the "
        "top-k passages), latency in ms per query (one query at a time, this machine).",
        "",
    ]
    subset = report.get("labels", {}).get("exp_util_subset")
    if subset is not None and subset < ds["queries"]:
        out += [f"ExpUtil on a stated subset: the first {subset} of the {ds['queries']} queries (seed "
                f"{report.get('seed')}'s order), every system's top-k labeled on demand; the others have none "
                "(n in the paired differences).", ""]
    for setting, block in report["settings"].items():
        out += [f"## {setting} setting", "", markdown_table(block, ks, eks, gen_cols), ""]
        for name, reason in block.get("skipped", {}).items():
            out.append(f"- skipped `{name}`: {reason}")
        sub = block.get("llm_subset")
        if sub:
            out += ["", f"Same {sub['n_queries']} queries for every system (the LLM re-rankers' subset):", "",
                    markdown_table(sub, ks, eks, []), ""]
        for key, who in (("speedup_vs_llm", "UAE"), ("speedup_base_vs_llm", "the base encoder")):
            sp = block.get(key, {})
            if sp:
                out.append(f"Speed-up of {who} per query (mean latency ratio, same run): "
                           + ", ".join(f"{v:.0f}x over {k}" for k, v in sp.items()) + "  ")
        if block.get("rankgpt_parse"):
            out.append(f"RankGPT permutation parsing (windows): {block['rankgpt_parse']}  ")
        comps = block.get("comparisons")
        if comps:
            method = report.get("comparison_method", {})
            out += ["", "Paired differences (system minus reference, on the queries both have; points for "
                    "Recall/MRR/MAP, nats for ExpUtil): mean [" + method.get("interval", "95% interval") + "], "
                    "p: " + method.get("p_value", "paired test") + ". n: queries compared.", "",
                    comparisons_markdown(comps, ordered_systems(n for b in comps.values() for n in b)), ""]
        reused = {n: b["reranks_reused"] for n, b in block["systems"].items() if b.get("reranks_reused")}
        if reused:
            out.append("Re-rankings reused from an identical (question, base top K) of an earlier setting, charged "
                       f"their measured time: {reused}")
        out.append("")
    out += calibration_markdown(report.get("calibration") or {})
    for name in report.get("plots", []):
        out.append(f"![{name}]({name})")
    return "\n".join(out) + "\n"


def calibration_markdown(section: Mapping[str, Any]) -> list[str]:
    """report.md lines: the expected-utility calibration per score decile and adaptive k against fixed k."""
    if not section:
        return []
    out = ["## Expected utility per hit: calibration and adaptive k", ""]
    if section.get("skipped"):
        return [*out, f"Not measured: {section['skipped']}", ""]
    out += [f"Calibration of `{section['system']}`: {section['calibration']}, fitted on {section['fit_source']} "
            f"({section['fit_pairs']} pairs). Checked on {section.get('n_pairs')} labeled pairs of "
            f"{section.get('n_queries')} evaluated queries"
            + (" (the same split it was fitted on: the stored column is in sample; the cross-fitted column, an "
               "isotonic fit on the other folds' queries, is the out-of-sample check)" if section.get("in_sample")
               else "") + f"; Spearman(score, utility) {_fmt(section.get('spearman_score_utility'))}, "
            f"mean absolute error {_fmt(section.get('mae_expected'))} (stored), "
            f"{_fmt(section.get('mae_expected_cv'))} (cross-fitted) nats.", ""]
    if section.get("deciles"):
        out += ["| score decile | cosine range | n | expected (stored) | expected (cross-fitted) | measured |",
                "|---|---|---|---|---|---|"]
        for r in section["deciles"]:
            out.append(f"| {r['decile']} | {r['score_min']:.3f} .. {r['score_max']:.3f} | {r['n']} | "
                       f"{_fmt(r['expected'])} | {_fmt(r['expected_cv'])} | {_fmt(r['measured'])} |")
        out.append("")
    for setting, block in section.get("adaptive_k", {}).items():
        out += [f"Adaptive k ({setting} setting): per query, the longest prefix of `{section['system']}`'s top "
                f"{block['k_max']} whose expected utility clears a floor (`choose_k`), the floor set so that the mean "
                f"k matches the fixed k (never tuned on the outcome); a query left with k = 0 counts 0 nats. "
                "Where the calibration's plateaus keep the mean k off the integer, the fixed budget of the same mean "
                "k is each query's fixed-k ExpUtil interpolated there (column \"fixed @ mean k\"); Δ ExpUtil is "
                "adaptive minus that; F1 is against the integer fixed k. "
                f"ExpUtil on the {block['n_queries']} queries whose top {block['k_max']} are labeled "
                f"({block['left_out_unlabeled']} left out); Token F1 on those of them with generated answers (n F1). "
                "Differences: 95% paired-bootstrap interval, randomization-test p.", "",
                "| fixed k | floor (nats) | mean k | k = 0 | ExpUtil fixed | ExpUtil fixed @ mean k | "
                "ExpUtil adaptive | Δ ExpUtil | n F1 | F1 fixed | F1 adaptive | Δ F1 |", "|" + "---|" * 12]
        for r in block["rows"]:
            out.append(f"| {r['fixed_k']} | {r['floor']:.3f} | {r['mean_k']:.2f} | {100 * r['k0_share']:.0f}% | "
                       f"{_fmt(r['exputil_fixed'])} | {_fmt(r['exputil_fixed_at_mean_k'])} | "
                       f"{_fmt(r['exputil_adaptive'])} | "
                       f"{format_difference(r['exputil_diff'], scale=1.0, digits=3)} | {r.get('f1_n', 0)} | "
                       f"{_fmt(r.get('f1_fixed'), pct=True)} | {_fmt(r.get('f1_adaptive'), pct=True)} | "
                       f"{format_difference(r['f1_diff']) if r.get('f1_diff') else '-'} |")
        out.append("")
    return out
