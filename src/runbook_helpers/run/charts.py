"""Matplotlib charts for the notebooks: fixed size and dpi, no timestamps, same data -> same picture.

Figures are built with matplotlib.figure.Figure (not pyplot, so nothing leaks into later cells or
depends on the kernel's backend) and returned as PNG images: a cell that returns one shows it in
JupyterLab, in papermill's output notebook and in the archived HTML alike. nbval ignores PNGs.
"""

from __future__ import annotations

import io

import pandas as pd
from IPython.display import Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE = (8.0, 4.0)
DPI = 100


def png(fig: Figure) -> Image:
    """The figure as PNG bytes without a software or date stamp, so equal data gives equal bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return Image(data=buffer.getvalue(), format="png")


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=SIZE, dpi=DPI)
    return fig, fig.add_subplot(1, 1, 1)


def row_counts(inventory: pd.DataFrame) -> Image:
    """Rows per spec table; core and shared in different colours; estimates hatched."""
    fig, ax = _figure()
    data = inventory.dropna(subset=["rows"]).sort_values("rows")
    colors = ["tab:blue" if k == "core" else "tab:gray" for k in data["kind"]]
    bars = ax.barh(data["table"], data["rows"].astype(float), color=colors)
    for bar, how, rows in zip(bars, data["counted"], data["rows"]):
        if how == "estimate":
            bar.set_hatch("//")
        ax.annotate(f" {int(rows):,}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
    ax.margins(x=0.12)
    ax.set_xlabel("rows (hatched: catalog estimate)")
    ax.set_title("Spec tables by row count (blue: core, grey: shared)")
    fig.tight_layout()
    return png(fig)


def tenancy_tables(counts: pd.DataFrame) -> Image:
    fig, ax = _figure()
    ax.bar(counts["table"], counts["rows"].astype(float), color="tab:green")
    for i, v in enumerate(counts["rows"]):
        ax.annotate(f"{int(v):,}", (i, v), ha="center", va="bottom")
    ax.set_ylabel("rows")
    ax.set_title("Tenancy tables after seed")
    fig.tight_layout()
    return png(fig)


def backfill_progress(progress: pd.DataFrame, summary: pd.DataFrame) -> Image:
    """Left: rows filled over time per batched table. Right: rows per table and strategy."""
    fig = Figure(figsize=(SIZE[0] * 1.5, SIZE[1]), dpi=DPI)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if len(progress):
        for label, part in progress.groupby("label", sort=True):
            xs = [0.0] + list(part["elapsed_s"])
            ys = [0] + list(part["rows_done"])
            left.plot(xs, ys, marker=".", label=label.replace("backfill ", ""))
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
    colors = {"fast default": "tab:blue", "batched": "tab:orange", "done": "tab:gray"}
    covered = summary["rows by default"].astype(float) if "rows by default" in summary else 0
    right.barh(summary["table"], covered, color=colors["fast default"], label="given by the catalog default (no write)")
    right.barh(summary["table"], summary["rows updated"].astype(float), left=covered, color=colors["batched"],
               label="written in batches")
    right.legend(fontsize=8)
    right.set_xlabel("rows")
    right.set_title("How each table's rows got their tenant")
    fig.tight_layout()
    return png(fig)


def step_durations(results: pd.DataFrame) -> Image:
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
    return png(fig)


UNTOUCHED_COUNT = "rows the application did not write: count unchanged"


def before_after(checks: pd.DataFrame, writes: pd.DataFrame | None = None) -> Image:
    """Per core table, the rows the application did not write: expected (from the record opened in backfill,
    or the baseline where there is none) vs now; the bars must match. The application's own writes during the
    rollout window are stacked on top of 'now', in their own colour."""
    fig, ax = _figure()
    counts = checks[checks["check"].isin([UNTOUCHED_COUNT, "row count equals baseline"])]
    counts = counts[counts["expected"].str.lstrip("-").str.isdigit()]
    x = list(range(len(counts)))
    ax.bar([i - 0.2 for i in x], counts["expected"].astype(float), width=0.4, label="expected", color="tab:gray")
    ax.bar([i + 0.2 for i in x], counts["actual"].astype(float), width=0.4, label="now",
           color=["tab:green" if p else "tab:red" for p in counts["passed"]])
    if writes is not None and len(writes):
        mine = writes.set_index("table")
        added = [float(mine.loc[t, "inserted"] + mine.loc[t, "updated"]) if t in mine.index else 0.0
                 for t in counts["table"]]
        if any(added):
            ax.bar([i + 0.2 for i in x], added, width=0.4, bottom=counts["actual"].astype(float),
                   label="written by the application", color="tab:orange")
    ax.set_xticks(x)
    ax.set_xticklabels(counts["table"], rotation=30, ha="right")
    ax.set_ylabel("rows")
    ax.legend()
    ax.set_title("Rows the application did not write: expected vs now (red: differs)")
    fig.tight_layout()
    return png(fig)


def rollout_window(writes: pd.DataFrame, assists: pd.DataFrame) -> Image:
    """What the application wrote during the rollout window, per table, and how many of those rows still
    needed the rollout trigger to get their tenant (what 06_finalize waits for to be zero)."""
    fig, ax = _figure()
    tables = list(assists["table"])
    w = writes.set_index("table") if len(writes) else pd.DataFrame()
    written = [float(w.loc[t, ["inserted", "updated", "deleted"]].sum()) if t in w.index else 0.0 for t in tables]
    needed = assists["writes that needed the trigger"].astype(float).tolist()
    y = list(range(len(tables)))
    if not any(written) and not any(needed):
        ax.text(0.5, 0.5, "no write of the application was recorded while the window was open", ha="center",
                va="center")
        ax.set_axis_off()
        fig.tight_layout()
        return png(fig)
    ax.barh([i + 0.2 for i in y], written, height=0.4, color="tab:blue", label="rows the application wrote")
    ax.barh([i - 0.2 for i in y], needed, height=0.4, color="tab:red",
            label="rows whose writes still needed the trigger (since the given time)")
    ax.set_yticks(y)
    ax.set_yticklabels(tables)
    ax.set_xlabel("rows")
    ax.set_title("The rollout window: the application's writes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def rows_per_tenant(counts: pd.DataFrame, top: int = 15) -> Image:
    """Rows per tenant across the core tables, stacked by table: the biggest tenants (the total of all of them is
    proven by validate's per-tenant sums)."""
    fig, ax = _figure()
    if counts.empty:
        ax.text(0.5, 0.5, "no tenant_id yet", ha="center", va="center")
        ax.set_axis_off()
        return png(fig)
    data = counts.assign(label=counts["tenant"].str.slice(0, 24) + " (" + counts["tenant_id"].astype(str) + ")")
    totals = data.groupby("label")["rows"].sum().sort_values(ascending=False)
    keep = list(totals.index[:top])
    data = data[data["label"].isin(keep)]
    pivot = data.pivot_table(index="label", columns="table", values="rows", aggfunc="sum", fill_value=0)
    pivot = pivot.loc[pivot.sum(axis=1).sort_values().index]
    left = pd.Series(0.0, index=pivot.index)
    for table in sorted(pivot.columns):
        ax.barh(pivot.index, pivot[table].astype(float), left=left, label=table)
        left += pivot[table]
    ax.set_xlabel("rows")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Rows per tenant after the migration: the {len(keep)} largest of {len(totals)} tenants")
    fig.tight_layout()
    return png(fig)


def backfill_pace(progress: pd.DataFrame, throttle=None) -> Image:
    """What paced the batched backfill, per batch: the signal (the canary's p99 commit latency against the
    budget), the choice (batch size, pause before each batch) and the outcome (rows/s; standby replay lag).
    `throttle`: the backfill.throttle params, for the budget and the lag bound lines."""
    budget_p99_ms = getattr(throttle, "budget_p99_ms", None)
    max_replica_lag_s = getattr(throttle, "max_replica_lag_s", None)
    fig = Figure(figsize=(SIZE[0] * 1.5, SIZE[1] * 2), dpi=DPI)
    signal, choice, outcome = (fig.add_subplot(3, 1, i) for i in (1, 2, 3))
    if not len(progress) or "batch_size" not in progress:
        signal.text(0.5, 0.5, "no batched backfill in this run", ha="center", va="center")
        for ax in (signal, choice, outcome):
            ax.set_axis_off()
        fig.tight_layout()
        return png(fig)
    label_col = "label" if "label" in progress else "table_name"
    pace_axis, lag_axis = choice.twinx(), None
    lags = progress["replica_lag_s"].astype(float) if "replica_lag_s" in progress else pd.Series(dtype=float)
    if lags.notna().any():
        lag_axis = outcome.twinx()
    for label, part in progress.groupby(label_col, sort=True):
        name = str(label).replace("backfill ", "")
        xs = part["elapsed_s"].astype(float)
        signal.plot(xs, part["canary_p99_ms"].astype(float), marker=".", label=name)
        choice.step(xs, part["batch_size"].astype(float), where="post", label=f"{name}: batch size")
        pace_axis.step(xs, part["pace_ms"].astype(float), where="post", linestyle="--", label=f"{name}: pace")
        rate = part["rows_done"].astype(float).diff() / xs.diff()
        outcome.plot(xs, rate.rolling(5, min_periods=1).mean(), label=f"{name}: rows/s")
        if lag_axis is not None:
            lag_axis.plot(xs, part["replica_lag_s"].astype(float), color="tab:red", linestyle=":",
                          label=f"{name}: replica lag")
    if budget_p99_ms is not None:
        signal.axhline(budget_p99_ms, color="tab:red", linestyle="--", label=f"budget {budget_p99_ms:g} ms")
    signal.set_ylabel("canary p99 ms")
    signal.set_title("Signal: the canary's p99 commit latency (last 2 s) against the application's budget")
    signal.legend(fontsize=7)
    choice.set_ylabel("rows per batch")
    pace_axis.set_ylabel("pause before each batch, ms")
    pace_axis.set_ylim(bottom=0)
    outcome.set_ylim(bottom=0)
    choice.set_title("Choice: batch size (solid) and pace (dashed)")
    choice.legend(fontsize=7, loc="upper left")
    pace_axis.legend(fontsize=7, loc="upper right")
    outcome.set_ylabel("rows/s")
    outcome.set_xlabel("seconds since the table's backfill started")
    outcome.set_title("Outcome: throughput" + (" and standby replay lag (dotted)" if lag_axis is not None else ""))
    outcome.legend(fontsize=7, loc="upper left")
    if lag_axis is not None:
        lag_axis.set_ylabel("replay lag s")
        if max_replica_lag_s is not None:
            lag_axis.axhline(max_replica_lag_s, color="tab:red", linewidth=0.8)
    fig.tight_layout()
    return png(fig)


def distribution_cost(cost: pd.DataFrame) -> Image:
    """What Citus copies per table (07_distribute's cost): distributed tables blue, reference tables grey."""
    fig, ax = _figure()
    data = cost[cost["table"] != "(all)"].sort_values("bytes")
    colors = ["tab:blue" if b.startswith("distributed") else "tab:gray" for b in data["becomes"]]
    bars = ax.barh(data["table"], data["bytes"].astype(float) / 1024, color=colors)
    for bar, size in zip(bars, data["size"]):
        ax.annotate(f" {size}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
    ax.margins(x=0.15)
    ax.set_xlabel("kB Citus copies (pg_total_relation_size; a reference table goes to every node)")
    ax.set_title("Data moved by distribution (blue: by tenant_id, grey: reference tables)")
    fig.tight_layout()
    return png(fig)
