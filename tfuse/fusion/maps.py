"""Compute the transport maps of one parent against the reference, rule by rule."""
from __future__ import annotations

from typing import MutableMapping, Protocol, Sequence

import torch

from tfuse.fusion.apply import State
from tfuse.fusion.cost import COSTS, CostInputs, CostSettings, normalize
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.residual import RESIDUALS
from tfuse.fusion.rules import GroupedHeadRule, HeadRule, OTRule, Plan, Rule
from tfuse.fusion.statistics import PairStats
from tfuse.fusion.transport import SolverSettings, grouped_head_aware, head_aware, procrustes, solve


class MapSettings(CostSettings, SolverSettings, Protocol):
    """The knobs the maps read (with those of the costs and solvers); ``OTSettings`` satisfies it."""

    cost: str
    normalize_cost: str
    signs: bool
    maps: str


def compute_maps(
    plan: Plan,
    graph: FlowGraph,
    settings: MapSettings,
    stats: dict[str, PairStats] | None,
    magnitude: dict[str, torch.Tensor] | None,
    state: State,
    reference: State,
    rules: Sequence[Rule] | None = None,
    maps: MutableMapping[str, torch.Tensor] | None = None,
) -> MutableMapping[str, torch.Tensor]:
    """Every resolved space's map (n_parent x n_reference), in forward order. With
    ``fusion.signs``, the maps of spaces the graph lets flip sign are signed: matched on the
    magnitude of agreement, each pair carrying the sign it agrees with. With ``fusion.maps=
    orthogonal``, the stream's map is a rotation (Procrustes on its cross-products; the parents'
    norm gains folded first: ``fold.py``), and so are the value dimensions of matched heads. ``rules`` (default: the
    plan's) are solved into ``maps``, which holds the maps solved before them."""
    maps = {} if maps is None else maps
    kind = COSTS[settings.cost]
    inputs = CostInputs(settings, stats, state, reference, graph, plan, maps)

    def cost(rule: OTRule) -> torch.Tensor:
        return normalize(kind.matrix(rule.name, inputs), settings.normalize_cost, rule.name)

    def signed_cost(rule: OTRule) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not (settings.signs and rule.name in plan.signed):
            return cost(rule), None
        raw, sign = kind.matrix(rule.name, inputs, signed=True)
        return normalize(raw, settings.normalize_cost, rule.name), sign

    def cross(rule: OTRule) -> torch.Tensor | None:
        return stats[rule.name].cross if settings.maps == "orthogonal" else None

    for rule in plan.rules if rules is None else rules:
        if isinstance(rule, OTRule) and settings.maps == "orthogonal" and rule.name == graph.stream:
            maps[rule.name] = procrustes(stats[rule.name].cross, graph.rotations == "centred", rule.name)
        elif isinstance(rule, OTRule):
            matrix, sign = signed_cost(rule)
            coupling = solve(matrix, settings, rule.name)
            maps[rule.name] = coupling if sign is None else coupling * sign
        elif isinstance(rule, GroupedHeadRule):
            cost_v, sign_v = signed_cost(rule.v)
            found = grouped_head_aware(cost(rule.q), cost(rule.k), cost_v, sign_v, rule.heads, rule.kv_heads,
                                       rule.rope, settings, rule.q.name, cross(rule.v))
            for name, t in zip((rule.q.name, rule.k.name, rule.v.name, rule.o), found):
                if name is not None:
                    maps[name] = t
        elif isinstance(rule, HeadRule):
            maps[rule.qk.name], maps[rule.v.name] = head_aware(
                cost(rule.qk), cost(rule.v), rule.heads, settings, rule.qk.name, cross(rule.v)
            )
        else:
            maps[rule.name] = RESIDUALS[rule.policy].combine(rule, maps[rule.skip], maps[rule.branch], magnitude)
    return maps
