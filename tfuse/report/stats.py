"""Statistics over a report's runs: mean and spread over seeds per setting, the paired difference
OT - VF, selection by validation score, per-shard scores of non-IID runs, the interpolation
curves' mean and spread, and McNemar's test."""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy import stats

from tfuse.errors import TfuseError
from tfuse.report.render import PLOT_GROUP_MODEL, format_value
from tfuse.report.runs import SHARDS, STAGES, Report, unique

SEED_AXES = ("parent_seeds", "seed", "parents", "partition.seed")  # overrides that draw another sample of the same setting
PAIRED = ("ot", "vanilla")  # the paired difference reported over seeds


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
            for model in unique(m.group(2) for m in found if m and m.group(1) == stage):
                row = {**{k: setting[k] for k in keys}, "stage": stage, "model": model, "runs": setting["runs"]}
                for i in shards:
                    for side in ("own", "rest"):
                        base = f"{stage}/{model}/{side}_{i}"
                        mean, std = setting.get(f"{base}/mean", math.nan), setting.get(f"{base}/std", math.nan)
                        row[f"{side} {i}"] = _mean_std(100 * mean, 100 * std)
                rows.append(row)
    return pd.DataFrame(rows)


def interpolation_bands(report: Report) -> pd.DataFrame | None:
    """Per method and lambda: the interpolation loss's ``mean`` and ``std`` (sample standard
    deviation) over the runs and ``line``, the straight line between the mean endpoints (lambdas
    ascending, as fuse writes them); None when no run has interpolation curves."""
    if report.interpolation.empty:
        return None
    bands = report.interpolation.groupby(["method", "lambda"], sort=False)["loss"].agg(["mean", "std"]).reset_index()
    ends = bands.groupby("method", sort=False)["mean"]
    lambdas = bands["lambda"]
    share = (lambdas - lambdas.min()) / (lambdas.max() - lambdas.min())
    bands["line"] = (1 - share) * ends.transform("first") + share * ends.transform("last")
    return bands


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


def _mean_std(mean: float, std: float) -> str:
    """``mean +- std`` in points of one decimal (mean alone for one run; blank when missing)."""
    if math.isnan(mean):
        return ""
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} +- {std:.1f}"
