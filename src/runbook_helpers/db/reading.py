"""DataFrames of findings shown for reading: long texts whole, wrapped and left-aligned inside the output's width.

JupyterLab right-aligns a DataFrame's cells and lets a wide table run off the right edge (readiness's "what to do"
column was cut off there); inline styles look the same in Lab and in the archive's HTML (nbconvert).
"""

from __future__ import annotations

import html

import pandas as pd

_CELL = "text-align:left;vertical-align:top;white-space:pre-wrap;overflow-wrap:anywhere;padding:0.3em 0.5em;"


def reading_html(frame: pd.DataFrame) -> str:
    """The frame as a table that fits the output's width, every cell whole and left-aligned."""
    head = "".join(f'<th style="{_CELL}font-weight:bold">{html.escape(str(c))}</th>' for c in ["", *frame.columns])
    rows = "".join(
        '<tr style="border-top:1px solid #ccc">' + "".join(
            f'<td style="{_CELL}">{html.escape("" if v is None else str(v))}</td>' for v in (i, *row)) + "</tr>"
        for i, row in zip(frame.index, frame.itertuples(index=False)))
    return (f'<table style="width:100%;border-collapse:collapse;font-size:0.9em"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table>")


class ReadingFrame(pd.DataFrame):
    """A DataFrame a notebook shows with reading_html; selections and other operations give plain DataFrames."""

    @property
    def _constructor(self):
        return pd.DataFrame

    def _repr_html_(self) -> str:
        return reading_html(self)
