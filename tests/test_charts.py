"""The notebooks' charts stay readable: the data behind them counts each row once, and their geometry holds at
the demo's size and at 40 core tables (every title, label and legend inside the figure; no legend over the data or a
title; no tick labels on top of each other; every non-empty bar visible). The frames are the real phases' output
on a fresh copy of the test template (the legacy mapping on, so both backfill strategies run), and for many
tables the same frames with every table repeated under other names."""

import uuid

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from conftest import LEGACY_ON, Db, create_database, drop_database
from runbook_helpers import params as params_mod
from runbook_helpers.phases import validate
from runbook_helpers.run import charts

COPIES = 5  # the "many tables" case: every table five times, 40 core tables (the demo has 8, and one shared)


@pytest.fixture(scope="module")
def outputs(server, template, ci_params):
    """Every phase's frames, in-process, on one database for the module."""
    name = f"c_{uuid.uuid4().hex[:12]}"
    create_database(server, name, template)
    db = Db(server, name, params_mod.override(ci_params, LEGACY_ON))
    try:
        out = db.run("inspect", "seed", "backfill", "constrain", "validate")
        with db.session("validate", dry_run=True) as rb:
            out["validate"]["rows per tenant"] = validate.rows_per_tenant(rb)
        out["db"] = db
        out["rows"] = {t: db.scalar(f"SELECT count(*) FROM {t}") for t in db.params.tables}
        yield out
    finally:
        drop_database(server, name)


def figure(chart, *args):
    """The matplotlib figure a chart function draws (charts.png, which turns it into the PNG, intercepted)."""
    caught = []
    real = charts.png
    charts.png = lambda fig: caught.append(fig) or fig
    try:
        chart(*args)
    finally:
        charts.png = real
    return caught[-1]


