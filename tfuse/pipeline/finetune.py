"""Stage 4, finetune_all: every fused model and its controls finetuned alike (the same samples,
budget, schedule and method: every weight, or LoRA adapters merged back), with their validation
curves."""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from tfuse.arch import family_for
from tfuse.errors import TfuseError
from tfuse.fusion.methods import label_of
from tfuse.io import new_file
from tfuse.parents import as_dtype, parent_configs, train_parent
from tfuse.pipeline.runtime import Stopwatch
from tfuse.pipeline.scores import tested
from tfuse.pipeline.state import Baseline, Fused, Setup, Tuned
from tfuse.tasks.base import Task
from tfuse.tasks.distill import TEACHERS, Distilled
from tfuse.training import train

CONTROLS = ("parents", "scratch", "none")
METHODS = ("full", "lora")


def finetune_all(setup: Setup, baseline: Baseline, fused: Fused, clock: Stopwatch) -> Tuned:
    """Every fused model and its controls finetuned on the same samples (``finetune.max_samples``
    of the training split, default all) with the same budget, schedule and method: every parent
    (``parents``), and a fresh model of the anchor's recipe trained on those samples alone
    (``scratch``). With widths that differ, the anchor finetuned alone is the compression baseline.
    Each curve starts from the model's one-shot validation score (not evaluated again)."""
    cfg, tuned = setup.cfg, Tuned()
    if cfg.finetune.steps <= 0:
        return tuned
    task = finetune_task(setup.task, cfg)
    wanted = _controls(cfg)
    controls = {f"parent_{i}": i for i in range(len(setup.models))} if "parents" in wanted else {}
    one_shot_val = {**baseline.one_shot_val, **fused.one_shot_val}
    for name, model in {**fused.models, **controls}.items():
        copy_ = copy.deepcopy(setup.whole(model) if isinstance(model, int) else model)
        setup.release()
        with clock.stage(f"finetune_{name}"):
            stats = finetune(copy_, task, cfg, cfg.seed, setup.device, label_of(name), setup.models,
                             one_shot_val[name][task.primary_metric])
        _score(tuned, name, copy_, task, stats["val"])
        if "curve" in stats:
            tuned.curves[name] = stats["curve"]
        if name in fused.models:
            tuned.models[name] = copy_
    if "scratch" in wanted:
        if cfg.parents:
            raise TfuseError("finetune.controls=scratch trains the parents' recipe, but parents=[...] are checkpoints; "
                             "drop scratch from finetune.controls")
        recipe = parent_configs(cfg)[baseline.anchor]
        with clock.stage("finetune_scratch"):
            model, metrics = train_parent(recipe, task, cfg.seed, setup.device)
        scored = as_dtype(model, recipe)  # scored in the dtype the fused models have
        _score(tuned, "scratch", scored, task, metrics["val"] if scored is model else None)
    return tuned


def _score(tuned: Tuned, name: str, model: nn.Module, task: Task, val: dict | None) -> None:
    """A finetuned model's test scores (and classes) and its validation scores (``val`` when known)."""
    tuned.finetuned[name] = tested(task, [model], name, tuned.predictions)
    tuned.finetuned_val[name] = task.evaluate(model, "val") if val is None else val
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


def finetune(model: nn.Module, task: Task, cfg: DictConfig, seed: int, device: str, label: str, parents=(),
             start: float | None = None) -> dict:
    """The short finetune every fused model and control gets alike (distilled from the ``parents``'
    ensemble with ``finetune.teacher=ensemble``; ``finetune.method=lora``: low-rank adapters,
    merged back). Returns ``train``'s stats with ``val``, the finetuned model's validation
    metrics, and with ``finetune.eval_every`` its validation curve of the task's primary metric,
    from ``start`` (the one-shot score, when known) to ``val``'s."""
    f = cfg.finetune
    teacher, method = finetune_options(cfg)
    if teacher == "ensemble":
        task = Distilled(task, parents, f.get("temperature", 2.0), f.get("kd_weight", 0.5))
    with lora(model, f.get("lora_rank", 8), f.get("lora_alpha", 16)) if method == "lora" else nullcontext():
        stats = train(
            model, task, steps=f.steps, lr=f.lr, batch_size=f.batch_size, seed=seed, warmup=f.warmup,
            schedule="cosine" if f.cosine else "constant", weight_decay=f.weight_decay, device=device,
            description=f"finetuning {label}", eval_every=f.get("eval_every", 0),
            evaluate=lambda: task.evaluate(model, "val")[task.primary_metric], start=start,
        )
    stats["val"] = task.evaluate(model, "val")
    if "curve" in stats:
        stats["curve"].append([f.steps, stats["val"][task.primary_metric]])
    return stats


def finetune_options(cfg: DictConfig) -> tuple[str, str]:
    """``finetune.teacher`` and ``finetune.method``, checked with the method's knobs and the
    controls (``run_fuse`` checks them before anything runs)."""
    f = cfg.finetune
    teacher, method = f.get("teacher", "none"), f.get("method", "full")
    if teacher not in TEACHERS:
        raise TfuseError(f"finetune.teacher={teacher!r} is not known; allowed: {', '.join(TEACHERS)}")
    if method not in METHODS:
        raise TfuseError(f"finetune.method={method!r} is not known; allowed: {', '.join(METHODS)}")
    if method == "lora":
        _check_lora(f.get("lora_rank", 8), f.get("lora_alpha", 16))
    _controls(cfg)
    return teacher, method


def _check_lora(rank, alpha) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise TfuseError(f"finetune.lora_rank={rank!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise TfuseError(f"finetune.lora_alpha={alpha!r} must be a positive number")


@contextmanager
def lora(model: nn.Module, rank: int, alpha: float) -> Iterator[None]:
    """``model`` with LoRA adapters (peft) on every linear layer inside its blocks (found from its
    family's flow graph, so no layer is named per family), the only weights it trains; on exit the
    adapters are merged into those layers and ``model`` is a plain model of its family again."""
    from peft import LoraConfig, get_peft_model

    _check_lora(rank, alpha)
    graph = family_for(model).graph(model)
    blocks = tuple(f"{block}." for block in graph.blocks)
    targets = [name for name, module in model.named_modules()
               if name.startswith(blocks) and (isinstance(module, nn.Linear) or name in graph.transposed)]
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                        fan_in_fan_out=any(name in graph.transposed for name in targets))
    with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        adapted = get_peft_model(model, config)  # adapters injected in place: ``model`` is still called as it is
    yield
    adapted.merge_and_unload()
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])


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
