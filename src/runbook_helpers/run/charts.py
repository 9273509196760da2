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
ROW_IN = 0.28        # inches per table row in the charts with one row per table: 30 tables stay legible
LEGEND_ROWS = 16     # entries per legend column before it wraps into another


def png(fig: Figure) -> Image:
    """The figure as PNG bytes without a software or date stamp, so equal data gives equal bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return Image(data=buffer.getvalue(), format="png")


def _figure(rows: int = 0, width: float = SIZE[0]) -> tuple[Figure, object]:
    """A figure with one axes, `rows` rows high (one per table) but never lower than SIZE; constrained layout
    keeps titles, labels and legends outside the axes inside the figure."""
    fig = Figure(figsize=(width, _height(rows)), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def _height(rows: int) -> float:
    return max(SIZE[1], 1.4 + ROW_IN * rows)


def _legend_right(ax, fontsize: int = 8, **kw) -> None:
    """The legend beside the axes, never over the data or the title (wrapping into columns when long)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  fontsize=fontsize, ncols=max(1, -(-len(labels) // LEGEND_ROWS)), **kw)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def row_counts(inventory: pd.DataFrame) -> Image:
    """Rows per spec table; core and shared in different colours; estimates hatched. On a log scale when
    the tables differ by orders of magnitude, so a 40-row shared table is a bar too, not a hairline."""
    data = inventory.dropna(subset=["rows"]).sort_values("rows")
    fig, ax = _figure(len(data))
    rows = data["rows"].astype(float)
    log = len(rows) > 1 and rows.max() > 50 * max(rows[rows > 0].min() if (rows > 0).any() else 1, 1)
    colors = ["tab:blue" if k == "core" else "tab:gray" for k in data["kind"]]
    base = 0.5 if log else 0.0
    bars = ax.barh(data["table"], [max(r - base, 0) for r in rows], left=base, color=colors)
    for bar, how, n in zip(bars, data["counted"], data["rows"]):
        if how == "estimate":
            bar.set_hatch("//")
        ax.annotate(f" {int(n):,}", (max(bar.get_x() + bar.get_width(), base), bar.get_y() + bar.get_height() / 2),
                    va="center", fontsize=8)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(left=base, right=max(rows.max(), 1) * 4)
    else:
        ax.margins(x=0.12)
    ax.set_xlabel("rows" + (" (log scale)" if log else "") + "; hatched: catalog estimate")
    ax.set_title("Spec tables by row count (blue: core, grey: shared)")
    return png(fig)


def tenancy_tables(counts: pd.DataFrame) -> Image:
    fig, ax = _figure()
    ax.bar(counts["table"], counts["rows"].astype(float), color="tab:green")
    for i, v in enumerate(counts["rows"]):
        ax.annotate(f"{int(v):,}", (i, v), ha="center", va="bottom")
    ax.margins(y=0.12)
    ax.set_ylabel("rows")
    ax.set_title("Tenancy tables after seed")
    return png(fig)


TENANT_SOURCES = ["had a tenant_id already", "the catalog default (no write)", "written in batches"]


def tenant_sources(summary: pd.DataFrame) -> pd.DataFrame:
    """Per core table, how its rows got the tenant they have now, each row counted once: written by the
    batches (the legacy mapping, or NULLs of a partly applied migration), else given by the column's default
    when backfill added it (no write), else already there. `rows by default` counts every row the default
    covered, the batches' rows included: those are counted as written, not twice."""
    rows = summary["rows (baseline)"].astype(int)
    updated = summary["rows updated"].astype(int)
    added = summary["rows by default"].astype(int) > 0
    rest = (rows - updated).clip(lower=0)
    return pd.DataFrame({"table": summary["table"],
                         TENANT_SOURCES[0]: rest.where(~added, 0),
                         TENANT_SOURCES[1]: rest.where(added, 0),
                         TENANT_SOURCES[2]: updated})


def backfill_progress(progress: pd.DataFrame, summary: pd.DataFrame) -> Image:
    """Top: rows filled over time per batched table (its rate in the legend). Bottom: one row per table, how
    its rows got their tenant (tenant_sources: each row once)."""
    sources = tenant_sources(summary)
    fig = Figure(figsize=(SIZE[0] * 1.25, SIZE[1] + _height(len(sources))), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[SIZE[1], _height(len(sources))])
    if len(progress):
        for label, part in progress.groupby("label", sort=True):
            rate = part["rows_done"].iloc[-1] / max(part["elapsed_s"].iloc[-1], 1e-9)
            top.plot([0.0] + list(part["elapsed_s"]), [0] + list(part["rows_done"]), marker=".",
                     label=f"{label.replace('backfill ', '')}: {rate:,.0f} rows/s")
        _legend_right(top)
        top.set_xlabel("seconds")
        top.set_ylabel("rows filled")
        top.set_title("Batched backfill progress")
    else:
        _empty(top, "no batched backfill in this run")
    left = pd.Series(0.0, index=sources.index)
    for name, colour in zip(TENANT_SOURCES, ["tab:gray", "tab:blue", "tab:orange"]):
        if not sources[name].any():
            continue
        bottom.barh(sources["table"], sources[name].astype(float), left=left, color=colour, label=name)
        left += sources[name].astype(float)
    _legend_right(bottom)
    bottom.set_xlabel("rows")
    bottom.set_title("How each table's rows got their tenant (each row once)")
    return png(fig)


# what a constrain step spends its time on, by the words of its action (first match wins)
STEP_KINDS = [
    ("row level security and grants", ("policy", "row level security", "security_invoker", "legacy role", "grant ",
                                       "create role")),
    ("composite keys (tenant_id, …)", ("unique (", "unique index", "_fk", "composite")),
    ("foreign key to tenants", ("foreign key",)),
    ("index on tenant_id", ("index",)),
    ("NOT NULL", ("not null", "check")),
    ("planner statistics", ("statistics",)),
]
OTHER_KIND = "other"


def step_kind(action: str) -> str:
    words = action.lower()
    return next((kind for kind, keys in STEP_KINDS if any(k in words for k in keys)), OTHER_KIND)


def step_kinds(results: pd.DataFrame) -> pd.DataFrame:
    """Seconds per table and kind of step (rows: tables, slowest last; columns: the kinds that occur)."""
    data = results.assign(table=results["table"].replace("", "(roles and grants)").fillna("(roles and grants)"),
                          kind=results["action"].map(step_kind))
    pivot = data.pivot_table(index="table", columns="kind", values="seconds", aggfunc="sum", fill_value=0.0)
    order = [k for k, _ in STEP_KINDS if k in pivot.columns] + ([OTHER_KIND] if OTHER_KIND in pivot.columns else [])
    pivot = pivot[order]
    return pivot.loc[pivot.sum(axis=1).sort_values(kind="stable").index]


def step_durations(results: pd.DataFrame) -> Image:
    """Seconds spent per table in constrain, one row per table, stacked by kind of step (a handful of
    kinds, however many constraints and policies a table gets)."""
    if not len(results) or results["seconds"].sum() <= 0:
        fig, ax = _figure()
        _empty(ax, "nothing to do: every table already constrained")
        return png(fig)
    pivot = step_kinds(results)
    fig, ax = _figure(len(pivot), width=SIZE[0] * 1.25)
    left = pd.Series(0.0, index=pivot.index)
    for kind in pivot.columns:
        ax.barh(pivot.index, pivot[kind], left=left, label=kind)
        left += pivot[kind]
    for y, total in enumerate(left):
        ax.annotate(f" {total:.2f} s", (total, y), va="center", fontsize=8)
    ax.margins(x=0.1)
    _legend_right(ax, title="kind of step")
    ax.set_xlabel("seconds")
    ax.set_title("Constrain: time per table, by kind of step")
    return png(fig)


UNTOUCHED_COUNT = "rows the application did not write: count unchanged"


def before_after(checks: pd.DataFrame, writes: pd.DataFrame | None = None) -> Image:
    """Per core table (one row each), the rows the application did not write: expected (from the record
    opened in backfill, or the baseline where there is none) vs now; the bars must match. The application's
    own writes during the rollout window are stacked after 'now', in their own colour."""
    counts = checks[checks["check"].isin([UNTOUCHED_COUNT, "row count equals baseline"])]
    counts = counts[counts["expected"].str.lstrip("-").str.isdigit()].iloc[::-1]
    fig, ax = _figure(2 * len(counts) // 3 + 1)
    y = list(range(len(counts)))
    ax.barh([i + 0.2 for i in y], counts["expected"].astype(float), height=0.4, label="expected", color="tab:gray")
    ax.barh([i - 0.2 for i in y], counts["actual"].astype(float), height=0.4, label="now",
            color=["tab:green" if p else "tab:red" for p in counts["passed"]])
    if writes is not None and len(writes):
        mine = writes.set_index("table")
        added = [float(mine.loc[t, "inserted"] + mine.loc[t, "updated"]) if t in mine.index else 0.0
                 for t in counts["table"]]
        if any(added):
            ax.barh([i - 0.2 for i in y], added, height=0.4, left=counts["actual"].astype(float),
                    label="written by the application", color="tab:orange")
    ax.set_yticks(y)
    ax.set_yticklabels(counts["table"])
    ax.set_xlabel("rows")
    _legend_right(ax)
    ax.set_title("Rows the application did not write: expected vs now (red: differs)")
    return png(fig)


def rollout_window(writes: pd.DataFrame, assists: pd.DataFrame) -> Image:
    """What the application wrote during the rollout window, per table, and how many of those rows still
    needed the rollout trigger to get their tenant (what 06_finalize waits for to be zero)."""
    tables = list(assists["table"])
    w = writes.set_index("table") if len(writes) else pd.DataFrame()
    written = [float(w.loc[t, ["inserted", "updated", "deleted"]].sum()) if t in w.index else 0.0 for t in tables]
    needed = assists["writes that needed the trigger"].astype(float).tolist()
    if not any(written) and not any(needed):
        fig, ax = _figure()
        ax.set_title("The rollout window: the application's writes")
        _empty(ax, "no write of the application was recorded while the window was open")
        return png(fig)
    fig, ax = _figure(2 * len(tables) // 3 + 1)
    y = list(range(len(tables)))
    ax.barh([i + 0.2 for i in y], written, height=0.4, color="tab:blue", label="rows the application wrote")
    ax.barh([i - 0.2 for i in y], needed, height=0.4, color="tab:red",
            label="rows whose writes still needed\nthe trigger (since the given time)")
    ax.set_yticks(y)
    ax.set_yticklabels(tables)
    ax.set_xlabel("rows")
    ax.set_title("The rollout window: the application's writes")
    _legend_right(ax)
    return png(fig)


def rows_per_tenant(counts: pd.DataFrame, top: int = 15) -> Image:
    """Rows per tenant across the core tables, stacked by table: the biggest tenants (the total of all of them is
    proven by validate's per-tenant sums)."""
    if counts.empty:
        fig, ax = _figure()
        _empty(ax, "no tenant_id yet")
        return png(fig)
    data = counts.assign(label=counts["tenant"].str.slice(0, 24) + " (" + counts["tenant_id"].astype(str) + ")")
    totals = data.groupby("label")["rows"].sum().sort_values(ascending=False)
    keep = list(totals.index[:top])
    data = data[data["label"].isin(keep)]
    pivot = data.pivot_table(index="label", columns="table", values="rows", aggfunc="sum", fill_value=0)
    pivot = pivot.loc[pivot.sum(axis=1).sort_values().index]
    fig, ax = _figure(len(pivot), width=SIZE[0] * 1.25)
    left = pd.Series(0.0, index=pivot.index)
    colours = _colours(len(pivot.columns))
    for table, colour in zip(sorted(pivot.columns), colours):
        ax.barh(pivot.index, pivot[table].astype(float), left=left, label=table, color=colour)
        left += pivot[table]
    ax.set_xlabel("rows")
    ax.tick_params(axis="y", labelsize=7)
    _legend_right(ax, fontsize=7, title="table")
    ax.set_title(f"Rows per tenant after the migration: the {len(keep)} largest of {len(totals)} tenants")
    return png(fig)


def _colours(n: int) -> list:
    """n distinguishable colours: matplotlib's ten, then tab20 and its neighbours for more tables."""
    from matplotlib import colormaps
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    names = ["tab20", "tab20b", "tab20c"]
    return [colormaps[names[(i // 20) % 3]](i % 20) for i in range(n)]


def backfill_pace(progress: pd.DataFrame, throttle=None) -> Image:
    """What paced the batched backfill, per batch: the signal (the canary's p99 commit latency against the
    budget), the choice (batch size, pause before each batch) and the outcome (rows/s; standby replay lag).
    `throttle`: the backfill.throttle params, for the budget and the lag bound lines. One colour per table in
    all three panels, named once in the legend beside them (however many tables)."""
    budget_p99_ms = getattr(throttle, "budget_p99_ms", None)
    max_replica_lag_s = getattr(throttle, "max_replica_lag_s", None)
    fig = Figure(figsize=(SIZE[0] * 1.5, SIZE[1] * 2), dpi=DPI, layout="constrained")
    signal, choice, outcome = fig.subplots(3, 1, sharex=True)
    if not len(progress) or "batch_size" not in progress:
        _empty(signal, "no batched backfill in this run")
        for ax in (choice, outcome):
            ax.set_axis_off()
        return png(fig)
    label_col = "label" if "label" in progress else "table_name"
    pace_axis, lag_axis = choice.twinx(), None
    lags = progress["replica_lag_s"].astype(float) if "replica_lag_s" in progress else pd.Series(dtype=float)
    if lags.notna().any():
        lag_axis = outcome.twinx()
    groups = list(progress.groupby(label_col, sort=True))
    for (label, part), colour in zip(groups, _colours(len(groups))):
        name = str(label).replace("backfill ", "")
        xs = part["elapsed_s"].astype(float)
        signal.plot(xs, part["canary_p99_ms"].astype(float), marker=".", color=colour, label=name)
        choice.step(xs, part["batch_size"].astype(float), where="post", color=colour)
        pace_axis.step(xs, part["pace_ms"].astype(float), where="post", linestyle="--", color=colour)
        if "batch_rows" in part and "batch_s" in part:  # each batch's own rate (a table of one batch is a dot)
            rate = part["batch_rows"].astype(float) / part["batch_s"].astype(float).clip(lower=1e-6)
        else:
            rate = part["rows_done"].astype(float).diff() / xs.diff()
        outcome.plot(xs, rate.rolling(5, min_periods=1).mean(), marker=".", color=colour)
        if lag_axis is not None:
            lag_axis.plot(xs, part["replica_lag_s"].astype(float), color=colour, linestyle=":")
    if budget_p99_ms is not None:
        signal.axhline(budget_p99_ms, color="tab:red", linestyle="--", label=f"budget {budget_p99_ms:g} ms")
    signal.set_ylabel("canary p99 ms")
    signal.set_title("Signal: the canary's p99 commit latency (last 2 s) against the application's budget")
    _legend_right(signal, fontsize=7, title="table")
    choice.set_ylabel("rows per batch")
    pace_axis.set_ylabel("pause before each batch, ms")
    pace_axis.set_ylim(bottom=0)
    outcome.set_ylim(bottom=0)
    choice.set_title("Choice: batch size (solid) and pace (dashed)")
    outcome.set_ylabel("rows/s")
    outcome.set_xlabel("seconds since the table's backfill started")
    outcome.set_title("Outcome: throughput" + (" and standby replay lag (dotted)" if lag_axis is not None else ""))
    if lag_axis is not None:
        lag_axis.set_ylabel("replay lag s")
        if max_replica_lag_s is not None:
            lag_axis.axhline(max_replica_lag_s, color="tab:red", linewidth=0.8)
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
