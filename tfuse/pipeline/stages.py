"""The stages around the finetune: prepare (settings, task, parents), score_parents (the anchor
and the weights), fuse_parents (the method and its vanilla control), collect_results."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tfuse.arch import check_heads, check_same_architecture, family_for, folded, model_dtype
from tfuse.errors import TfuseError
from tfuse.fusion.cache import StatisticsCache
from tfuse.fusion.engine import FusionOutcome
from tfuse.fusion.learned import Objective
from tfuse.fusion.methods import METHODS, Calibration, settings_from_config
from tfuse.fusion.stream import stream_fuse
from tfuse.parents import obtain_parents, parent_shards
from tfuse.pipeline.finetune import plot_curves, steps_to_beat
from tfuse.pipeline.runtime import Stopwatch, resolve_device, seed_everything
from tfuse.pipeline.scores import class_scores, tested
from tfuse.pipeline.speed import inference_cost
from tfuse.pipeline.state import Baseline, Fused, Setup, Tuned
from tfuse.tasks import build_task
from tfuse.tasks.base import Task
from tfuse.tasks.mlm import for_models


def prepare(cfg: DictConfig, clock: Stopwatch) -> Setup:
    """Settings, device, task and parents (trained from the recipe or loaded)."""
    fusion = OmegaConf.to_container(cfg.fusion, resolve=True)
    settings = settings_from_config(fusion)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    with clock.stage("data"):
        task = build_task(cfg.data, cfg.eval_batch_size, device, cfg.parents, cfg.model.family, cfg.get("eval"))
    parts, partition = parent_shards(cfg, task) if not cfg.parents else (None, None)
    with clock.stage("parents"):
        parents = obtain_parents(cfg, task, device, parts)
        lazy = streamed(cfg, parents, device) if settings.stream else None
    models = [p.model for p in parents]
    task = for_models(task, models)  # bare encoders: embedding agreement with the parents
    widths_differ = any(
        a.shape != b.shape for m in models[1:] for a, b in zip(models[0].parameters(), m.parameters())
    )
    check_same_architecture(models, allow_widths=METHODS[settings.method].allows_widths)
    check_heads(models)
    return Setup(cfg, settings, device, task, parents, models, widths_differ, partition, lazy)


def streamed(cfg: DictConfig, parents: list, device: str) -> list:
    """fusion.stream: each parent as a skeleton over its checkpoint directory (the parents' own
    ``parents=[...]``, or a recipe parent's cache entry), read whole only when called."""
    from tfuse.arch.lazy import lazy_parent

    fitted = next((i for i, p in enumerate(parents) if p.head), None)
    if fitted is not None:
        raise TfuseError(f"parents[{fitted}] is a headless encoder whose head was fitted in memory, but fusion.stream "
                         "reads weights as stored; fuse it whole (fusion.stream=false)")
    dtype = model_dtype(cfg.model)
    lazy = [lazy_parent(p.source, cfg.model.family, f"parents[{i}]", None if dtype == "auto" else dtype, device)
            for i, p in enumerate(parents)]
    for parent, skeleton in zip(parents, lazy):
        parent.model = skeleton.model
        skeleton.load_on_call()
    return lazy


def score_parents(setup: Setup, clock: Stopwatch) -> Baseline:
    """Every parent and the ensemble on the test and validation splits (and the weighted ensemble
    when the weights are not uniform); the anchor and the weights."""
    task, models, predicted = setup.task, setup.models, {}
    with clock.stage("evaluate_parents"):
        one_shot = {f"parent_{i}": tested(task, [m], f"parent_{i}", predicted) for i, m in enumerate(models)}
        one_shot["ensemble"] = tested(task, models, "ensemble", predicted)
        one_shot_val = {f"parent_{i}": task.evaluate(m, "val") for i, m in enumerate(models)}
        one_shot_val["ensemble"] = task.evaluate_ensemble(models, "val")
        parent_val = [one_shot_val[f"parent_{i}"][task.primary_metric] for i in range(len(models))]
        anchor, val_scores = choose_anchor(setup.settings.anchor, parent_val, task)
        weights = resolve_alpha(setup, one_shot_val)
        if len(set(weights)) > 1:
            one_shot["ensemble_weighted"] = tested(task, models, "ensemble_weighted", predicted, weights)
            one_shot_val["ensemble_weighted"] = task.evaluate_ensemble(models, "val", weights=weights)
    setup.release()
    return Baseline(one_shot, one_shot_val, anchor, val_scores, weights, predicted)


def choose_anchor(anchor: int | str, scores: list[float], task: Task) -> tuple[int, list[float] | None]:
    """The anchor's index: as configured, or the parent best on the validation split (``scores``:
    each parent's there)."""
    if anchor != "best":
        if not 0 <= int(anchor) < len(scores):
            raise TfuseError(f"fusion.anchor={anchor} but there are {len(scores)} parents (0..{len(scores) - 1})")
        return int(anchor), None
    pick = max if task.higher_is_better else min
    return scores.index(pick(scores)), scores


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
        Objective(lambda: task.train_batches(settings.batch_size, settings.seed), task.loss,
                  lambda model: task.evaluate(model, "val")["loss"]),
    )
    control = [] if setup.widths_differ or not settings.control else ["vanilla"]
    names = control + ([settings.method] if settings.method != "vanilla" else [])
    models, outcomes, one_shot, predicted = {}, {}, {}, {}
    for name in names:
        stage = "vanilla" if name == "vanilla" and settings.method != "vanilla" else "fuse"
        with clock.stage(stage):
            if setup.lazy is not None:
                outcome = fuse_streamed(name, setup, graph, baseline.anchor, calibration, settings)
            else:
                models_for, graph_for = setup.models, graph
                if name != "vanilla" and getattr(settings, "maps", "permutation") == "orthogonal":
                    models_for, graphs = map(list, zip(*(folded(m) for m in setup.models)))
                    graph_for = graphs[baseline.anchor]
                outcome = METHODS[name].fuse(models_for, graph_for, baseline.anchor, calibration, settings)
        if stage == "fuse":
            clock.seconds.update({f"fuse.{k}": v for k, v in outcome.timings.items()})
        models[name], outcomes[name] = outcome.model, outcome
        one_shot[name] = tested(task, [outcome.model], name, predicted)
    with clock.stage("evaluate_val"):  # what settings are selected on
        one_shot_val = {name: task.evaluate(m, "val") for name, m in models.items()}
    return Fused(models, outcomes, one_shot, one_shot_val, predicted)


