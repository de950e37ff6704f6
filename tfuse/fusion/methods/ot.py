"""OT fusion (the paper's method): every parent aligned to the anchor by transport maps, space by
space in forward order, from activation or weight costs; then averaged (and repaired)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Collection, Iterable, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.apply import align, average
from tfuse.fusion.cache import StatisticsCache
from tfuse.fusion.compact import CompactMaps, sign_flips
from tfuse.fusion.cost import COSTS, METRICS, NORMALIZERS
from tfuse.fusion.engine import FusionOutcome, check_parents, parameters, repair_fused, timed, with_state
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.maps import ALIGNABLE, compute_maps
from tfuse.fusion.methods import METHODS, Method
from tfuse.fusion.learned import LearnSettings, Objective, refine
from tfuse.fusion.partial import (
    KINDS, Units, Widths, group_costs, head_counts, head_units, kv_groups, mlp_spaces, widen, widths,
)
from tfuse.fusion.plan import check_probes, make_plan
from tfuse.fusion.qk import QK_MODES
from tfuse.fusion.residual import RESIDUALS
from tfuse.fusion.rules import Plan
from tfuse.fusion.settings import FusionSettings
from tfuse.fusion.statistics import Statistics, collect_statistics
from tfuse.fusion.transport import SOLVERS

MAPS = ("permutation", "orthogonal")  # fusion.maps: what moves the stream (orthogonal: a rotation, gains folded)

Batch = dict[str, torch.Tensor]


@dataclass
class OTSettings(LearnSettings, FusionSettings):
    """OT fusion's knobs (``configs/fusion/ot.yaml``); defaults are the paper's released ones."""

    CHOICES: ClassVar[dict[str, Collection[str]]] = {
        **FusionSettings.CHOICES, "cost": COSTS, "solver": SOLVERS, "metric": METRICS,
        "normalize_cost": NORMALIZERS, "residual": RESIDUALS, "qk": QK_MODES, "maps": MAPS,
    }

    cost: str = "activations"
    solver: str = "sinkhorn"
    reg: float | None = None  # None: the cost's default (0.08 activations, 0.06 weights)
    metric: str = "euclidean"
    normalize_cost: str = "max"
    center: bool = False
    standardize: bool = False
    unit_norm: bool = False
    residual: str = "mean"
    qk: str = "separate"
    signs: bool = False  # signed maps where the graph allows flips (RMSNorm streams, SwiGLU up/down, values)
    maps: str = "permutation"  # orthogonal: the stream rotated (Procrustes), the parents' norm gains folded first
    align: Sequence[str] = ALIGNABLE  # the kinds of space aligned (stream, heads, mlp); the rest keep the identity
    width: float = 1.0  # partial fusion: fusion.widen's units this many times the anchor's (1: merged; N: all kept)
    widen: Sequence[str] = ("mlp",)  # what fusion.width keeps apart: mlp, heads (whole key/value groups)
    iterations: int = 1
    sinkhorn_iters: int = 2000
    sinkhorn_tol: float = 1e-2  # largest relative marginal error accepted from Sinkhorn

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reg is None:
            self.reg = COSTS[self.cost].default_reg
        if self.solver == "sinkhorn" and not self.reg > 0:
            raise TfuseError(f"fusion.reg={self.reg} must be positive for fusion.solver=sinkhorn")
        if self.iterations < 1:
            raise TfuseError(f"fusion.iterations={self.iterations} must be at least 1")
        if self.maps == "orthogonal" and (self.residual != "global" or not COSTS[self.cost].needs_statistics or self.stream):
            raise TfuseError("fusion.maps=orthogonal rotates the whole stream by one map from its activations: it needs "
                             "fusion.residual=global and fusion.cost=activations, without fusion.stream "
                             "(or set fusion.maps=permutation)")
        self.check_learning(self.stream)
        if self.width < 1:
            raise TfuseError(f"fusion.width={self.width} must be at least 1")
        if self.learn_steps and self.iterations != 1:
            raise TfuseError(f"fusion.learn_steps={self.learn_steps} refines the maps into the anchor: it needs "
                             "fusion.iterations=1")
        self.align = (self.align,) if isinstance(self.align, str) else tuple(self.align)
        unknown = [kind for kind in self.align if kind not in ALIGNABLE]
        if unknown:
            raise TfuseError(f"fusion.align={list(self.align)}: {unknown[0]!r} is not a kind of space; choose from "
                             f"{', '.join(ALIGNABLE)}")
        self.widen = (self.widen,) if isinstance(self.widen, str) else tuple(self.widen)
        if not self.widen or any(kind not in KINDS for kind in self.widen):
            raise TfuseError(f"fusion.widen={list(self.widen)}: choose one or more of {', '.join(KINDS)}")
        if "heads" in self.widen and self.width != 1 and self.qk != "head_aware":
            raise TfuseError("fusion.widen=[...heads] keeps whole heads apart, which needs whole-head maps: "
                             "set fusion.qk=head_aware")
        if self.learn_steps and set(self.align) != set(ALIGNABLE):
            raise TfuseError(f"fusion.align={list(self.align)} keeps some spaces unaligned, which fusion.learn_steps "
                             "would align; learn with every space aligned")
        if self.width != 1 and (self.iterations != 1 or self.stream):
            raise TfuseError(f"fusion.width={self.width} keeps units apart after one alignment: it needs "
                             "fusion.iterations=1, without fusion.stream")
        if RESIDUALS[self.residual].needs_magnitudes and not COSTS[self.cost].needs_statistics:
            raise TfuseError(
                f"fusion.residual={self.residual} weighs the stream by activation magnitudes; "
                "use fusion.cost=activations or another residual policy"
            )


@METHODS.register("ot")
class OT(Method):
    label = "OT"
    settings_class = OTSettings
    allows_widths = True

    def fuse(self, models, graph, anchor, calibration, settings):
        widened = None
        if settings.width != 1:
            from tfuse.arch import family_for  # the family builds the wider model; the engine names no layer

            fam = family_for(models[anchor])
            widened = lambda units, heads: (  # noqa: E731
                fam.widened(models[anchor], units) if heads is None else fam.widened(models[anchor], units, heads=heads))
            if "heads" in settings.widen:
                if not getattr(fam, "widens_heads", False):
                    raise TfuseError(f"fusion.widen=[...heads]: {fam.__name__.rsplit('.', 1)[-1]} derives each head's "
                                     "width from the stream's (hidden_size / heads), so more heads would need a wider "
                                     "stream; widen the MLPs only (fusion.widen=[mlp])")
                groups = widths(settings.width, kv_groups(graph), len(models))[1]
                widened(None, head_counts(graph, groups))  # an impossible head count ends the run before the statistics
        return ot_fuse(models, graph, settings, anchor, calibration.batches, calibration.model_inputs,
                       calibration.total, calibration.repair, calibration.cache, calibration.competence, widened,
                       calibration.objective)


def ot_fuse(
    models: Sequence[nn.Module],
    graph: FlowGraph,
    settings: OTSettings,
    anchor: int,
    calibration: Callable[[], Iterable[Batch]] | None,
    model_inputs: Callable[[Batch], Batch],
    batches: int | None = None,
    repair_calibration: Callable[[], Iterable[Batch]] | None = None,
    cache: StatisticsCache | None = None,
    competence: Callable | None = None,
    widened: Callable[[int | None, tuple[int, int] | None], nn.Module] | None = None,
    objective: Objective | None = None,
) -> FusionOutcome:
    """Fuse ``models`` into the anchor's architecture (with ``fusion.width``, the anchor's with
    wider MLPs and heads: ``widened(units, (heads, kv_heads))``, ``partial.py``). With
    ``fusion.learn_steps``, the maps are then refined on ``objective`` (``learned.py``).

    Iteration 1 aligns every other parent to the anchor; each further iteration re-aligns every
    parent (anchor included) to the current fused model, an OT barycentre. ``fusion.repair`` then
    refits the result toward the aligned parents on ``repair_calibration`` (default: ``calibration``).
    With ``cache`` (and ``fusion.cache``), statistics computed before for the same key are reused.
    """
    check_parents(models, graph, anchor)
    if settings.width != 1:
        widths(settings.width, 1, len(models))  # an impossible width ends the run before the statistics
    weights = settings.weights(len(models))
    plan = make_plan(graph, settings)
    if COSTS[settings.cost].needs_statistics:
        check_probes(plan, graph)
    timings = {"statistics": 0.0, "transport": 0.0, "align": 0.0}
    reference = models[anchor]
    movers = [i for i in range(len(models)) if i != anchor]
    maps: list[dict[str, torch.Tensor]] = []
    sources: list[str] = []
    for _ in range(settings.iterations):
        ref_state = parameters(reference, graph)
        with timed(timings, "statistics", reference):
            stats, source = _statistics(
                [models[i] for i in movers], reference, graph, plan, calibration, model_inputs, settings, batches, cache
            )
        sources.append(source)
        aligned = {anchor: ref_state} if reference is models[anchor] else {}
        maps = [{} for _ in models]
        for k, i in enumerate(movers):
            state = parameters(models[i], graph)
            with timed(timings, "transport", reference):
                maps[i] = compute_maps(
                    plan, graph, settings,
                    stats.pairs[k] if stats else None, stats.magnitude[k] if stats else None, state, ref_state,
                    maps=CompactMaps(),  # hard maps as indices and signs, soft ones in float32
                )
            with timed(timings, "align", reference):
                aligned[i] = align(state, graph, plan, maps[i].raw)
        fused = average([aligned[i] for i in range(len(models))], weights)
        reference = with_state(models[anchor], fused, graph)
        movers = list(range(len(models)))
    info: dict = {"statistics": sources}
    if settings.learn_steps:
        reference = refine(models, graph, plan, settings, anchor, maps, weights, objective, info, timings,
                           settings.maps == "orthogonal")
    if settings.signs and plan.signed:
        info["sign_flips"] = [sign_flips(m, plan.signed) for i, m in enumerate(maps) if i != anchor or settings.iterations > 1]
    own = settings.iterations == 1  # the anchor, never moved, is its own aligned self: no copy of it
    del aligned  # rebuilt from the maps when asked for: the outcome keeps no aligned copies
    targets = lambda: [  # noqa: E731
        models[i] if own and i == anchor
        else with_state(models[anchor], align(parameters(models[i], graph), graph, plan, maps[i].raw), graph)
        for i in range(len(models))]
    if settings.width != 1:
        reference, targets = _partial(models, graph, plan, settings, stats, anchor, maps, weights, widened, info)
    fits = repair_fused(reference, targets, weights, graph, settings, repair_calibration or calibration, model_inputs,
                        timings, info, cache, competence)
    return FusionOutcome(reference, maps, timings, fits, info, targets)


def _partial(models, graph, plan, settings, stats, anchor, maps, weights, widened, info):
    """``fusion.width``: the fused model with wider MLPs (and heads: ``fusion.widen``,
    ``partial.py``), and its repair targets, the aligned parents widened alike (function kept)."""
    if widened is None:
        raise TfuseError("fusion.width: no way to build the wider model was given")
    movers = [i for i in range(len(models)) if i != anchor]
    pairs = {i: stats.pairs[k] for k, i in enumerate(movers)} if stats else None
    states = [parameters(m, graph) for m in models]
    cost = lambda space: group_costs(space, settings, pairs, states, anchor, graph, plan, maps)  # noqa: E731
    kinds = {}
    if "mlp" in settings.widen:
        kinds["mlp"] = [Units({s: 1}, cost(s)) for s in mlp_spaces(graph, plan)]
        if not kinds["mlp"]:
            raise TfuseError("fusion.width: the flow graph has no MLP units to keep apart; drop mlp from fusion.widen")
    if "heads" in settings.widen:
        kinds["heads"] = head_units(graph, plan, states[anchor], cost)

    def wide() -> tuple[list, dict[str, Widths]]:
        aligned = [states[i] if i == anchor else align(states[i], graph, plan, maps[i].raw) for i in range(len(models))]
        return widen(aligned, graph, plan, kinds, settings.width)

    parents, shapes = wide()
    heads = head_counts(graph, shapes["heads"].width) if "heads" in shapes else None
    template = widened(shapes["mlp"].width if "mlp" in shapes else None, heads)
    fused = with_state(template, average(parents, weights), graph)
    del parents
    info["width"] = {"factor": settings.width, **{kind: vars(shape) for kind, shape in shapes.items()},
                     "parameters": sum(p.numel() for p in fused.parameters())}
    return fused, lambda: [with_state(template, s, graph) for s in wide()[0]]


def _statistics(
    models: list[nn.Module],
    reference: nn.Module,
    graph: FlowGraph,
    plan: Plan,
    calibration: Callable[[], Iterable[Batch]] | None,
    model_inputs: Callable[[Batch], Batch],
    settings: OTSettings,
    batches: int | None,
    cache: StatisticsCache | None,
) -> tuple[Statistics | None, str]:
    """The statistics and where they came from: ``none`` (a cost without), ``computed``, ``cached``."""
    if not COSTS[settings.cost].needs_statistics:
        return None, "none"
    if calibration is None:
        raise TfuseError(f"fusion.cost={settings.cost} needs calibration data")
    compute = lambda: collect_statistics(  # noqa: E731
        models, reference, graph, plan, calibration(), model_inputs, settings, total=batches
    )
    if cache is None or not settings.cache:
        return compute(), "computed"
    stats, hit = cache.get(cache.key(models, reference, graph, plan, settings), reference, compute)
    return stats, "cached" if hit else "computed"
