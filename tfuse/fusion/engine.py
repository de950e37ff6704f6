"""The generic fusion engine: statistics -> maps -> aligned parents -> weighted average -> repair.

It reads the architecture only through its ``FlowGraph``; it never names a layer.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State, align, average
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.maps import compute_maps
from tfuse.fusion.plan import make_plan
from tfuse.fusion.repair import LayerFit, repair
from tfuse.fusion.settings import FusionSettings
from tfuse.fusion.statistics import Statistics, collect_statistics

Batch = dict[str, torch.Tensor]


@dataclass
class FusionOutcome:
    model: nn.Module
    maps: list[dict[str, torch.Tensor]]  # per parent, against the final reference
    timings: dict[str, float] = field(default_factory=dict)
    repair: list[LayerFit] = field(default_factory=list)  # each refit layer's error before / after


def parameters(model: nn.Module, graph: FlowGraph | None = None) -> State:
    """The model's parameters; with ``graph``, its virtual ones (fused parameters split)."""
    state = {name: p.detach() for name, p in model.named_parameters()}
    return graph.to_virtual(state) if graph is not None else state


def check_graph(model: nn.Module, graph: FlowGraph, label: str) -> None:
    """Every parameter of the model is described, and every description names a parameter."""
    state = parameters(model, graph)
    names = set(state)
    missing = sorted(names - set(graph.params))
    extra = sorted(set(graph.params) - names)
    if missing or extra:
        raise TfuseError(
            f"{label}: the flow graph does not describe this model (undescribed parameters: "
            f"{missing[:3]}, unknown ones: {extra[:3]}); is it the architecture the config says?"
        )
    shapes = {name: p.dim() for name, p in state.items()}
    for name, axes in graph.params.items():
        if len(axes) != shapes[name]:
            raise TfuseError(f"{label}: parameter '{name}' has {len(axes)} axes in the flow graph")


def with_state(template: nn.Module, state: State, graph: FlowGraph | None = None) -> nn.Module:
    """A copy of ``template`` carrying ``state`` (virtual parameters when ``graph`` is given)."""
    if graph is not None:
        state = graph.to_real(state)
    model = copy.deepcopy(template)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if state[name].shape != p.shape:
                raise TfuseError(
                    f"parameter '{name}' has shape {tuple(state[name].shape)} but the target model "
                    f"expects {tuple(p.shape)}"
                )
            p.copy_(state[name].to(p.device, p.dtype))
    return model


def vanilla_fuse(models: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """Plain weighted average of the parameters (no alignment)."""
    return with_state(models[0], average([parameters(m) for m in models], weights))


def repair_fused(
    fused: nn.Module,
    targets: Sequence[nn.Module],
    weights: Sequence[float],
    graph: FlowGraph,
    settings: FusionSettings,
    calibration: Callable[[], Iterable[Batch]] | None,
    model_inputs: Callable[[Batch], Batch],
) -> list[LayerFit]:
    """``fusion.repair`` on a fused model in the basis of ``targets`` (aligned parents)."""
    if settings.repair == "none":
        return []
    if calibration is None:
        raise TfuseError(f"fusion.repair={settings.repair} needs calibration data")
    return repair(fused, targets, weights, graph, settings, calibration(), model_inputs)


def ot_fuse(
    models: Sequence[nn.Module],
    graph: FlowGraph,
    settings: FusionSettings,
    anchor: int,
    calibration: Callable[[], Iterable[Batch]] | None,
    model_inputs: Callable[[Batch], Batch],
    batches: int | None = None,
    repair_calibration: Callable[[], Iterable[Batch]] | None = None,
) -> FusionOutcome:
    """Fuse ``models`` into the anchor's architecture.

    Iteration 1 aligns every other parent to the anchor; each further iteration re-aligns every
    parent (anchor included) to the current fused model, an OT barycentre. ``fusion.repair`` then
    refits the result toward the aligned parents on ``repair_calibration`` (default: ``calibration``).
    """
    if len(models) < 2:
        raise TfuseError("fusion needs at least two parents")
    for i, m in enumerate(models):
        check_graph(m, graph, f"parent {i}")
    _check_fixed_axes(models, graph, anchor)
    weights = settings.weights(len(models))
    plan = make_plan(graph, settings)
    timings = {"statistics": 0.0, "transport": 0.0, "align": 0.0}
    reference = models[anchor]
    movers = [i for i in range(len(models)) if i != anchor]
    maps: list[dict[str, torch.Tensor]] = []
    for _ in range(settings.iterations):
        ref_state = parameters(reference, graph)
        start = time.perf_counter()
        stats = _statistics([models[i] for i in movers], reference, graph, plan, calibration, model_inputs, settings, batches)
        timings["statistics"] += time.perf_counter() - start
        aligned = {anchor: ref_state} if reference is models[anchor] else {}
        maps = [{} for _ in models]
        for k, i in enumerate(movers):
            state = parameters(models[i], graph)
            start = time.perf_counter()
            maps[i] = compute_maps(
                plan, graph, settings,
                stats.pairs[k] if stats else None, stats.magnitude[k] if stats else None, state, ref_state,
            )
            timings["transport"] += time.perf_counter() - start
            start = time.perf_counter()
            aligned[i] = align(state, graph, plan, maps[i])
            timings["align"] += time.perf_counter() - start
        fused = average([aligned[i] for i in range(len(models))], weights)
        reference = with_state(models[anchor], fused, graph)
        movers = list(range(len(models)))
    fits: list[LayerFit] = []
    if settings.repair != "none":
        start = time.perf_counter()
        targets = [with_state(models[anchor], aligned[i], graph) for i in range(len(models))]
        fits = repair_fused(reference, targets, weights, graph, settings, repair_calibration or calibration, model_inputs)
        timings["repair"] = time.perf_counter() - start
    return FusionOutcome(reference, maps, timings, fits)


def _check_fixed_axes(models: Sequence[nn.Module], graph: FlowGraph, anchor: int) -> None:
    """Only hidden widths may differ between parents: axes no space aligns (classes, pixels,
    positions, kernel sizes) must agree with the anchor's."""
    ref = parameters(models[anchor], graph)
    for i, m in enumerate(models):
        for name, w in parameters(m, graph).items():
            for axis, spec in enumerate(graph.params[name]):
                if spec is None and w.shape[axis] != ref[name].shape[axis]:
                    raise TfuseError(
                        f"parents {i} and {anchor} differ in parameter '{name}' axis {axis} ({w.shape[axis]} vs "
                        f"{ref[name].shape[axis]}), which is not a hidden width: fusion allows different widths "
                        "only (same depth, patch size, image size, classes)"
                    )


def _statistics(
    models: list[nn.Module],
    reference: nn.Module,
    graph: FlowGraph,
    plan,
    calibration: Callable[[], Iterable[Batch]] | None,
    model_inputs: Callable[[Batch], Batch],
    settings: FusionSettings,
    batches: int | None,
) -> Statistics | None:
    if settings.cost != "activations":
        return None
    if calibration is None:
        raise TfuseError("fusion.cost=activations needs calibration data")
    return collect_statistics(
        models, reference, graph, plan, calibration(), model_inputs, settings, total=batches
    )
