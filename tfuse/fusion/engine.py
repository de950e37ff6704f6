"""What every fusion method shares: a model's (virtual) parameters, the checks that a flow graph
describes the parents, a model rebuilt from fused parameters, and the repair after averaging.

It reads the architecture only through its ``FlowGraph``; it never names a layer. The methods
themselves live in ``fusion/methods/``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.repair import LayerFit, repair
from tfuse.fusion.settings import FusionSettings

if TYPE_CHECKING:
    from tfuse.fusion.cache import StatisticsCache

Batch = dict[str, torch.Tensor]


@dataclass
class FusionOutcome:
    model: nn.Module
    maps: list[Mapping[str, torch.Tensor]]  # per parent, against the final reference (CompactMaps: dense on read)
    timings: dict[str, float] = field(default_factory=dict)
    repair: list[LayerFit] = field(default_factory=list)  # each refit layer's error before / after
    info: dict = field(default_factory=dict)  # what the method reports of itself (results.json ``methods``)
    aligned: Callable[[], list[nn.Module]] | None = None  # the parents moved into the fused model's basis, built on call


def parameters(model: nn.Module, graph: FlowGraph | None = None) -> State:
    """The model's parameters; with ``graph``, its virtual ones (fused parameters split)."""
    state = {name: p.detach() for name, p in model.named_parameters()}
    return graph.to_virtual(state) if graph is not None else state


@contextmanager
def timed(timings: dict[str, float], name: str, model: nn.Module) -> Iterator[None]:
    """Add the block's seconds to ``timings[name]``, read once ``model``'s device has run the work
    queued on it: CUDA runs asynchronously, and a stage's seconds would otherwise count in the next."""

    def now() -> float:
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    start = now()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + now() - start


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


def repair_fused(
    fused: nn.Module,
    targets: Callable[[], Sequence[nn.Module]],
    weights: Sequence[float],
    graph: FlowGraph,
    settings: FusionSettings,
    calibration: Callable[[], Iterable[Batch]] | None,
    model_inputs: Callable[[Batch], Batch],
    timings: dict[str, float],
    info: dict,
    cache: "StatisticsCache | None" = None,
    competence: Callable | None = None,
) -> list[LayerFit]:
    """``fusion.repair`` of a fused model toward ``targets()`` (the aligned parents, built only
    when there is a repair), its seconds in ``timings["repair"]``; with ``cache`` and
    ``fusion.cache_targets``, the targets come from an identical earlier repair when there was
    one (``info["repair_targets"]``: cached or computed)."""
    if settings.repair == "none":
        return []
    if calibration is None:
        raise TfuseError(f"fusion.repair={settings.repair} needs calibration data")
    with timed(timings, "repair", fused):
        models = targets()
        kept = cache is not None and settings.cache and settings.cache_targets
        with cache.repair_targets(cache.targets_key(models, weights, settings)) if kept else nullcontext() as store:
            fits = repair(fused, models, weights, graph, settings, calibration(), model_inputs, store, competence)
    info["repair_targets"] = store.source if store is not None else "computed"
    return fits


def check_parents(models: Sequence[nn.Module], graph: FlowGraph, anchor: int) -> None:
    """At least two parents, each described by ``graph``, differing from the anchor in hidden widths only."""
    if len(models) < 2:
        raise TfuseError("fusion needs at least two parents")
    for i, m in enumerate(models):
        check_graph(m, graph, f"parent {i}")
    check_fixed_axes(models, graph, anchor)


def check_fixed_axes(models: Sequence[nn.Module], graph: FlowGraph, anchor: int) -> None:
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
