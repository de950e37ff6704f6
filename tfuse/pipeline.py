"""`tfuse fuse` and `tfuse train`. A fusion run is a sequence of stages, each a function of the
previous ones' output: prepare (settings, task, parents) -> score_parents (and the anchor) ->
fuse_parents (the method and its vanilla control) -> finetune_all (with controls) ->
collect_results -> save_models."""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
import shlex
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tfuse.arch import check_heads, check_same_architecture, family_for
from tfuse.card import model_card, weights_sha256
from tfuse.config_keys import check_fusion_keys, fusion_sources, sources_summary
from tfuse.downstream import run_downstream
from tfuse.errors import TfuseError
from tfuse.fusion.cache import StatisticsCache
from tfuse.fusion.engine import FusionOutcome
from tfuse.fusion.methods import METHODS, Calibration, label_of, settings_from_config
from tfuse.fusion.settings import FusionSettings
from tfuse.io import new_directory, new_file, write_json
from tfuse.parents import obtain_parents, parent_configs, parent_shards, partition_of, save_parent, train_parent
from tfuse.partition import own_classes
from tfuse.tasks import build_task
from tfuse.tasks.base import Task
from tfuse.tasks.distill import TEACHERS, Distilled
from tfuse.tasks.mlm import for_models
from tfuse.training import train


def resolve_device(name: str) -> str:
    """The device every stage runs on (parents, task batches, fusion, finetuning): ``auto`` is
    cuda when a GPU is visible; a named GPU must exist."""
    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise TfuseError(f"device={name!r} is not known; allowed: auto, cpu, cuda, cuda:N")
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise TfuseError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if name.startswith("cuda:") and int(name[5:]) >= count:
        raise TfuseError(f"device={name} but {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Stopwatch:
    """Seconds spent in each named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def choose_anchor(anchor: int | str, models: list, task: Task) -> tuple[int, list[float] | None]:
    """The anchor's index: as configured, or the best parent on the validation split."""
    if anchor != "best":
        if not 0 <= int(anchor) < len(models):
            raise TfuseError(f"fusion.anchor={anchor} but there are {len(models)} parents (0..{len(models) - 1})")
        return int(anchor), None
    scores = [task.evaluate(m, "val")[task.primary_metric] for m in models]
    pick = max if task.higher_is_better else min
    return scores.index(pick(scores)), scores


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


@dataclass
class Setup:
    """Stage 1: the resolved settings, the task and the parents."""

    cfg: DictConfig
    settings: FusionSettings
    device: str
    task: Task
    parents: list
    models: list[torch.nn.Module]
    widths_differ: bool
    partition: dict | None = None  # results.json ``partition``: the shards of recipe parents


@dataclass
class Baseline:
    """Stage 2: the parents and their ensemble scored, the anchor chosen and the weights resolved."""

    one_shot: dict[str, dict]
    one_shot_val: dict[str, dict]
    anchor: int
    anchor_val_scores: list[float] | None
    weights: list[float]


@dataclass
class Fused:
    """Stage 3: every method's fused model (the vanilla control where widths agree), scored."""

    models: dict[str, torch.nn.Module]
    outcomes: dict[str, FusionOutcome]
    one_shot: dict[str, dict]  # test metrics of each fused model
    one_shot_val: dict[str, dict]


@dataclass
class Tuned:
    """Stage 4: the fused models and the controls finetuned alike, with their curves."""

    finetuned: dict[str, dict] = field(default_factory=dict)
    finetuned_val: dict[str, dict] = field(default_factory=dict)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)  # the fused ones
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # every model's test classes, where the task gives them
    curves: dict[str, list] = field(default_factory=dict)
    continuations: dict[str, str] = field(default_factory=dict)  # a causal LM's greedy text, per model


def run_fuse(cfg: DictConfig, out_dir: Path, console: Console) -> dict:
    """The whole fusion experiment, stage by stage; writes results.json, fused/ and finetuned/
    into ``out_dir``."""
    if (out_dir / "results.json").exists():
        raise TfuseError(f"'{out_dir}' already holds results.json; choose another hydra.run.dir")
    clock = Stopwatch()
    setup = prepare(cfg, clock)
    baseline = score_parents(setup, clock)
    fused = fuse_parents(setup, baseline, clock)
    tuned = finetune_all(setup, fused, clock, baseline.anchor)
    results = collect_results(setup, baseline, fused, tuned, clock, out_dir)
    results["fusion_settings"] = settings_in_force(setup.settings)
    if cfg.get("downstream") and cfg.downstream.get("task"):
        with clock.stage("downstream"):
            results["downstream"] = run_downstream(cfg, setup.models, fused.models, tuned.models, setup.device, console)
    save_models(setup, fused, tuned, results, out_dir)
    write_json(out_dir / "results.json", results)
    console.print(results_table(results))
    if "continuations" in results:
        console.print(continuation_table(results["continuations"]))
    console.print(sources_summary(results["fusion_settings"]), markup=False, highlight=False, soft_wrap=True)
    return results


