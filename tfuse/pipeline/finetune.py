"""Stage 4, finetune_all: every fused model and its controls finetuned alike (the same samples,
budget and schedule), with their validation curves."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import DictConfig

from tfuse.errors import TfuseError
from tfuse.fusion.methods import label_of
from tfuse.io import new_file
from tfuse.parents import as_dtype, parent_configs, train_parent
from tfuse.pipeline.runtime import Stopwatch
from tfuse.pipeline.state import Fused, Setup, Tuned
from tfuse.tasks.base import Task
from tfuse.tasks.distill import TEACHERS, Distilled
from tfuse.training import train

CONTROLS = ("parents", "scratch", "none")


def finetune_all(setup: Setup, fused: Fused, clock: Stopwatch, anchor: int = 0) -> Tuned:
    """Every fused model and its controls finetuned on the same samples (``finetune.max_samples``
    of the training split, default all) with the same budget and schedule: every parent
    (``parents``), and a fresh model of the anchor's recipe trained on those samples alone
    (``scratch``). With widths that differ, the anchor finetuned alone is the compression baseline."""
    cfg, tuned = setup.cfg, Tuned()
    if cfg.finetune.steps <= 0:
        return tuned
    task = finetune_task(setup.task, cfg)
    wanted = _controls(cfg)
    controls = {f"parent_{i}": i for i in range(len(setup.models))} if "parents" in wanted else {}
    for name, model in {**fused.models, **controls}.items():
        copy_ = copy.deepcopy(setup.whole(model) if isinstance(model, int) else model)
        setup.release()
        with clock.stage(f"finetune_{name}"):
            stats = finetune(copy_, task, cfg, cfg.seed, setup.device, label_of(name), setup.models)
        _score(tuned, name, copy_, task)
        if "curve" in stats:
            tuned.curves[name] = stats["curve"]
        if name in fused.models:
            tuned.models[name] = copy_
    if "scratch" in wanted:
        if cfg.parents:
            raise TfuseError("finetune.controls=scratch trains the parents' recipe, but parents=[...] are checkpoints; "
                             "drop scratch from finetune.controls")
        recipe = parent_configs(cfg)[anchor]
        with clock.stage("finetune_scratch"):
            model, _ = train_parent(recipe, task, cfg.seed, setup.device)
        _score(tuned, "scratch", as_dtype(model, recipe), task)  # scored in the dtype the fused models have
    return tuned


def _score(tuned: Tuned, name: str, model: torch.nn.Module, task: Task) -> None:
    tuned.finetuned[name] = task.evaluate(model)
    tuned.finetuned_val[name] = task.evaluate(model, "val")
    if hasattr(task, "predictions"):
        tuned.predictions[name] = task.predictions([model])[0]
    if hasattr(task, "continuation"):
        tuned.continuations[name] = task.continuation(model)


def _controls(cfg: DictConfig) -> set[str]:
    """``finetune.controls``: one of CONTROLS or a list of them (``[parents,scratch]``)."""
    given = cfg.finetune.get("controls", "parents")
    names = [given] if isinstance(given, str) else list(given)
    unknown = [c for c in names if c not in CONTROLS]
    if unknown or not names:
        raise TfuseError(f"finetune.controls={given!r} is not known; allowed: {', '.join(CONTROLS)} or a list "
                         "such as [parents,scratch]")
    return set(names) - {"none"}


def finetune_task(task: Task, cfg: DictConfig) -> Task:
    """The task the finetune trains on: ``finetune.max_samples`` training examples, a subset seeded
    by ``seed`` (null: all of them)."""
    limit = cfg.finetune.get("max_samples")
    if limit is None:
        return task
    if not isinstance(limit, int) or limit < 1:
        raise TfuseError(f"finetune.max_samples={limit} must be a positive number of training samples (or null: all)")
    if not hasattr(task, "restricted"):
        raise TfuseError(f"finetune.max_samples: the {task.name} task cannot be restricted to a subset; drop it")
    order = torch.randperm(task.train_size, generator=torch.Generator().manual_seed(cfg.seed))
    return task.restricted(order[:limit].sort().values)


def finetune(model, task: Task, cfg: DictConfig, seed: int, device: str, label: str, parents=()) -> dict:
    """The short finetune every fused model and control gets alike (distilled from the ``parents``'
    ensemble with ``finetune.teacher=ensemble``); with ``finetune.eval_every``, its validation curve
    of the task's primary metric."""
    f = cfg.finetune
    teacher = f.get("teacher", "none")
    if teacher not in TEACHERS:
        raise TfuseError(f"finetune.teacher={teacher!r} is not known; allowed: {', '.join(TEACHERS)}")
    if teacher == "ensemble":
        task = Distilled(task, parents, f.get("temperature", 2.0), f.get("kd_weight", 0.5))
    return train(
        model, task, steps=f.steps, lr=f.lr, batch_size=f.batch_size, seed=seed, warmup=f.warmup,
        schedule="cosine" if f.cosine else "constant", weight_decay=f.weight_decay, device=device,
        description=f"finetuning {label}", eval_every=f.get("eval_every", 0),
        evaluate=lambda: task.evaluate(model, "val")[task.primary_metric],
    )


def steps_to_beat(curve: list, level: float, higher_is_better: bool) -> int | None:
    """The first evaluated step whose score is better than ``level`` (None: never)."""
    for step, value in curve:
        if (value > level) if higher_is_better else (value < level):
            return int(step)
    return None


def plot_curves(curves: dict[str, list], level: float, metric: str, path: Path) -> None:
    """finetune.png: validation metric against steps, one line per model, the best parent's
    one-shot level across."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        axes.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", markersize=3, label=label_of(name))
    axes.axhline(level, color="grey", linestyle="--", label="best parent, one-shot")
    axes.set(xlabel="finetuning step", ylabel=f"validation {metric}", title="finetuning (same budget and schedule for every model)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    with new_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=150)
