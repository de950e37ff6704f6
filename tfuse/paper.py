"""`tfuse paper DIR`: the paper's six claims and the non-IID ones, each a paired difference over
seed pairs (partition seeds for non-IID), from the sweeps `scripts/paper_tables.sh` writes into DIR;
writes DIR/report.md, claims.csv and plots."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from scipy import stats

from tfuse.errors import TfuseError
from tfuse.fusion.methods import label_of
from tfuse.io import write_atomic
from tfuse.report import (
    build_report, find_runs, format_value, mcnemar, runs_table, select_by_validation, shard_scores, to_markdown,
)

PAIR = "parent_seeds"  # the seed axis a step sweeps; claims pair runs on it
PAIR_AXES = {"noniid": "partition.seed"}  # steps whose parents share seeds and differ in their data
METRIC = "accuracy"
# The sweeps of scripts/paper_tables.sh, one folder each under DIR.
STEPS = {
    "main": "vit_mnist as configured (lstsq repair), finetuned 200 steps with the parents as controls, teacher none and ensemble",
    "hard": "vit_mnist, no repair, exact OT (emd), activation and weight cost, one-shot",
    "reg": "vit_mnist +ablation=reg, no repair: Sinkhorn over reg, activation and weight cost, one-shot",
    "residual": "vit_mnist +ablation=residual, no repair: every residual policy, one-shot",
    "hetero": "vit_hetero (width 128 into 64, lstsq repair), finetuned 200 steps with the parents as controls",
    "n3": "vit_mnist with three parents per run (lstsq repair), one-shot",
    "noniid": "vit_mnist_skew over partition seeds 0, 1, 2 (parent 0 holds 90% of digits 0-4, parent 1 of 5-9; "
              "label-weighted lstsq repair), finetuned on the fuser's 1,000 samples with the parents finetuned "
              "alike and the recipe trained on those samples (scratch) as controls",
}


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a label and its per-pair values from one step's runs."""

    label: str
    step: str
    values: Callable[[pd.DataFrame], tuple[pd.Series, str]]  # runs -> (value per pair, label detail)


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    first: Side
    second: Side


def column(name: str, **where) -> Callable[[pd.DataFrame], tuple[pd.Series, str]]:
    """``stage/model`` (the report's ``stage/model/accuracy``) of the runs matching ``where``."""
    def values(runs: pd.DataFrame) -> tuple[pd.Series, str]:
        rows = _where(runs, where)
        return _per_pair(rows, rows[_need(rows, f"{name}/{METRIC}")]), ""
    return values


def best_parent(stage: str, **where) -> Callable[[pd.DataFrame], tuple[pd.Series, str]]:
    """The best parent of each run at ``stage`` (every parent, so a claim is against all of them)."""
    def values(runs: pd.DataFrame) -> tuple[pd.Series, str]:
        rows = _where(runs, where)
        parents = [c for c in rows.columns if c.startswith(f"{stage}/parent_") and c.endswith(f"/{METRIC}")]
        if not parents:
            raise TfuseError(f"no {stage} parent scores in these runs; rerun the step with finetune.controls=parents")
        return _per_pair(rows, rows[parents].max(axis=1)), ""
    return values


def chosen_on_validation(model: str, axis: str, **where) -> Callable[[pd.DataFrame], tuple[pd.Series, str]]:
    """One-shot test score of ``model`` at the ``axis`` value with the best mean validation score
    over the pairs (the test split never picks)."""
    def values(runs: pd.DataFrame) -> tuple[pd.Series, str]:
        rows = _where(runs, where)
        val = rows.groupby(axis)[_need(rows, f"one_shot_val/{model}/{METRIC}")].mean()
        pick = val.idxmax()
        chosen = rows[rows[axis] == pick]
        return _per_pair(chosen, chosen[f"one_shot/{model}/{METRIC}"]), f"{axis}={format_value(pick)}"
    return values