def settings_in_force(settings: FusionSettings) -> dict[str, dict]:
    """results.json ``fusion_settings``: each setting's value and where it came from (the
    command line, the experiment, the package defaults), from the Hydra run's overrides and choices."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return fusion_sources(settings.as_dict(), None, {})
    hydra = HydraConfig.get()
    return fusion_sources(settings.as_dict(), list(hydra.overrides.task), dict(hydra.runtime.choices))


def save_models(setup: Setup, fused: Fused, tuned: Tuned, results: dict, out_dir: Path) -> None:
    """fused/ and finetuned/: the configured method's model, each with its model card and the
    parents' preprocessing file when they carried one."""
    main = setup.settings.method
    fam = family_for(setup.models[0])
    parents = [{**entry, **dict(zip(("hashed", "sha256"), weights_sha256(p.source, p.model)))}
               for entry, p in zip(results["parents"], setup.parents)]
    norm = getattr(getattr(setup.task, "data", None), "normalization", None)
    extra = [Path(norm.source)] if norm is not None else []
    command = _command_line(out_dir)
    for kind, models in (("fused", fused.models), ("finetuned", tuned.models)):
        if main in models:
            card = model_card(kind, main, label_of(main), results, parents, command)
            _save_model(fam, models[main], out_dir / kind, card, extra)


def prepare(cfg: DictConfig, clock: Stopwatch) -> Setup:
    """Settings, device, task and parents (trained from the recipe or loaded)."""
    fusion = OmegaConf.to_container(cfg.fusion, resolve=True)
    check_fusion_keys(fusion)  # a key no method knows: the closest known ones
    settings = settings_from_config(fusion)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    with clock.stage("data"):
        task = build_task(cfg.data, cfg.eval_batch_size, device, cfg.parents, cfg.model.family)
    parts, partition = parent_shards(cfg, task) if not cfg.parents else (None, None)
    with clock.stage("parents"):
        parents = obtain_parents(cfg, task, device, parts)
    models = [p.model for p in parents]
    task = for_models(task, models)  # bare encoders: embedding agreement with the parents
    widths_differ = any(
        a.shape != b.shape for m in models[1:] for a, b in zip(models[0].parameters(), m.parameters())
    )
    check_same_architecture(models, allow_widths=METHODS[settings.method].allows_widths)
    check_heads(models)
    return Setup(cfg, settings, device, task, parents, models, widths_differ, partition)


def score_parents(setup: Setup, clock: Stopwatch) -> Baseline:
    """Every parent and the ensemble on the test and validation splits (and the weighted ensemble
    when the weights are not uniform); the anchor and the weights."""
    task, models = setup.task, setup.models
    with clock.stage("evaluate_parents"):
        one_shot = {f"parent_{i}": task.evaluate(m) for i, m in enumerate(models)}
        one_shot["ensemble"] = task.evaluate_ensemble(models)
        one_shot_val = {f"parent_{i}": task.evaluate(m, "val") for i, m in enumerate(models)}
        one_shot_val["ensemble"] = task.evaluate_ensemble(models, "val")
        anchor, val_scores = choose_anchor(setup.settings.anchor, models, task)
        weights = resolve_alpha(setup, one_shot_val)
        if len(set(weights)) > 1:
            one_shot["ensemble_weighted"] = task.evaluate_ensemble(models, weights=weights)
            one_shot_val["ensemble_weighted"] = task.evaluate_ensemble(models, "val", weights=weights)
    return Baseline(one_shot, one_shot_val, anchor, val_scores, weights)


