"""`tfuse report DIR`: gather the results.json of a Hydra multirun into a table, markdown, CSV and plot;
where runs differ only in a seed (``parent_seeds``, the run ``seed``, ``partition.seed`` or the
``parents`` themselves), also their mean, standard deviation and count per setting, with the paired
difference OT - VF; for non-IID runs, every model's accuracy on each parent's own classes and the rest."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich import box
from rich.console import Console
from rich.table import Table
from scipy import stats

from tfuse.errors import TfuseError

STAGES = ("one_shot", "one_shot_val", "finetuned", "finetuned_val")
STAGE_STYLES = {"one_shot": "-", "one_shot_val": ":", "finetuned": "--", "finetuned_val": "-."}
PLOT_GROUP_MODEL = "ot"
SEED_AXES = ("parent_seeds", "seed", "parents", "partition.seed")  # overrides that draw another sample of the same setting
SHARDS = {"one_shot": "by_shard", "finetuned": "by_shard_finetuned"}  # stage -> results key of own/rest scores
PAIRED = ("ot", "vanilla")  # the paired difference reported over seeds
_MISSING = object()


@dataclass(frozen=True)
class Run:
    """One job: its folder relative to the report root, parsed overrides and results."""

    name: str
    overrides: dict[str, Any]
    results: dict[str, Any]


@dataclass(frozen=True)
class Report:
    """One row per run: ``run``, the swept parameters, then ``stage/model/metric`` columns."""

    root: Path
    table: pd.DataFrame
    params: list[str]
    metrics: list[str]
    metric: str | None  # the metric plotted and printed; None when the runs report no metric


def build_report(root: Path, metric: str | None = None) -> Report:
    """Collect every results.json under ``root`` into a :class:`Report`."""
    runs = find_runs(root)
    params = swept_params(runs)
    table = runs_table(runs, params)
    metrics = _unique(column.rsplit("/", 1)[1] for column in table.columns[1 + len(params):])
    return Report(root, table, params, metrics, _choose_metric(root, metrics, metric))


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.csv and (with one numeric swept parameter) report.png atomically."""
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv"}
    write_atomic(paths["md"], lambda tmp: tmp.write_text(to_markdown(report.table), encoding="utf-8"))
    write_atomic(paths["csv"], lambda tmp: report.table.to_csv(tmp, index=False))
    figure = plot(report)
    if figure is not None:
        paths["png"] = out_dir / "report.png"
        write_atomic(paths["png"], lambda tmp: figure.savefig(tmp, format="png", dpi=150))
    return paths


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
        _print_frame(shards, f"{report.root}: test accuracy (points) on each parent's own classes and on the rest", console)
    if select is not None:
        if select != "val":
            raise TfuseError(f"--select {select}: settings are selected on the validation split; use --select val")
        chosen = select_by_validation(report)
        write_atomic(report.root / "select.md", lambda tmp: tmp.write_text(to_markdown(chosen), encoding="utf-8"))
        paths["select_md"] = report.root / "select.md"
        _print_frame(chosen, f"{report.root}: {report.metric}, setting selected by validation vs by test", console)
    return paths


def over_seeds(report: Report) -> pd.DataFrame | None:
    """:func:`by_setting` when a seed axis is swept, else None."""
    return by_setting(report) if any(param in SEED_AXES for param in report.params) else None