CLAIMS = [
    Claim("a", "one-shot, OT above VF (no repair: the paper's setting)",
          Side("OT", "hard", column("one_shot/ot", **{"fusion.cost": "activations"})),
          Side("VF", "hard", column("one_shot/vanilla", **{"fusion.cost": "activations"}))),
    Claim("a", "one-shot, OT above VF (both repaired, lstsq)",
          Side("OT", "main", column("one_shot/ot", **{"finetune.teacher": "none"})),
          Side("VF", "main", column("one_shot/vanilla", **{"finetune.teacher": "none"}))),
    Claim("b", "soft alignment above hard, at the best reg, activation cost (one-shot OT, no repair)",
          Side("soft", "reg", chosen_on_validation("ot", "fusion.reg", **{"fusion.cost": "activations"})),
          Side("hard", "hard", column("one_shot/ot", **{"fusion.cost": "activations"}))),
    Claim("b", "soft alignment above hard, at the best reg, weight cost (one-shot OT, no repair)",
          Side("soft", "reg", chosen_on_validation("ot", "fusion.reg", **{"fusion.cost": "weights"})),
          Side("hard", "hard", column("one_shot/ot", **{"fusion.cost": "weights"}))),
    Claim("c", "aligning on activations above aligning on weights (one-shot OT, emd, no repair)",
          Side("activations", "hard", column("one_shot/ot", **{"fusion.cost": "activations"})),
          Side("weights", "hard", column("one_shot/ot", **{"fusion.cost": "weights"}))),
    Claim("d", "after a short finetune, OT above every parent finetuned alike",
          Side("OT finetuned", "main", column("finetuned/ot", **{"finetune.teacher": "none"})),
          Side("best parent finetuned", "main", best_parent("finetuned", **{"finetune.teacher": "none"}))),
    Claim("d", "after a short finetune, OT above VF finetuned alike",
          Side("OT finetuned", "main", column("finetuned/ot", **{"finetune.teacher": "none"})),
          Side("VF finetuned", "main", column("finetuned/vanilla", **{"finetune.teacher": "none"}))),
    Claim("d", "after a short finetune, OT above the converged parents as they are (the paper's comparison)",
          Side("OT finetuned", "main", column("finetuned/ot", **{"finetune.teacher": "none"})),
          Side("best parent", "main", best_parent("one_shot", **{"finetune.teacher": "none"}))),
    Claim("d", "distilled from the ensemble, OT above every parent finetuned alike (distilled too)",
          Side("OT finetuned", "main", column("finetuned/ot", **{"finetune.teacher": "ensemble"})),
          Side("best parent finetuned", "main", best_parent("finetuned", **{"finetune.teacher": "ensemble"}))),
    Claim("e", "heterogeneous: the fused width-64 model above the small parent, both finetuned alike",
          Side("OT finetuned", "hetero", column("finetuned/ot")),
          Side("small parent finetuned", "hetero", column("finetuned/parent_1"))),  # vit_hetero's anchor
    Claim("e", "heterogeneous, one-shot: the fused width-64 model above the small parent as it is",
          Side("OT", "hetero", column("one_shot/ot")),
          Side("small parent", "hetero", column("one_shot/parent_1"))),
    Claim("f", "N = 3 parents: OT one-shot above VF (both repaired, lstsq)",
          Side("OT", "n3", column("one_shot/ot")),
          Side("VF", "n3", column("one_shot/vanilla"))),
    Claim("g", "non-IID (skew): OT+repair one-shot above the best parent",
          Side("OT", "noniid", column("one_shot/ot")),
          Side("best parent", "noniid", best_parent("one_shot"))),
    Claim("g", "non-IID (skew): OT above VF, both repaired",
          Side("OT", "noniid", column("one_shot/ot")),
          Side("VF", "noniid", column("one_shot/vanilla"))),
    Claim("g", "non-IID (skew): OT one-shot level with the parents' ensemble (the difference is the gap)",
          Side("OT", "noniid", column("one_shot/ot")),
          Side("ensemble", "noniid", column("one_shot/ensemble"))),
    Claim("g", "non-IID (skew), budget 1,000: finetuned OT above every parent finetuned alike",
          Side("OT finetuned", "noniid", column("finetuned/ot")),
          Side("best parent finetuned", "noniid", best_parent("finetuned"))),
    Claim("g", "non-IID (skew), budget 1,000: finetuned OT above the recipe trained on those samples (scratch)",
          Side("OT finetuned", "noniid", column("finetuned/ot")),
          Side("scratch", "noniid", column("finetuned/scratch"))),
]