def resolve_alpha(setup: Setup, val: dict[str, dict]) -> list[float]:
    """The parents' weights: ``fusion.alpha`` as given, ``shard`` (in proportion to their shards'
    sizes) or ``val`` (to their validation score; for a loss, to exp(-loss))."""
    alpha, n, task = setup.settings.alpha, len(setup.models), setup.task
    if alpha == "shard":
        if setup.partition is None:
            raise TfuseError("fusion.alpha=shard weighs recipe parents by their shards; parents=[...] have none "
                             "(use fusion.alpha=val or a list)")
        sizes = [s["size"] for s in setup.partition["shards"]]
        return [z / sum(sizes) for z in sizes]
    if alpha == "val":
        scores = [val[f"parent_{i}"][task.primary_metric] for i in range(n)]
        scores = scores if task.higher_is_better else [math.exp(-v) for v in scores]
        if not sum(scores) > 0:
            raise TfuseError(f"fusion.alpha=val: every parent scores 0 on validation {task.primary_metric}; give the weights")
        return [v / sum(scores) for v in scores]
    return setup.settings.weights(n)


def fuse_parents(setup: Setup, baseline: Baseline, clock: Stopwatch) -> Fused:
    """The configured method's fused model, and vanilla fusion as the control where the widths
    agree (repaired alike: alignment's share of a repaired model)."""
    settings, task = dataclasses.replace(setup.settings, alpha=baseline.weights), setup.task
    graph = family_for(setup.models[baseline.anchor]).graph(setup.models[baseline.anchor])
    calibration = Calibration(
        lambda: task.calibration_batches(settings.samples, settings.batch_size, settings.seed),
        task.model_inputs,
        math.ceil(settings.samples / settings.batch_size),
        lambda: task.calibration_batches(settings.repair_samples, settings.batch_size, settings.seed),
        StatisticsCache(Path(setup.cfg.statistics_dir), {  # what the calibration batches are made of
            "task": task.name, "data": OmegaConf.to_container(setup.cfg.data, resolve=True),
            "parents": [p.source for p in setup.parents],  # a text family's tokenizer comes with them
        }),
        getattr(task, "competence", None),
    )
    names = ([] if setup.widths_differ else ["vanilla"]) + ([settings.method] if settings.method != "vanilla" else [])
    models, outcomes, one_shot = {}, {}, {}
    for name in names:
        stage = "vanilla" if name == "vanilla" and settings.method != "vanilla" else "fuse"
        with clock.stage(stage):
            outcome = METHODS[name].fuse(setup.models, graph, baseline.anchor, calibration, settings)
        if stage == "fuse":
            clock.seconds.update({f"fuse.{k}": v for k, v in outcome.timings.items()})
        models[name], outcomes[name] = outcome.model, outcome
        one_shot[name] = task.evaluate(outcome.model)
    with clock.stage("evaluate_val"):  # what settings are selected on
        one_shot_val = {name: task.evaluate(m, "val") for name, m in models.items()}
    return Fused(models, outcomes, one_shot, one_shot_val)


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
    controls = {f"parent_{i}": m for i, m in enumerate(setup.models)} if "parents" in wanted else {}
    for name, model in {**fused.models, **controls}.items():
        copy_ = copy.deepcopy(model)
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
        with clock.stage("finetune_scratch"):
            model, _ = train_parent(parent_configs(cfg)[anchor], task, cfg.seed, setup.device)
        _score(tuned, "scratch", model, task)
    return tuned


def _score(tuned: Tuned, name: str, model: torch.nn.Module, task: Task) -> None:
    tuned.finetuned[name] = task.evaluate(model)
    tuned.finetuned_val[name] = task.evaluate(model, "val")
    if hasattr(task, "predictions"):
        tuned.predictions[name] = task.predictions([model])[0]
    if hasattr(task, "continuation"):
        tuned.continuations[name] = task.continuation(model)


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