def _boxes(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return renderer


def layout_problems(fig) -> list[str]:
    """What makes a figure unreadable and can be measured, after drawing it."""
    renderer = _boxes(fig)
    page = fig.bbox
    problems, texts = [], []

    def inside(box, what):
        if box.x0 < page.x0 - 1 or box.y0 < page.y0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1:
            problems.append(f"{what} outside the figure: {box} not in {page}")

    plots = [ax for ax in fig.axes if ax.axison]
    for ax in fig.axes:
        title = ax.title.get_text() and ax.title.get_window_extent(renderer)
        if title:
            inside(title, f"title {ax.title.get_text()!r}")
            texts.append((f"title {ax.title.get_text()!r}", title))
        legend = ax.get_legend()
        if legend is not None:
            box = legend.get_window_extent(renderer)
            inside(box, "legend")
            for other in plots:
                if box.overlaps(other.get_window_extent(renderer)):
                    problems.append(f"legend over the plot of {other.get_title()!r}")
            texts.append(("legend", box))
        if not ax.axison:
            continue
        if ax.get_window_extent(renderer).height < 60:
            problems.append(f"plot {ax.get_title()!r} squashed to {ax.get_window_extent(renderer).height:.0f} px")
        for axis, name in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            low, high = sorted(axis.get_view_interval())
            labels = [t for loc, t in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
                      if t.get_text() and t.get_visible() and low - 1e-9 <= loc <= high + 1e-9]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for t, b in zip(labels, boxes):
                inside(b, f"{name} tick label {t.get_text()!r}")
            for i in range(len(boxes) - 1):
                if boxes[i].overlaps(boxes[i + 1]):
                    problems.append(f"{name} tick labels {labels[i].get_text()!r} and {labels[i + 1].get_text()!r} "
                                    f"overlap")
            if axis.label.get_text():
                inside(axis.label.get_window_extent(renderer), f"{name} label")
                texts.append((f"{name} label {axis.label.get_text()!r}", axis.label.get_window_extent(renderer)))
    for i, (a, box_a) in enumerate(texts):
        for b, box_b in texts[i + 1:]:
            if (a.startswith("title") or b.startswith("title") or a == b == "legend") and box_a.overlaps(box_b):
                problems.append(f"{a} overlaps {b}")
    return problems


def bar_widths(ax) -> dict[str, float]:
    """The summed width of the horizontal bars on each row of `ax`, by its tick label."""
    names = {round(t): label.get_text() for t, label in zip(ax.get_yticks(), ax.get_yticklabels())}
    out: dict[str, float] = {}
    for patch in ax.patches:
        row = names[round(patch.get_y() + patch.get_height() / 2)]
        out[row] = out.get(row, 0.0) + patch.get_width()
    return out


def many(frame: pd.DataFrame, column: str = "table") -> pd.DataFrame:
    """The frame with each table repeated under COPIES names (the first its own; "" stays "")."""
    return pd.concat([frame.assign(**{column: frame[column].map(lambda t, i=i: f"{t}_{i}" if i and t else t)})
                      for i in range(COPIES)], ignore_index=True)


def all_figures(out, scale=lambda f, column="table": f):
    report = out["backfill"]["report"]
    progress = scale(report.progress.assign(table=report.progress["label"]), "table").assign(
        label=lambda f: f["table"])
    checks = out["validate"]["checks"]
    tenants = out["validate"]["rows per tenant"]
    assists = pd.DataFrame({"table": list(out["db"].params.tables), "writes that needed the trigger": 3})
    writes = pd.DataFrame({"table": assists["table"], "inserted": 5, "updated": 2, "deleted": 1})
    return {
        "row_counts": figure(charts.row_counts, scale(out["inspect"]["inventory"])),
        "backfill_progress": figure(charts.backfill_progress, progress, scale(report.summary)),
        "backfill_pace": figure(charts.backfill_pace, progress, out["db"].params.backfill.throttle),
        "step_durations": figure(charts.step_durations, scale(out["constrain"]["applied"])),
        "before_after": figure(charts.before_after, scale(checks), scale(writes)),
        "rows_per_tenant": figure(charts.rows_per_tenant, scale(tenants)),
        "rollout_window": figure(charts.rollout_window, scale(writes), scale(assists)),
    }


def test_how_each_tables_rows_got_their_tenant_counts_each_row_once(outputs):
    report = outputs["backfill"]["report"]
    fig = figure(charts.backfill_progress, report.progress, report.summary)
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    ax = next(a for a in fig.axes if a.get_title().startswith("How each table's rows got their tenant"))
    assert bar_widths(ax) == {t: float(n) for t, n in outputs["rows"].items()}
    summary = outputs["backfill"]["report"].summary.set_index("table")
    assert summary.loc["workflows", "rows updated"] > 0 and summary.loc["workflows", "rows by default"] > 0


def test_every_constrain_step_has_a_kind_and_the_chart_has_one_row_per_table(outputs):
    applied = outputs["constrain"]["applied"]
    assert len(set(applied["action"])) > 20  # the legend of the old chart named each of them
    assert [a for a in set(applied["action"]) if charts.step_kind(a) == charts.OTHER_KIND] == []
    kinds = charts.step_kinds(applied)
    assert len(kinds.columns) <= len(charts.STEP_KINDS)
    assert kinds.sum().sum() == pytest.approx(applied["seconds"].sum())
    assert set(kinds.index) == set(applied["table"].replace("", "(roles and grants)"))


def test_a_40_row_shared_table_is_a_visible_bar(outputs):
    fig = figure(charts.row_counts, outputs["inspect"]["inventory"])
    renderer = _boxes(fig)
    ax = fig.axes[0]
    widths = {label.get_text(): patch.get_window_extent(renderer).width
              for label, patch in zip(ax.get_yticklabels(), ax.patches)}
    assert min(widths.values()) >= 3, widths  # pixels; node_types has 40 rows beside rules' 3,000


def test_every_chart_is_readable_at_the_demo_size(outputs):
    problems = {name: layout_problems(fig) for name, fig in all_figures(outputs).items()}
    assert {name: p for name, p in problems.items() if p} == {}, "\n".join(
        f"{n}: {x}" for n, p in problems.items() for x in p)


def test_every_chart_is_readable_at_40_core_tables(outputs):
    problems = {name: layout_problems(fig) for name, fig in all_figures(outputs, many).items()}
    assert {name: p for name, p in problems.items() if p} == {}, "\n".join(
        f"{n}: {x}" for n, p in problems.items() for x in p)