def verdict(differences: pd.Series) -> str:
    """``holds`` / ``does not hold`` when the mean difference exceeds its standard deviation over
    the pairs, else ``within noise`` (one pair: the sign alone, marked so)."""
    values = differences.dropna()
    if values.empty:
        return "no data"
    mean = values.mean()
    if len(values) == 1:
        return ("holds" if mean > 0 else "does not hold") + " (one pair)"
    if abs(mean) <= values.std(ddof=1):
        return "within noise"
    return "holds" if mean > 0 else "does not hold"


def evaluate_claims(root: Path) -> pd.DataFrame:
    """One row per claim: both sides and their difference (mean, std over the pairs, count),
    a paired t-test's p-value, the verdict and the per-pair differences."""
    steps: dict[str, pd.DataFrame] = {}
    rows = []
    for claim in CLAIMS:
        sides = []
        for side in (claim.first, claim.second):
            if side.step not in steps:
                steps[side.step] = load_step(root, side.step)
            values, detail = side.values(steps[side.step])
            sides.append((f"{side.label} ({detail})" if detail else side.label, values))
        (label_a, a), (label_b, b) = sides
        diff = (a - b).dropna()
        p = stats.ttest_1samp(diff, 0.0).pvalue if len(diff) > 1 and diff.std() > 1e-9 else float("nan")  # no spread: no test
        rows.append({
            "claim": claim.key, "statement": claim.text, "first": label_a, "second": label_b,
            "first mean": a.mean(), "first std": a.std(ddof=1), "second mean": b.mean(), "second std": b.std(ddof=1),
            "difference mean": diff.mean(), "difference std": diff.std(ddof=1), "pairs": len(diff),
            "p (paired t)": p, "verdict": verdict(diff),
            "per pair": ", ".join(f"{pair}: {100 * d:+.1f}" for pair, d in diff.items()),
        })
    return pd.DataFrame(rows)


def load_step(root: Path, step: str) -> pd.DataFrame:
    """Every run of one step: its overrides (all of them) and ``stage/model/metric`` columns."""
    folder = root / step
    if not folder.is_dir():
        raise TfuseError(f"{folder}: missing; run scripts/paper_tables.sh {root} to make it ({STEPS.get(step, step)})")
    runs = find_runs(folder)
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    table = runs_table(runs, keys)
    axis = PAIR_AXES.get(step, PAIR)
    if axis not in table:
        raise TfuseError(f"{folder}: its runs set no {axis}; the claims pair runs on it (rerun scripts/paper_tables.sh)")
    return table.assign(pair=table[axis].astype(str))


def finetune_summary(root: Path) -> tuple[pd.DataFrame, Figure]:
    """Steps until each finetuned model's validation score is above the best parent's one-shot
    level, per teacher and pair; and the curves averaged over the pairs, one panel per teacher."""
    runs = find_runs(root / "main")
    rows, curves = [], {}
    for run in runs:
        teacher = str(run.overrides.get("finetune.teacher", "none"))
        beat = run.results.get("steps_to_beat_best_parent") or {}
        for model, step in beat.items():
            rows.append({"teacher": teacher, "model": label_of(model), PAIR: run.overrides.get(PAIR), "steps": step})
        for model, curve in (run.results.get("curves") or {}).items():
            curves.setdefault(teacher, {}).setdefault(model, []).append(np.asarray(curve, dtype=float))
    if not rows:
        raise TfuseError(f"{root / 'main'}: no finetuning curves; the step needs finetune.eval_every > 0")
    table = pd.DataFrame(rows)
    summary = (
        table.groupby(["teacher", "model"], sort=False)["steps"]
        .agg(lambda s: " / ".join("never" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v)) for v in s))
        .reset_index(name="steps until above the best parent, per pair")
    )
    return summary, _curves_figure(curves)