def collect_results(setup: Setup, baseline: Baseline, fused: Fused, tuned: Tuned, clock: Stopwatch, out_dir: Path) -> dict:
    """results.json's content (and finetune.png when the finetune was a curve)."""
    task, settings = setup.task, setup.settings
    results = {
        "one_shot": {**baseline.one_shot, **fused.one_shot},
        "one_shot_val": {**baseline.one_shot_val, **fused.one_shot_val},
        "finetuned": tuned.finetuned,
        "finetuned_val": tuned.finetuned_val,
        "timings": clock.seconds,
        "settings": settings.as_dict(),
        "anchor": baseline.anchor,
        "anchor_val_scores": baseline.anchor_val_scores,
        "alpha": baseline.weights,
        "parents": [{"source": p.source, "seed": p.seed, "trained_seconds": p.trained_seconds} for p in setup.parents],
        "primary_metric": task.primary_metric,
        "not_applicable": {"vanilla": "widths differ"} if setup.widths_differ else {},
        "repair": {name: _fit_summary(o.repair) for name, o in fused.outcomes.items() if o.repair},
    }
    if setup.partition is not None:
        results["partition"] = setup.partition
    if hasattr(task, "predictions"):
        results.update(class_scores(setup, baseline, fused, tuned))
    if hasattr(task, "continuation"):
        one_shot = {f"parent_{i}": m for i, m in enumerate(setup.models)} | fused.models
        results["continuations"] = {
            "prompt": task.prompt, "one_shot": {name: task.continuation(m) for name, m in one_shot.items()},
            "finetuned": tuned.continuations,
        }
    info = {name: o.info for name, o in fused.outcomes.items() if o.info}
    if info:
        results["methods"] = info
    if tuned.curves:
        pick = max if task.higher_is_better else min
        level = pick(baseline.one_shot_val[f"parent_{i}"][task.primary_metric] for i in range(len(setup.models)))
        results["curves"] = tuned.curves
        results["steps_to_beat_best_parent"] = {
            name: steps_to_beat(curve, level, task.higher_is_better) for name, curve in tuned.curves.items()
        }
        plot_curves(tuned.curves, level, task.primary_metric, out_dir / "finetune.png")
    return results


def class_scores(setup: Setup, baseline: Baseline, fused: Fused, tuned: Tuned) -> dict:
    """Every model's test predictions (``test_predictions``, ``test_predictions_finetuned``, with
    ``test_labels``: paired tests), its accuracy per class (``per_class``, ``per_class_finetuned``)
    and, under a non-IID partition, on each parent's own classes and on the rest (``by_shard``,
    ``by_shard_finetuned``)."""
    task, models = setup.task, setup.models
    weighted = {"ensemble": None, "ensemble_weighted": baseline.weights}
    predicted = {}
    for name in baseline.one_shot:
        if name in weighted:
            predicted[name], labels = task.predictions(models, weights=weighted[name])
        else:
            predicted[name], labels = task.predictions([models[int(name.split("_")[1])]])
    for name, model in fused.models.items():
        predicted[name], labels = task.predictions([model])
    tuned_predicted = tuned.predictions
    n_classes = int(labels.max()) + 1 if getattr(task, "num_classes", None) is None else task.num_classes

    def per_class(pred: torch.Tensor) -> list[float | None]:
        return [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else None for c in range(n_classes)]

    out = {
        "test_labels": labels.tolist(),
        "test_predictions": {name: p.tolist() for name, p in predicted.items()},
        "test_predictions_finetuned": {name: p.tolist() for name, p in tuned_predicted.items()},
        "per_class": {name: per_class(p) for name, p in predicted.items()},
        "per_class_finetuned": {name: per_class(p) for name, p in tuned_predicted.items()},
    }
    owned = own_classes(setup.partition, len(models)) if setup.partition else None
    if owned:
        def share(pred: torch.Tensor, classes: list[int]) -> float | None:
            keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
            return float((pred[keep] == labels[keep]).float().mean()) if classes and keep.any() else None

        rest = [[c for c in range(n_classes) if c not in own] for own in owned]
        for key, models_predicted in (("by_shard", predicted), ("by_shard_finetuned", tuned_predicted)):
            out[key] = {
                name: [{"own": share(p, own), "rest": share(p, other)} for own, other in zip(owned, rest)]
                for name, p in models_predicted.items()
            }
        out["own_classes"] = owned
    return out


def _fit_summary(fits: list) -> dict:
    """Mean relative calibration error of the refit layers before and after, and per layer."""
    return {
        "mean_error_before": sum(f.before for f in fits) / len(fits),
        "mean_error_after": sum(f.after for f in fits) / len(fits),
        "layers": {f.layer: [f.before, f.after] for f in fits},
    }


