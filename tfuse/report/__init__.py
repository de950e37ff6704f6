"""`tfuse report DIR`: gather the results.json of a Hydra multirun into a table, markdown, CSV and plot;
where runs differ only in a seed (``parent_seeds``, the run ``seed``, ``partition.seed`` or the
``parents`` themselves), also their mean, standard deviation and count per setting, with the paired
difference OT - VF; for non-IID runs, every model's accuracy on each parent's own classes and the rest;
for runs that scored interpolation curves, their loss barriers as columns and the curves' plot.

Loading lives in :mod:`.runs`, statistics in :mod:`.stats`, tables and plot in :mod:`.render`;
this module writes and prints them, and re-exports their public names."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from rich.console import Console

from tfuse.errors import TfuseError
from tfuse.io import write_atomic
from tfuse.report.render import (
    format_value, mean_std_cells, plot, plot_interpolation, print_frame, print_report, print_seed_report, to_markdown,
)
from tfuse.report.runs import (
    Report, Run, build_report, find_runs, interpolation_table, parse_override, runs_table, swept_params,
)
from tfuse.report.stats import by_setting, interpolation_bands, mcnemar, over_seeds, select_by_validation, shard_scores

__all__ = [
    "Report", "Run", "build_report", "by_setting", "find_runs", "format_value", "interpolation_bands",
    "interpolation_table", "mcnemar", "over_seeds", "parse_override", "plot", "plot_interpolation", "print_report",
    "print_seed_report", "run_report", "runs_table", "select_by_validation", "shard_scores", "swept_params",
    "to_markdown", "write_report", "write_seed_report",
]


def run_report(
    root: str, metric: str | None = None, console: Console | None = None, select: str | None = None
) -> dict[str, Path]:
    """Build the report of ``root``, write it into ``root``, print it; return the paths written.
    ``select="val"`` adds the setting chosen by validation score beside the test-best one."""
    report = build_report(Path(root), metric)
    paths = write_report(report, report.root)
    console = console or Console()
    print_report(report, console)
    seeds = over_seeds(report)
    if seeds is not None:
        paths.update(write_seed_report(seeds, report.root))
        print_seed_report(report, seeds, console)
    shards = shard_scores(report)
    if shards is not None:
        write_atomic(report.root / "shards.md", lambda tmp: tmp.write_text(to_markdown(shards), encoding="utf-8"))
        paths["shards_md"] = report.root / "shards.md"
        print_frame(shards, f"{report.root}: test accuracy (points) on each parent's own classes and on the rest", console)
    if select is not None:
        if select != "val":
            raise TfuseError(f"--select {select}: settings are selected on the validation split; use --select val")
        chosen = select_by_validation(report)
        write_atomic(report.root / "select.md", lambda tmp: tmp.write_text(to_markdown(chosen), encoding="utf-8"))
        paths["select_md"] = report.root / "select.md"
        print_frame(chosen, f"{report.root}: {report.metric}, setting selected by validation vs by test", console)
    return paths


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.csv, (with one numeric swept parameter) report.png and (with
    interpolation curves) barriers.png atomically."""
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv"}
    write_atomic(paths["md"], lambda tmp: tmp.write_text(to_markdown(report.table), encoding="utf-8"))
    write_atomic(paths["csv"], lambda tmp: report.table.to_csv(tmp, index=False))
    figure = plot(report)
    if figure is not None:
        paths["png"] = _write_png(figure, out_dir / "report.png")
    bands = interpolation_bands(report)
    if bands is not None:
        paths["barriers_png"] = _write_png(plot_interpolation(report, bands), out_dir / "barriers.png")
    return paths


def write_seed_report(seeds: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """seeds.md (``mean +- std`` cells) and seeds.csv (separate columns), atomically."""
    paths = {"seeds_md": out_dir / "seeds.md", "seeds_csv": out_dir / "seeds.csv"}
    write_atomic(paths["seeds_md"], lambda tmp: tmp.write_text(to_markdown(mean_std_cells(seeds)), encoding="utf-8"))
    write_atomic(paths["seeds_csv"], lambda tmp: seeds.to_csv(tmp, index=False))
    return paths


def _write_png(figure: Figure, path: Path) -> Path:
    """Save ``figure`` as a PNG atomically; return ``path``."""
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=150))
    return path