def by_setting(report: Report) -> pd.DataFrame:
    """One row per setting (the swept parameters that are not seed axes): ``runs`` and, for every
    metric column and the paired difference ``stage/ot-vanilla/metric``, its ``/mean`` and ``/std``
    (sample standard deviation) over the runs."""
    keys = [param for param in report.params if param not in SEED_AXES]
    table = report.table.copy()
    columns = list(table.columns[1 + len(report.params):])
    a, b = PAIRED
    for stage in STAGES:
        for metric in report.metrics:
            first, second = f"{stage}/{a}/{metric}", f"{stage}/{b}/{metric}"
            if first in table and second in table:
                table[f"{stage}/{a}-{b}/{metric}"] = table[first] - table[second]
                columns.append(f"{stage}/{a}-{b}/{metric}")
    groups = table.groupby(keys, dropna=False, sort=False) if keys else [((), table)]
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = {**dict(zip(keys, key)), "runs": len(group)}
        for column in columns:
            row[f"{column}/mean"] = group[column].mean()
            row[f"{column}/std"] = group[column].std(ddof=1) if group[column].count() > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def select_by_validation(report: Report, model: str = PLOT_GROUP_MODEL) -> pd.DataFrame:
    """Per stage that has a validation twin: the setting with the best mean validation score of
    ``model`` (the report's metric) and its test score, beside the setting with the best mean test
    score; ``optimism`` is how much better the test-best looks than the honest choice."""
    if report.metric is None:
        raise TfuseError(f"{report.root}: the runs report no metric to select on")
    settings = by_setting(report)
    keys = [param for param in report.params if param not in SEED_AXES]
    higher = not any(word in report.metric for word in ("loss", "perplexity"))
    rows = []
    for stage in ("one_shot", "finetuned"):
        val, test = f"{stage}_val/{model}/{report.metric}/mean", f"{stage}/{model}/{report.metric}/mean"
        if val not in settings or test not in settings or settings[val].isna().all():
            continue
        pick = settings[val].idxmax() if higher else settings[val].idxmin()
        best = settings[test].idxmax() if higher else settings[test].idxmin()
        describe = lambda i: ", ".join(f"{k}={format_value(settings.loc[i, k])}" for k in keys) or "(one setting)"  # noqa: E731
        gap = settings.loc[best, test] - settings.loc[pick, test]
        rows.append({
            "stage": stage, "model": model, "runs": int(settings.loc[pick, "runs"]),
            "selected by val": describe(pick), "its val": settings.loc[pick, val], "its test": settings.loc[pick, test],
            "its test std": settings.loc[pick, test.removesuffix("/mean") + "/std"],
            "best by test": describe(best), "best test": settings.loc[best, test],
            "optimism": gap if higher else -gap,
        })
    if not rows:
        raise TfuseError(
            f"{report.root}: no validation scores ({model}) in these results; rerun with this version of tfuse, "
            "which writes one_shot_val and finetuned_val"
        )
    return pd.DataFrame(rows)


def mcnemar(labels: Iterable[int], first: Iterable[int], second: Iterable[int]) -> float:
    """Exact two-sided McNemar p-value of two models' predictions on the same examples: a binomial
    test on the examples exactly one of them gets right (1.0 when there are none)."""
    labels, first, second = (np.asarray(list(v)) for v in (labels, first, second))
    if not len(labels) == len(first) == len(second):
        raise TfuseError(f"paired predictions differ in length ({len(labels)}, {len(first)}, {len(second)}); "
                         "compare models scored on the same test split")
    right_first, right_second = first == labels, second == labels
    only_first, only_second = int((right_first & ~right_second).sum()), int((right_second & ~right_first).sum())
    if only_first + only_second == 0:
        return 1.0
    return float(stats.binomtest(only_first, only_first + only_second, 0.5).pvalue)


def write_seed_report(seeds: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """seeds.md (``mean +- std`` cells) and seeds.csv (separate columns), atomically."""
    paths = {"seeds_md": out_dir / "seeds.md", "seeds_csv": out_dir / "seeds.csv"}
    write_atomic(paths["seeds_md"], lambda tmp: tmp.write_text(to_markdown(_mean_std_cells(seeds)), encoding="utf-8"))
    write_atomic(paths["seeds_csv"], lambda tmp: seeds.to_csv(tmp, index=False))
    return paths


def print_seed_report(report: Report, seeds: pd.DataFrame, console: Console) -> None:
    """The chosen metric's ``mean +- std`` over seeds, one row per setting."""
    cells = _mean_std_cells(seeds)
    suffix = f"/{report.metric}"
    settings = list(cells.columns[: list(cells.columns).index("runs") + 1])
    columns = settings + [c for c in cells.columns[len(settings):] if c.endswith(suffix)]
    view = cells[columns].rename(columns=lambda c: c.removesuffix(suffix))
    _print_frame(view, f"{report.root}: {report.metric}, mean +- std over seeds (all metrics: seeds.md, seeds.csv)", console)


def _print_frame(frame: pd.DataFrame, title: str, console: Console) -> None:
    view = Table(title=title, box=box.SIMPLE_HEAD)
    for column in frame.columns:
        view.add_column(str(column).replace("/", "\n"), justify="right" if _is_numeric(frame[column]) else "left", overflow="fold")
    for row in frame.itertuples(index=False):
        view.add_row(*map(format_value, row))
    console.print(view)


def _mean_std(mean: float, std: float) -> str:
    """``mean +- std`` in points of one decimal (mean alone for one run; blank when missing)."""
    if math.isnan(mean):
        return ""
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} +- {std:.1f}"