def _curves_figure(curves: dict[str, dict[str, list[np.ndarray]]]) -> Figure:
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(curves), squeeze=False, sharey=True)[0]
    for axes, (teacher, models) in zip(panels, curves.items()):
        for model, runs in models.items():
            length = min(len(r) for r in runs)
            stacked = np.stack([r[:length] for r in runs])  # runs x points x (step, value)
            mean, std = stacked[:, :, 1].mean(0), stacked[:, :, 1].std(0)
            steps = stacked[0, :, 0]
            axes.plot(steps, mean, marker="o", markersize=3, label=label_of(model))
            axes.fill_between(steps, mean - std, mean + std, alpha=0.15)
        axes.set(title=f"finetune, teacher={teacher} (mean +- std over pairs)", xlabel="finetuning step",
                 ylabel=f"validation {METRIC}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def noniid_tests(root: Path) -> pd.DataFrame:
    """Step ``noniid``, per partition seed: OT against the best parent, the ensemble and (finetuned)
    the best parent finetuned alike and scratch, in points, with exact McNemar p-values on the same
    test images."""
    rows = []
    for run in find_runs(root / "noniid"):
        row: dict = {"partition.seed": run.overrides.get("partition.seed")}
        labels = run.results.get("test_labels")
        for stage, key in (("one_shot", "test_predictions"), ("finetuned", "test_predictions_finetuned")):
            scores = {m: v[METRIC] for m, v in (run.results.get(stage) or {}).items() if METRIC in v}
            if "ot" not in scores:
                continue
            predicted = run.results.get(key) or {}
            parents = [m for m in scores if m.startswith("parent_")]
            others = {"best parent": max(parents, key=scores.get)} if parents else {}
            others |= {"ensemble": "ensemble"} if stage == "one_shot" else {"scratch": "scratch"}
            prefix = "" if stage == "one_shot" else "finetuned "
            row[f"{prefix}OT"] = 100 * scores["ot"]
            for side, model in others.items():
                if model not in scores:
                    continue
                row[f"{prefix}{side}"] = f"{100 * scores[model]:.1f} ({label_of(model)})" if side == "best parent" else 100 * scores[model]
                paired = labels is not None and "ot" in predicted and model in predicted
                row[f"{prefix}p vs {side}"] = mcnemar(labels, predicted["ot"], predicted[model]) if paired else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def reg_figure(root: Path) -> Figure:
    """Soft OT one-shot test accuracy (mean +- std over pairs) against reg for each cost, beside
    hard alignment's with that cost (dashed); validation dotted."""
    soft, hard = load_step(root, "reg"), load_step(root, "hard")
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (cost, rows) in enumerate(soft.groupby("fusion.cost", sort=False)):
        color = f"C{index}"
        for split, stage, style in (("test", "one_shot", "-"), ("validation", "one_shot_val", ":")):
            grouped = rows.groupby("fusion.reg")[f"{stage}/ot/{METRIC}"]
            mean, std = grouped.mean(), grouped.std(ddof=1)
            axes.errorbar(mean.index, mean, yerr=std if split == "test" else None, fmt="o" + style, color=color,
                          capsize=3, label=f"soft, {cost} cost, {split}")
        level = _where(hard, {"fusion.cost": cost})[f"one_shot/ot/{METRIC}"].mean()
        axes.axhline(level, linestyle="--", color=color, alpha=0.6, label=f"hard (emd), {cost} cost, test")
    axes.set_xscale("log")
    axes.set(xlabel="fusion.reg", ylabel=f"OT one-shot {METRIC}", title="soft vs hard alignment (no repair)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def write_paper_report(root: Path, console: Console | None = None) -> dict[str, Path]:
    """report.md (claims, finetuning, selection), claims.csv, finetune.png and reg.png in ``root``."""
    claims = evaluate_claims(root)
    finetuning, curves = finetune_summary(root)
    selection = pd.concat(
        [select_by_validation(build_report(root / step)).assign(ablation=step) for step in ("reg", "residual")]
    )
    selection = selection[["ablation", *[c for c in selection.columns if c != "ablation"]]]
    paths = {name: root / name for name in ("report.md", "claims.csv", "finetune.png", "reg.png")}
    write_atomic(paths["claims.csv"], lambda tmp: claims.to_csv(tmp, index=False))
    write_atomic(paths["finetune.png"], lambda tmp: curves.savefig(tmp, format="png", dpi=120))
    write_atomic(paths["reg.png"], lambda tmp: reg_figure(root).savefig(tmp, format="png", dpi=120))
    noniid = build_report(root / "noniid")
    text = render(claims, finetuning, selection, noniid_tests(root), shard_scores(noniid))
    write_atomic(paths["report.md"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if console is not None:
        console.print(text, markup=False, highlight=False)
    return paths


def claims_markdown(claims: pd.DataFrame) -> str:
    """The claims table: test accuracy in points, mean +- std over the pairs."""
    points = lambda m, s: f"{100 * m:.1f} +- {100 * s:.1f}"  # noqa: E731
    view = pd.DataFrame({
        "claim": claims["claim"],
        "statement": claims["statement"],
        "first": [f"{label}: {points(m, s)}" for label, m, s in zip(claims["first"], claims["first mean"], claims["first std"])],
        "second": [f"{label}: {points(m, s)}" for label, m, s in zip(claims["second"], claims["second mean"], claims["second std"])],
        "difference": [f"{100 * m:+.1f} +- {100 * s:.1f}" for m, s in zip(claims["difference mean"], claims["difference std"])],
        "pairs": claims["pairs"],
        "p": [format_value(p) for p in claims["p (paired t)"]],
        "verdict": ["**" + v + "**" for v in claims["verdict"]],
    })
    return to_markdown(view)


def render(claims: pd.DataFrame, finetuning: pd.DataFrame, selection: pd.DataFrame, tests: pd.DataFrame,
           shards: pd.DataFrame | None) -> str:
    return "\n".join([
        "# The paper's claims, measured (scripts/paper_tables.sh)",
        "",
        "Test accuracy in points (1,000 MNIST test images), mean +- standard deviation over the seed pairs "
        "(parents [0,1], [2,3], [4,5]; triples for N = 3; partition seeds 0, 1, 2 for non-IID). A claim holds (or does not) when its mean "
        "difference exceeds the difference's spread over the pairs; otherwise it is within noise. p: paired "
        "t-test over the pairs. Settings marked 'chosen on validation' were picked by the mean validation score.",
        "",
        claims_markdown(claims),
        "Per-pair differences (points): claims.csv.",
        "",
        "## Finetuning (step `main`): steps until the validation score is above the best parent's one-shot level",
        "",
        to_markdown(finetuning),
        "![finetuning curves](finetune.png)",
        "",
        "## Selection on validation (ablations `reg` and `residual`, one-shot OT, no repair)",
        "",
        "The setting with the best mean validation score, its test score, and the setting a table picking on "
        "test would show; optimism: how much better that table would look (points of accuracy as fractions).",
        "",
        to_markdown(selection),
        "![soft vs hard](reg.png)",
        "",
        "## Parents that know different things (step `noniid`)",
        "",
        "Per partition seed: test accuracy in points, and exact McNemar p-values of OT against each other "
        "model on the same 1,000 test images (the best parent is the best on test, the strictest comparison).",
        "",
        to_markdown(tests),
        "Test accuracy (points, mean +- std over the partition seeds) on each parent's own classes and on the "
        "rest: what a fused model must combine.",
        "",
        to_markdown(shards) if shards is not None else "(no per-shard scores in these runs)\n",
        "## Steps",
        "",
        *[f"- `{name}`: {what}" for name, what in STEPS.items()],
        "",
    ])


def _where(runs: pd.DataFrame, where: dict) -> pd.DataFrame:
    rows = runs
    for key, value in where.items():
        if key not in rows:
            raise TfuseError(f"the runs set no {key}; rerun scripts/paper_tables.sh into a new directory")
        rows = rows[rows[key] == value]
    if rows.empty:
        raise TfuseError(f"no run with {where}; rerun scripts/paper_tables.sh into a new directory")
    return rows


def _need(rows: pd.DataFrame, name: str) -> str:
    if name not in rows:
        raise TfuseError(f"no {name} in the runs' results; rerun scripts/paper_tables.sh with this version of tfuse")
    return name


def _per_pair(rows: pd.DataFrame, values: pd.Series) -> pd.Series:
    """Values indexed by the pair; a pair twice in one side is an ambiguous step."""
    series = pd.Series(values.to_numpy(), index=rows["pair"].to_numpy(), dtype=float)
    if series.index.has_duplicates:
        raise TfuseError(f"several runs per seed on one side of a claim ({list(series.index)}); one run per pair")
    return series
