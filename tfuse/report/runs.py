"""Finding a sweep's runs and loading them into a :class:`Report`: one row per run, the swept
parameters, then ``stage/model/metric`` columns and, for runs that scored interpolation curves,
``barrier/method`` columns; the curves themselves in a table of their own."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import yaml

from tfuse.errors import TfuseError

STAGES = ("one_shot", "one_shot_val", "finetuned", "finetuned_val", "inference")  # inference: parameters, ms per 1k
SHARDS = {"one_shot": "by_shard", "finetuned": "by_shard_finetuned"}  # stage -> results key of own/rest scores
BARRIERS = ("barrier", "barrier_at_half", "midpoint_barrier")  # interpolation's loss barriers; lower is better
_MISSING = object()


@dataclass(frozen=True)
class Run:
    """One job: its folder relative to the report root, parsed overrides and results."""

    name: str
    overrides: dict[str, Any]
    results: dict[str, Any]


@dataclass(frozen=True)
class Report:
    """One row per run: ``run``, the swept parameters, then ``stage/model/metric`` and
    ``barrier/method`` columns; and the interpolation curves (see :func:`interpolation_table`)."""

    root: Path
    table: pd.DataFrame
    params: list[str]
    metrics: list[str]
    metric: str | None  # the metric plotted and printed; None when the runs report no metric
    interpolation: pd.DataFrame


def build_report(root: Path, metric: str | None = None) -> Report:
    """Collect every results.json under ``root`` into a :class:`Report`."""
    runs = find_runs(root)
    params = swept_params(runs)
    table = runs_table(runs, params)
    metrics = unique(column.rsplit("/", 1)[1] for column in table.columns[1 + len(params):] if not is_barrier(column))
    return Report(root, table, params, metrics, _choose_metric(root, metrics, metric), interpolation_table(runs))


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
    keys = unique(key for run in runs for key in run.overrides)
    if len(runs) == 1:
        return keys
    return [key for key in keys if _differs([run.overrides.get(key, _MISSING) for run in runs])]


def parse_override(item: str) -> tuple[str, Any] | None:
    """``+fusion.reg=0.02`` -> ``("fusion.reg", 0.02)``; None for a bare deletion such as ``~key``."""
    key, sep, raw = item.partition("=")
    if not sep:
        return None
    return key.lstrip("+~"), _parse_value(raw)


def runs_table(runs: list[Run], params: list[str]) -> pd.DataFrame:
    """The report rows, sorted by the swept parameters."""
    scores = [_flatten(run.results) for run in runs]
    columns = unique(column for score in scores for column in score)
    columns.sort(key=lambda column: (*STAGES, *BARRIERS).index(column.split("/", 1)[0]))
    rows = [
        {"run": run.name, **{key: run.overrides.get(key) for key in params}, **score}
        for run, score in zip(runs, scores)
    ]
    table = pd.DataFrame(rows, columns=["run", *params, *columns])
    if params:
        table = table.sort_values(params, key=_sort_key, kind="stable", na_position="last")
    return table.reset_index(drop=True)


def interpolation_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run, method and lambda: ``loss`` on the interpolation curve, averaged over the
    non-anchor parents. Runs whose lambdas differ from the first such run's are left out, as their
    points do not line up; no rows when no run has interpolation."""
    rows, lambdas = [], None
    for run in runs:
        entry = _dict(run.results.get("interpolation"))
        lambdas = lambdas or entry.get("lambdas")
        if not entry or entry.get("lambdas") != lambdas:
            continue
        for method, result in _dict(entry.get("methods")).items():
            curves = [curve["loss"] for curve in _dict(result.get("curves")).values()]
            if curves:
                rows += [{"run": run.name, "method": method, "lambda": lam, "loss": loss}
                         for lam, loss in zip(lambdas, np.mean(curves, axis=0))]
    return pd.DataFrame(rows, columns=["run", "method", "lambda", "loss"])


def is_barrier(column: str) -> bool:
    """True for the ``barrier/method`` columns (not a metric of a stage)."""
    return column.split("/", 1)[0] in BARRIERS


def is_numeric(column: pd.Series) -> bool:
    """True for int/float columns (booleans count as categories)."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def unique(items: Iterable[Any]) -> list[Any]:
    """Items in first-seen order, without repeats."""
    return list(dict.fromkeys(items))


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


def _flatten(results: dict[str, Any]) -> dict[str, float]:
    """``{"stage/model/metric": value}`` for every numeric metric of the known stages; non-IID runs
    add ``own_i`` and ``rest_i``: accuracy on parent i's own classes and on the others; runs with
    interpolation curves add ``{"barrier/method": value}``, per-parent barriers averaged over the
    non-anchor parents."""
    flat = {
        f"{stage}/{model}/{name}": float(value)
        for stage in STAGES
        for model, metrics in _dict(results.get(stage)).items()
        for name, value in _dict(metrics).items()
        if _is_number(value)
    }
    for stage, key in SHARDS.items():
        for model, parts in _dict(results.get(key)).items():
            for i, part in enumerate(parts):
                for side in ("own", "rest"):
                    if part.get(side) is not None:
                        flat[f"{stage}/{model}/{side}_{i}"] = float(part[side])
    for method, result in _dict(_dict(results.get("interpolation")).get("methods")).items():
        for name in BARRIERS:
            value = _dict(result).get(name)
            values = list(value.values()) if isinstance(value, dict) else [value]
            if values and all(map(_is_number, values)):
                flat[f"{name}/{method}"] = float(np.mean(values))
    return flat


def _choose_metric(root: Path, metrics: list[str], metric: str | None) -> str | None:
    """The requested metric, else accuracy, else the first one; TfuseError if it is unknown."""
    if metric is None:
        return "accuracy" if "accuracy" in metrics else next(iter(metrics), None)
    if metric not in metrics:
        available = ", ".join(metrics) or "none"
        raise TfuseError(f"{root}: no metric {metric!r} in the results; available metrics: {available}.")
    return metric


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers sort as numbers; anything else (text, mixed types) sorts as text."""
    return column if is_numeric(column) else column.map(lambda value: "" if value is None else str(value))


def _differs(values: list[Any]) -> bool:
    """Whether the values are not all equal."""
    return any(value != values[0] for value in values[1:])


def _natural_key(path: Path) -> list[tuple[int, Any]]:
    """Sort key placing job 2 before job 10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[/.]", path.as_posix())]


def _is_number(value: Any) -> bool:
    """True for ints and floats (booleans are not scores)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one (stages may be absent or empty)."""
    return value if isinstance(value, dict) else {}
