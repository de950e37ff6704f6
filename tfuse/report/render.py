"""Showing a report: rich tables on the console, markdown text, the plot of the chosen metric and
that of the interpolation curves."""
from __future__ import annotations

import math
from typing import Any, Iterator

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich import box
from rich.console import Console
from rich.table import Table

from tfuse.report.runs import STAGES, Report, is_barrier, is_numeric, unique

STAGE_STYLES = {"one_shot": "-", "one_shot_val": ":", "finetuned": "--", "finetuned_val": "-.", "inference": ":"}
PLOT_GROUP_MODEL = "ot"


def print_report(report: Report, console: Console) -> None:
    """Print the run, swept parameters, ``stage/model`` columns of the chosen metric and the
    barriers as a rich table."""
    table = report.table
    columns = list(table.columns[: 1 + len(report.params)])
    suffix = f"/{report.metric}"
    columns += [column for column in table.columns[len(columns):] if column.endswith(suffix) or is_barrier(column)]
    view = Table(title=f"{report.root}: {report.metric}", caption="all metrics: report.md, report.csv",
                 box=box.SIMPLE_HEAD)
    for column in columns:
        header = column.removesuffix(suffix).replace("/", "\n")
        view.add_column(header, justify="right" if is_numeric(table[column]) else "left", overflow="fold")
    for row in table[columns].itertuples(index=False):
        view.add_row(*map(format_value, row))
    console.print(view)


def print_seed_report(report: Report, seeds: pd.DataFrame, console: Console) -> None:
    """The chosen metric's and the barriers' ``mean +- std`` over seeds, one row per setting."""
    cells = mean_std_cells(seeds)
    suffix = f"/{report.metric}"
    settings = list(cells.columns[: list(cells.columns).index("runs") + 1])
    columns = settings + [c for c in cells.columns[len(settings):] if c.endswith(suffix) or is_barrier(c)]
    view = cells[columns].rename(columns=lambda c: c.removesuffix(suffix))
    print_frame(view, f"{report.root}: {report.metric}, mean +- std over seeds (all metrics: seeds.md, seeds.csv)", console)


def print_frame(frame: pd.DataFrame, title: str, console: Console) -> None:
    """Print ``frame`` as a rich table, numeric columns right-aligned."""
    view = Table(title=title, box=box.SIMPLE_HEAD)
    for column in frame.columns:
        view.add_column(str(column).replace("/", "\n"), justify="right" if is_numeric(frame[column]) else "left", overflow="fold")
    for row in frame.itertuples(index=False):
        view.add_row(*map(format_value, row))
    console.print(view)


def mean_std_cells(seeds: pd.DataFrame) -> pd.DataFrame:
    """``stage/model/metric`` columns holding ``mean +- std`` text (mean alone for one run)."""
    out = seeds[[c for c in seeds.columns if not c.endswith(("/mean", "/std"))]].copy()
    for column in seeds.columns:
        if column.endswith("/mean"):
            base = column.removesuffix("/mean")
            out[base] = [
                format_value(m) if math.isnan(sd) else f"{format_value(m)} +- {format_value(sd)}"
                for m, sd in zip(seeds[column], seeds[f"{base}/std"])
            ]
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """A markdown table; floats with 4 significant digits, numeric columns right-aligned."""
    rule = ["---:" if is_numeric(table[column]) else "---" for column in table.columns]
    lines = [_markdown_row(table.columns), _markdown_row(rule, escape=False)]
    lines += [_markdown_row(map(format_value, row)) for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def format_value(value: Any) -> str:
    """Text of one cell: floats with 4 significant digits, blank when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot(report: Report) -> Figure | None:
    """The chosen metric against the one numeric swept parameter; None if that does not apply."""
    numeric = [param for param in report.params if is_numeric(report.table[param])]
    if len(numeric) != 1 or report.table[numeric[0]].nunique() < 2 or report.metric is None:
        return None
    x = numeric[0]
    lines = list(_lines(report, x))
    if not lines:
        return None
    figure, axes = _figure()
    for label, color, stage, data in lines:
        axes.plot(data[x], data.iloc[:, 1], STAGE_STYLES[stage], marker="o", color=color, label=label)
    values = report.table[x].dropna()
    if values.min() > 0 and values.max() >= 100 * values.min():
        axes.set_xscale("log")
    axes.set(xlabel=x, ylabel=report.metric, title=_title(report))
    axes.legend(fontsize="small")
    return figure


def plot_interpolation(report: Report, bands: pd.DataFrame) -> Figure:
    """The interpolation loss against lambda (``bands`` from :func:`~tfuse.report.stats.interpolation_bands`):
    per method its mean over runs, a band of +- std and, dashed, the straight line between its mean endpoints."""
    figure, axes = _figure()
    for index, (method, rows) in enumerate(bands.groupby("method", sort=False)):
        color = f"C{index % 10}"
        axes.plot(rows["lambda"], rows["mean"], marker="o", color=color, label=method)
        axes.fill_between(rows["lambda"], rows["mean"] - rows["std"], rows["mean"] + rows["std"], color=color, alpha=0.2)
        axes.plot(rows["lambda"], rows["line"], "--", color=color, alpha=0.6)
    runs = report.interpolation["run"].nunique()
    axes.set(xlabel="lambda (0: anchor, 1: aligned parent)", ylabel="loss",
             title=f"{_title(report)}: interpolation, mean +- std over {runs} run{'s' * (runs > 1)}")
    axes.legend(fontsize="small")
    return figure


def _figure() -> tuple[Figure, Axes]:
    """An empty figure with one gridded axes, drawn without a GUI backend."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.grid(alpha=0.3)
    return figure, axes


def _title(report: Report) -> str:
    """The sweep's folder and its parent (the date of a Hydra multirun)."""
    return f"{report.root.parent.name}/{report.root.name}"


def _lines(report: Report, x: str) -> Iterator[tuple[str, str, str, pd.DataFrame]]:
    """(label, color, stage, [x, y] rows) per line: every model, or the ot model per category."""
    table = report.table
    groups = [param for param in report.params if param != x]
    if groups:
        models = [PLOT_GROUP_MODEL]
        parts = [(", ".join(f"{g}={format_value(v)}" for g, v in zip(groups, key)), rows)
                 for key, rows in table.groupby(groups, dropna=False, sort=False)]
    else:
        suffix = f"/{report.metric}"
        models = unique(column.split("/")[1] for column in table.columns if column.endswith(suffix))
        parts = [("", table)]
    curves = [(model, name, rows) for name, rows in parts for model in models]
    for index, (model, name, rows) in enumerate(curves):
        for stage in STAGES:
            column = f"{stage}/{model}/{report.metric}"
            if column not in table:
                continue
            data = rows[[x, column]].dropna().sort_values(x)
            if not data.empty:
                label = f"{model} {name} ({stage})" if name else f"{model} ({stage})"
                yield label, f"C{index % 10}", stage, data


def _markdown_row(cells: Any, escape: bool = True) -> str:
    """One ``| a | b |`` line; pipes inside cells are escaped."""
    texts = [str(cell).replace("|", r"\|") if escape else str(cell) for cell in cells]
    return "| " + " | ".join(texts) + " |"
