"""PNG plots of the report: Recall@k curves per system, and quality against per-query latency (log scale)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from uae_ray.eval.report import LLM_SYSTEMS, SYSTEM_ORDER, ordered_systems

_STYLE = {"uae": ("tab:red", "o"), "base": ("tab:blue", "s"), "infonce": ("tab:purple", "D"),
          "bm25": ("tab:gray", "v"), "reward_rerank": ("tab:green", "P"), "upr": ("tab:orange", "^"),
          "rankgpt": ("tab:brown", "X")}
# the extra dense students, in report order: colours and markers none of the built-in systems uses
_STUDENT_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "gold", "navy", "teal", "magenta", "darkred")
_STUDENT_MARKERS = ("*", "h", "p", "<", ">", "d", "H", "8")


def _styles(settings: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of every system of ``settings``: the built-in ones fixed, the extra students from the palette
    in their report order (the same in every plot and panel)."""
    names = ordered_systems(n for block in settings.values() for n in block.get("systems", {}))
    extra = [n for n in names if n not in SYSTEM_ORDER]
    out = {n: _STYLE[n] for n in names if n in _STYLE}
    for i, name in enumerate(extra):
        out[name] = (_STUDENT_COLORS[i % len(_STUDENT_COLORS)], _STUDENT_MARKERS[i % len(_STUDENT_MARKERS)])
    return out


def _decorate(ax: Any, which: str = "major") -> None:
    ax.grid(alpha=0.3, which=which)
    ax.legend(fontsize=8)


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def recall_curves(settings: Mapping[str, Any], ks: Sequence[int], out: Path) -> Path:
    """One panel per setting: Recall@k (%) against k for every system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(settings)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, (setting, block) in zip(axes[0], settings.items(), strict=True):
        systems = block.get("systems", {})
        for name in ordered_systems(systems):
            ys = [systems[name].get(f"recall@{k}") for k in ks]
            if any(y is None for y in ys):
                continue
            color, marker = styles[name]
            ax.plot(ks, [100 * y for y in ys], marker=marker, color=color, lw=2.5 if name == "uae" else 1.2,
                    label=f"{name} (n={systems[name]['n_queries']})")
        ax.set_xscale("log")
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("Recall@k (%)")
        ax.set_title(f"{setting} setting")
        _decorate(ax)
    return _save(fig, out)


def quality_vs_latency(settings: Mapping[str, Any], metric: str, out: Path) -> Path:
    """Per setting: ``metric`` against mean per-query latency (log x), on the LLM subset where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(settings)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, (setting, block) in zip(axes[0], settings.items(), strict=True):
        sub = block.get("llm_subset") or block
        systems = sub.get("systems", {})
        for name in ordered_systems(systems):
            m = systems[name]
            x, y = m["latency"]["mean_ms"], m.get(metric)
            if x is None or y is None:
                continue
            color, marker = styles[name]
            scale = 1.0 if metric.startswith("exputil") else 100.0
            ax.scatter([x], [scale * y], color=color, marker=marker, s=120 if name in ("uae", *LLM_SYSTEMS) else 60,
                       label=name, zorder=3)
            ax.annotate(name, (x, scale * y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("latency per query (ms, log scale)")
        ax.set_ylabel(metric + ("" if metric.startswith("exputil") else " (%)"))
        n = sub.get("n_queries")
        ax.set_title(f"{setting} setting" + (f" ({n} shared queries)" if n else ""))
        _decorate(ax, which="both")
    return _save(fig, out)


def calibration_deciles(section: Mapping[str, Any], out: Path) -> Path:
    """Reliability of the expected utility: measured against expected utility per score decile (stored calibration
    and cross-fitted), with the diagonal; marker size by the decile's pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = section["deciles"]
    measured = [r["measured"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sizes = [20 + 200 * r["n"] / max(r["n"] for r in rows) for r in rows]
    label = "stored calibration" + (" (in sample)" if section.get("in_sample") else "")
    ax.scatter([r["expected"] for r in rows], measured, s=sizes, color="tab:red", label=label, zorder=3)
    if all(r["expected_cv"] is not None for r in rows):
        ax.scatter([r["expected_cv"] for r in rows], measured, s=sizes, color="tab:blue", marker="s",
                   label="cross-fitted (5-fold by query)", zorder=3)
    values = measured + [r["expected"] for r in rows] + [r["expected_cv"] for r in rows if r["expected_cv"] is not None]
    lo, hi = min(values), max(values)
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="perfect calibration")
    for r in rows:
        ax.annotate(str(r["decile"]), (r["expected"], r["measured"]), textcoords="offset points", xytext=(5, 3),
                    fontsize=7)
    ax.set_xlabel("expected utility (nats), mean per score decile")
    ax.set_ylabel("measured utility (nats)")
    ax.set_title(f"{section.get('system', 'uae')}: {section.get('n_pairs')} labeled pairs, "
                 f"{section.get('n_queries')} queries")
    _decorate(ax)
    return _save(fig, out)
