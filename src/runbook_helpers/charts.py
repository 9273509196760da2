"""Matplotlib figures for the notebooks: fixed size and dpi, no timestamps, same data -> same picture.

Figures are built with matplotlib.figure.Figure (not pyplot), so a cell that returns one shows it once
and nothing leaks into later cells. PNGs survive archives and nbval ignores them.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SIZE = (8.0, 4.0)
DPI = 100


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=SIZE, dpi=DPI)
    return fig, fig.add_subplot(1, 1, 1)


def row_counts(inventory: pd.DataFrame) -> Figure:
    """Rows per spec table; core and shared in different colours; estimates hatched."""
    fig, ax = _figure()
    data = inventory.dropna(subset=["rows"]).sort_values("rows")
    colors = ["tab:blue" if k == "core" else "tab:gray" for k in data["kind"]]
    bars = ax.barh(data["table"], data["rows"].astype(float), color=colors)
    for bar, how in zip(bars, data["counted"]):
        if how == "estimate":
            bar.set_hatch("//")
    ax.set_xlabel("rows (hatched: catalog estimate)")
    ax.set_title("Spec tables by row count (blue: core, grey: shared)")
    fig.tight_layout()
    return fig


def tenancy_tables(counts: pd.DataFrame) -> Figure:
    fig, ax = _figure()
    ax.bar(counts["table"], counts["rows"].astype(float), color="tab:green")
    for i, v in enumerate(counts["rows"]):
        ax.annotate(f"{int(v):,}", (i, v), ha="center", va="bottom")
    ax.set_ylabel("rows")
    ax.set_title("Tenancy tables after seed")
    fig.tight_layout()
    return fig


def backfill_progress(progress: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """Left: rows filled over time per batched table. Right: rows per table and strategy."""
    fig = Figure(figsize=(SIZE[0] * 1.5, SIZE[1]), dpi=DPI)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if len(progress):
        for label, part in progress.groupby("label", sort=True):
            left.plot(part["elapsed_s"], part["rows_done"], marker=".", label=label.replace("backfill ", ""))
            rate = part["rows_done"].iloc[-1] / max(part["elapsed_s"].iloc[-1], 1e-9)
            left.annotate(f"{rate:,.0f} rows/s", (part["elapsed_s"].iloc[-1], part["rows_done"].iloc[-1]),
                          ha="right", va="bottom", fontsize=8)
        left.legend(fontsize=8)
        left.set_xlabel("seconds")
        left.set_ylabel("rows filled")
        left.set_title("Batched backfill progress")
    else:
        left.text(0.5, 0.5, "no batched backfill in this run", ha="center", va="center")
        left.set_axis_off()
    colors = {"fast default": "tab:blue", "batched": "tab:orange", "default only": "tab:purple", "done": "tab:gray"}
    right.barh(summary["table"], summary["rows updated"].astype(float),
               color=[colors.get(s, "tab:gray") for s in summary["strategy"]])
    right.set_xlabel("rows updated (fast default rewrites none)")
    right.set_title("Rows written per table (orange: batched, blue: fast default)")
    fig.tight_layout()
    return fig


def step_durations(results: pd.DataFrame) -> Figure:
    """Seconds spent per table and statement kind in constrain."""
    fig, ax = _figure()
    if len(results) and results["seconds"].sum() > 0:
        pivot = results.pivot_table(index="table", columns="action", values="seconds", aggfunc="sum").fillna(0)
        pivot.plot.barh(stacked=True, ax=ax, legend=True)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("seconds")
        ax.set_title("Constrain: time per table and statement")
    else:
        ax.text(0.5, 0.5, "nothing to do: every table already constrained", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def before_after(checks: pd.DataFrame) -> Figure:
    """Baseline vs current row counts per core table: the bars must match."""
    fig, ax = _figure()
    counts = checks[checks["check"] == "row count equals baseline"]
    counts = counts[counts["expected"].str.isdigit()]
    x = range(len(counts))
    ax.bar([i - 0.2 for i in x], counts["expected"].astype(float), width=0.4, label="baseline", color="tab:gray")
    ax.bar([i + 0.2 for i in x], counts["actual"].astype(float), width=0.4, label="now",
           color=["tab:green" if p else "tab:red" for p in counts["passed"]])
    ax.set_xticks(list(x))
    ax.set_xticklabels(counts["table"], rotation=30, ha="right")
    ax.set_ylabel("rows")
    ax.legend()
    ax.set_title("Rows per core table: baseline vs now (red: differs)")
    fig.tight_layout()
    return fig