def fuse_streamed(name: str, setup: Setup, graph, anchor: int, calibration: Calibration, settings) -> FusionOutcome:
    """fusion.stream: OT (or its vanilla control) walked block by block over twins of the parents'
    skeletons (the parents stay as they are for the controls)."""
    if name not in ("ot", "vanilla"):
        raise TfuseError(f"fusion.stream fuses with fusion.method=ot (and its vanilla control), not {name}; "
                         "use fusion.stream=false")
    setup.release()
    memory = None if settings.memory_gb is None else int(settings.memory_gb * 2**30)
    return stream_fuse([p.twin() for p in setup.lazy], graph, settings, anchor, calibration.batches,
                       calibration.model_inputs, calibration.total, memory, calibration.repair, aligned=name == "ot",
                       competence=calibration.competence)


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
        "parents": [{"source": p.source, "seed": p.seed, "trained_seconds": p.trained_seconds}
                    | ({"head": p.head} if p.head else {}) for p in setup.parents],  # a headless one's: fitted
        "primary_metric": task.primary_metric,
        "not_applicable": {"vanilla": "widths differ"} if setup.widths_differ else {},
        "repair": {name: _fit_summary(o.repair) for name, o in fused.outcomes.items() if o.repair},
    }
    if setup.partition is not None:
        results["partition"] = setup.partition
    if setup.lazy is None:  # streamed parents are never held whole
        parents = {f"parent_{i}": [m] for i, m in enumerate(setup.models)}
        results["inference"] = inference_cost(task, parents | {"ensemble": setup.models} | {
            name: [m] for name, m in fused.models.items()}, settings.batch_size, settings.seed)
    if hasattr(task, "evaluate_with_predictions"):
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


def _fit_summary(fits: list) -> dict:
    """Mean relative calibration error of the refit layers before and after, and per layer."""
    return {
        "mean_error_before": sum(f.before for f in fits) / len(fits),
        "mean_error_after": sum(f.after for f in fits) / len(fits),
        "layers": {f.layer: [f.before, f.after] for f in fits},
    }
