"""``eval.interpolation``: every method's loss along the straight line between the anchor and each
aligned parent (``(1 - lambda) anchor + lambda parent``, on the test split), and the loss barrier
that mode-connectivity work compares on: the largest excess of the loss over the line between the
endpoints' losses. For the vanilla control the parents are not moved: its barrier is the plain
average's. ``midpoint_barrier`` is the fused model's own excess over the alpha-weighted mean of
the endpoints' losses (after the repair, where one ran)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.apply import average
from tfuse.fusion.engine import parameters, with_state
from tfuse.fusion.methods import label_of
from tfuse.io import new_file
from tfuse.pipeline.runtime import Stopwatch
from tfuse.pipeline.state import Baseline, Fused, Setup
from tfuse.progress import track


def lambdas_of(cfg: DictConfig) -> list[float]:
    """The sorted lambdas of ``eval.interpolation`` with both endpoints; none when it is unset."""
    given = (cfg.get("eval") or {}).get("interpolation") or []
    try:
        values = [float(v) for v in given]
    except (TypeError, ValueError):
        values = [-1.0]
    if any(not 0 <= v <= 1 for v in values):
        raise TfuseError(f"eval.interpolation={list(given)}: give lambdas between 0 and 1, e.g. "
                         "eval.interpolation=[0,0.25,0.5,0.75,1]")
    if values and cfg.fusion.get("stream"):
        raise TfuseError("eval.interpolation scores whole interpolated models; it does not run with fusion.stream=true")
    return sorted({0.0, 1.0, *values}) if values else []


def curves(task, parents: Sequence[nn.Module], anchor: int, lambdas: Sequence[float]) -> dict[str, dict[str, list]]:
    """Per non-anchor parent ``parent_k``: each test metric at every lambda between the anchor
    (lambda 0) and that parent (lambda 1), all in the anchor's architecture."""
    base = parameters(parents[anchor])
    out = {}
    for k, parent in enumerate(parents):
        if k == anchor:
            continue
        other = parameters(parent)
        rows = [task.evaluate(with_state(parents[anchor], average([base, other], [1 - lam, lam])), "test")
                for lam in lambdas]
        if "loss" not in rows[0]:
            raise TfuseError(f"eval.interpolation: the task reports no loss (only {sorted(rows[0])})")
        out[f"parent_{k}"] = {metric: [row[metric] for row in rows] for metric in rows[0]}
    return out


def barriers(lines: dict[str, dict[str, list]], lambdas: Sequence[float], fused_loss: float, weights: Sequence[float],
             anchor: int) -> dict:
    """The barrier of each curve (its largest excess over the endpoints' line), the excess at
    lambda 0.5, and the fused model's excess over the weighted mean of the endpoints' losses."""
    def excess(loss: list[float]) -> list[float]:
        return [v - ((1 - lam) * loss[0] + lam * loss[-1]) for lam, v in zip(lambdas, loss)]

    out: dict = {"barrier": {p: max(excess(c["loss"])) for p, c in lines.items()}}
    if 0.5 in lambdas:
        out["barrier_at_half"] = {p: excess(c["loss"])[list(lambdas).index(0.5)] for p, c in lines.items()}
    ends = {int(p.removeprefix("parent_")): c["loss"][-1] for p, c in lines.items()}
    ends[anchor] = next(iter(lines.values()))["loss"][0]
    out["midpoint_barrier"] = fused_loss - sum(w * ends[k] for k, w in enumerate(weights))
    return out


def interpolate(setup: Setup, baseline: Baseline, fused: Fused, clock: Stopwatch, out_dir: Path) -> dict | None:
    """results.json ``interpolation`` for every fused model's method, and interpolation.png in
    ``out_dir``; None when ``eval.interpolation`` is unset."""
    lambdas = lambdas_of(setup.cfg)
    if not lambdas:
        return None
    methods = {}
    with clock.stage("interpolation"):
        for name, outcome in track(fused.outcomes.items(), "interpolating", total=len(fused.outcomes)):
            lines = curves(setup.task, outcome.aligned(), baseline.anchor, lambdas)
            methods[name] = {"curves": lines, **barriers(lines, lambdas, fused.one_shot[name]["loss"], baseline.weights,
                                                         baseline.anchor),
                             "repaired": setup.settings.repair != "none"}
    result = {"split": "test", "metric": "loss", "lambdas": lambdas, "methods": methods}
    plot_interpolation(result, out_dir / "interpolation.png")
    return result


def plot_interpolation(result: dict, path: Path) -> None:
    """interpolation.png: the test loss against lambda, one line per method and moved parent,
    the endpoints' straight line dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    lambdas = result["lambdas"]
    for name, method in result["methods"].items():
        for parent, curve in method["curves"].items():
            loss = curve["loss"]
            line, = axes.plot(lambdas, loss, marker="o", markersize=3,
                              label=f"{label_of(name)} (barrier {method['barrier'][parent]:.3f})"
                              + (f", {parent}" if len(method["curves"]) > 1 else ""))
            axes.plot([0, 1], [loss[0], loss[-1]], linestyle="--", color=line.get_color(), alpha=0.5)
    axes.set(xlabel="lambda (0: anchor, 1: aligned parent)", ylabel=f"{result['split']} loss",
             title="interpolation between the anchor and each aligned parent")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    with new_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=150)