def _mean_std_cells(seeds: pd.DataFrame) -> pd.DataFrame:
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


def find_runs(root: Path) -> list[Run]:
    """Every folder under ``root`` (itself included) holding a results.json, in natural order."""
    if not root.is_dir():
        raise TfuseError(f"{root}: no such directory; pass a Hydra multirun or run directory.")
    files = sorted(root.rglob("results.json"), key=lambda path: _natural_key(path.relative_to(root)))
    if not files:
        raise TfuseError(
            f"{root}: no results.json found in it or below it; pass the directory of a finished "
            "run or multirun (e.g. outputs/multirun/<date>/<time>)."
        )
    return [_load_run(root, path) for path in files]


def swept_params(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (every key if there is a single run)."""
    keys = _unique(key for run in runs for key in run.overrides)
    if len(runs) == 1:
        return keys
    return [key for key in keys if _differs([run.overrides.get(key, _MISSING) for run in runs])]


def parse_override(item: str) -> tuple[str, Any] | None:
    """``+fusion.reg=0.02`` -> ``("fusion.reg", 0.02)``; None for a bare deletion such as ``~key``."""
    key, sep, raw = item.partition("=")
    if not sep:
        return None
    return key.lstrip("+~"), _parse_value(raw)


def to_markdown(table: pd.DataFrame) -> str:
    """A markdown table; floats with 4 significant digits, numeric columns right-aligned."""
    rule = ["---:" if _is_numeric(table[column]) else "---" for column in table.columns]
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
    numeric = [param for param in report.params if _is_numeric(report.table[param])]
    if len(numeric) != 1 or report.table[numeric[0]].nunique() < 2 or report.metric is None:
        return None
    x = numeric[0]
    lines = list(_lines(report, x))
    if not lines:
        return None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, color, stage, data in lines:
        axes.plot(data[x], data.iloc[:, 1], STAGE_STYLES[stage], marker="o", color=color, label=label)
    values = report.table[x].dropna()
    if values.min() > 0 and values.max() >= 100 * values.min():
        axes.set_xscale("log")
    axes.set(xlabel=x, ylabel=report.metric, title=f"{report.root.parent.name}/{report.root.name}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def print_report(report: Report, console: Console) -> None:
    """Print the run, swept parameters and ``stage/model`` columns of the chosen metric as a rich table."""
    table = report.table
    columns = list(table.columns[: 1 + len(report.params)])
    suffix = f"/{report.metric}"
    columns += [column for column in table.columns[len(columns):] if column.endswith(suffix)]
    view = Table(title=f"{report.root}: {report.metric}", caption="all metrics: report.md, report.csv",
                 box=box.SIMPLE_HEAD)
    for column in columns:
        header = column.removesuffix(suffix).replace("/", "\n")
        view.add_column(header, justify="right" if _is_numeric(table[column]) else "left", overflow="fold")
    for row in table[columns].itertuples(index=False):
        view.add_row(*map(format_value, row))
    console.print(view)


def _load_run(root: Path, results_path: Path) -> Run:
    """Read one job's results.json and .hydra/overrides.yaml (absent: no overrides)."""
    folder = results_path.parent
    results = _read(results_path, json.loads, json.JSONDecodeError, "a JSON object")
    if not isinstance(results, dict):
        raise TfuseError(f"{results_path}: expected a JSON object of results; rerun the job or delete the file.")
    overrides_path = folder / ".hydra" / "overrides.yaml"
    items = _read(overrides_path, yaml.safe_load, yaml.YAMLError, "a YAML list") if overrides_path.exists() else []
    if not isinstance(items, list):
        raise TfuseError(f"{overrides_path}: expected a YAML list of overrides; restore or delete the file.")
    pairs = [parse_override(str(item)) for item in items]
    return Run(folder.relative_to(root).as_posix(), dict(pair for pair in pairs if pair), results)


def _read(path: Path, parse: Callable[[str], Any], error: type[Exception], expected: str) -> Any:
    """Parse a file, turning a syntax error into a TfuseError naming it."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except error as exc:
        raise TfuseError(f"{path}: not {expected} ({exc}); fix or delete the file and rerun.") from exc


def _parse_value(raw: str) -> Any:
    """A scalar as Hydra reads it; non-scalars (lists, dicts) stay as their text."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string; Hydra reads it as a float
        except ValueError:
            return value
    return value if value is None or isinstance(value, (bool, int, float)) else raw


def runs_table(runs: list[Run], params: list[str]) -> pd.DataFrame:
    """The report rows, sorted by the swept parameters."""
    scores = [_flatten(run.results) for run in runs]
    columns = _unique(column for score in scores for column in score)
    columns.sort(key=lambda column: STAGES.index(column.split("/", 1)[0]))
    rows = [
        {"run": run.name, **{key: run.overrides.get(key) for key in params}, **score}
        for run, score in zip(runs, scores)
    ]
    table = pd.DataFrame(rows, columns=["run", *params, *columns])
    if params:
        table = table.sort_values(params, key=_sort_key, kind="stable", na_position="last")
    return table.reset_index(drop=True)


def _flatten(results: dict[str, Any]) -> dict[str, float]:
    """``{"stage/model/metric": value}`` for every numeric metric of the known stages; non-IID runs
    add ``own_i`` and ``rest_i``: accuracy on parent i's own classes and on the others."""
    flat = {
        f"{stage}/{model}/{name}": float(value)
        for stage in STAGES
        for model, metrics in _dict(results.get(stage)).items()
        for name, value in _dict(metrics).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for stage, key in SHARDS.items():
        for model, parts in _dict(results.get(key)).items():
            for i, part in enumerate(parts):
                for side in ("own", "rest"):
                    if part.get(side) is not None:
                        flat[f"{stage}/{model}/{side}_{i}"] = float(part[side])
    return flat


def shard_scores(report: Report) -> pd.DataFrame | None:
    """Non-IID runs: per setting, stage and model, accuracy on each parent's own classes and on the
    rest (``own i``, ``rest i``: ``mean +- std`` over seeds); None when the runs have no shards."""
    pattern = re.compile(r"^(\w+)/(.+)/(own|rest)_(\d+)$")
    found = [pattern.match(column) for column in report.table.columns]
    if not any(found):
        return None
    seeds = by_setting(report)
    keys = [param for param in report.params if param not in SEED_AXES]
    shards = sorted({int(m.group(4)) for m in found if m})
    rows = []
    for _, setting in seeds.iterrows():
        for stage in SHARDS:
            for model in _unique(m.group(2) for m in found if m and m.group(1) == stage):
                row = {**{k: setting[k] for k in keys}, "stage": stage, "model": model, "runs": setting["runs"]}
                for i in shards:
                    for side in ("own", "rest"):
                        base = f"{stage}/{model}/{side}_{i}"
                        mean, std = setting.get(f"{base}/mean", math.nan), setting.get(f"{base}/std", math.nan)
                        row[f"{side} {i}"] = _mean_std(100 * mean, 100 * std)
                rows.append(row)
    return pd.DataFrame(rows)


def _choose_metric(root: Path, metrics: list[str], metric: str | None) -> str | None:
    """The requested metric, else accuracy, else the first one; TfuseError if it is unknown."""
    if metric is None:
        return "accuracy" if "accuracy" in metrics else next(iter(metrics), None)
    if metric not in metrics:
        available = ", ".join(metrics) or "none"
        raise TfuseError(f"{root}: no metric {metric!r} in the results; available metrics: {available}.")
    return metric


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
        models = _unique(column.split("/")[1] for column in table.columns if column.endswith(suffix))
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


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write via a temporary file in the same directory, then rename it over ``path``."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TfuseError(f"{path}: cannot write the report ({exc}); make {path.parent} writable.") from exc
    os.close(fd)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _markdown_row(cells: Any, escape: bool = True) -> str:
    """One ``| a | b |`` line; pipes inside cells are escaped."""
    texts = [str(cell).replace("|", r"\|") if escape else str(cell) for cell in cells]
    return "| " + " | ".join(texts) + " |"


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers sort as numbers; anything else (text, mixed types) sorts as text."""
    return column if _is_numeric(column) else column.map(lambda value: "" if value is None else str(value))


def _is_numeric(column: pd.Series) -> bool:
    """True for int/float columns (booleans count as categories)."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _differs(values: list[Any]) -> bool:
    """Whether the values are not all equal."""
    return any(value != values[0] for value in values[1:])


def _natural_key(path: Path) -> list[tuple[int, Any]]:
    """Sort key placing job 2 before job 10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[/.]", path.as_posix())]


def _unique(items: Iterable[Any]) -> list[Any]:
    """Items in first-seen order, without repeats."""
    return list(dict.fromkeys(items))


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one (stages may be absent or empty)."""
    return value if isinstance(value, dict) else {}