def _save_model(fam, model, path: Path, card: str, extra: list[Path]) -> None:
    """The model, its card and ``extra`` files that travel with it (the parents' preprocessing)."""
    with new_directory(path) as tmp:
        fam.save(model, str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for file in extra:
            if not (tmp / file.name).exists():  # timm keeps its preprocessing in config.json: the family's own
                shutil.copyfile(file, tmp / file.name)


def _command_line(out_dir: Path) -> str:
    """``tfuse fuse`` with the run's overrides (as Hydra recorded them)."""
    recorded = out_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(recorded) if recorded.exists() else []
    return " ".join(["tfuse fuse", *(shlex.quote(str(o)) for o in overrides)])


CONTROLS = ("parents", "scratch", "none")


def _controls(cfg: DictConfig) -> set[str]:
    """``finetune.controls``: one of CONTROLS or a list of them (``[parents,scratch]``)."""
    given = cfg.finetune.get("controls", "parents")
    names = [given] if isinstance(given, str) else list(given)
    unknown = [c for c in names if c not in CONTROLS]
    if unknown or not names:
        raise TfuseError(f"finetune.controls={given!r} is not known; allowed: {', '.join(CONTROLS)} or a list "
                         "such as [parents,scratch]")
    return set(names) - {"none"}


def results_table(results: dict) -> Table:
    """Models as rows; one-shot and finetuned metrics as columns."""
    one_shot, tuned = results["one_shot"], results["finetuned"]
    metrics = list(next(iter(one_shot.values())))
    title = Text("tfuse: one-shot and finetuned (VF: vanilla fusion, OT: OT fusion)", no_wrap=True, overflow="ignore")
    table = Table(title=title, title_justify="left")  # the title on one line, however narrow the table
    table.add_column("model")
    for m in metrics:
        table.add_column(f"one-shot {m}", justify="right")
    for m in metrics if tuned else []:
        table.add_column(f"finetuned {m}", justify="right")
    beat = results.get("steps_to_beat_best_parent")
    if beat:
        table.add_column("steps until above the best parent (val)", justify="right")
    shards = results.get("by_shard", {})
    count = len(next(iter(shards.values()))) if shards else 0
    for i in range(count):  # what a fused model must combine: each parent's own classes, and the rest
        table.add_column(f"own {i}", justify="right")
        table.add_column(f"rest {i}", justify="right")
    for name in [*one_shot, *(n for n in tuned if n not in one_shot)]:
        scores = one_shot.get(name, {})
        row = [label_of(name)] + [_fmt(m, scores[m]) if m in scores else "" for m in metrics]
        if tuned:
            row += [_fmt(m, tuned[name][m]) if name in tuned else "" for m in metrics]
        if beat:
            row.append("" if name not in beat else "never" if beat[name] is None else str(beat[name]))
        for part in shards.get(name, [{}] * count):
            row += ["" if part.get(k) is None else f"{100 * part[k]:.1f}%" for k in ("own", "rest")]
        table.add_row(*row)
    for name, why in results.get("not_applicable", {}).items():
        table.add_row(label_of(name), *[f"n/a: {why}" if i == 0 else "" for i in range(len(table.columns) - 1)])
    return table


def continuation_table(found: dict) -> Table:
    """Each model's greedy continuation of the prompt, one-shot and finetuned."""
    table = Table(title=f"greedy continuations of {found['prompt']!r}", title_justify="left")
    table.add_column("model")
    table.add_column("one-shot")
    if found["finetuned"]:
        table.add_column("finetuned")
    for name in [*found["one_shot"], *(n for n in found["finetuned"] if n not in found["one_shot"])]:
        row = [label_of(name), repr(found["one_shot"].get(name, ""))]
        table.add_row(*row, *([repr(found["finetuned"].get(name, ""))] if found["finetuned"] else []))
    return table


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if "accuracy" in metric else f"{value:.4f}"


def run_train(cfg: DictConfig, out_dir: Path, console: Console) -> dict:
    """One parent from scratch with ``seed``; saved to ``out_dir/model`` beside its metrics."""
    if not partition_of(cfg).iid:
        raise TfuseError(f"partition={partition_of(cfg).kind}: tfuse train trains one parent on the whole training "
                         "split; partitions deal shards to tfuse fuse's recipe parents (drop the override)")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    task = build_task(cfg.data, cfg.eval_batch_size, device, family_name=cfg.model.family)
    model, metrics = train_parent(cfg, task, cfg.seed, device)
    save_parent(model, cfg, metrics, cfg.seed, out_dir / "model")
    write_json(out_dir / "metrics.json", metrics)
    console.print(
        f"parent (seed {cfg.seed}): test {task.primary_metric} {metrics['test'][task.primary_metric]:.4f}, "
        f"saved to {out_dir / 'model'}"
    )
    return metrics
