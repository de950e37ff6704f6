"""Compute the transport maps of one parent against the reference, rule by rule."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tfuse.fusion.apply import State
from tfuse.fusion.cost import COSTS, CostInputs, normalize
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.plan import HeadRule, OTRule, Plan
from tfuse.fusion.residual import RESIDUALS
from tfuse.fusion.statistics import PairStats
from tfuse.fusion.transport import head_aware, solve

if TYPE_CHECKING:
    from tfuse.fusion.methods.ot import OTSettings


def compute_maps(
    plan: Plan,
    graph: FlowGraph,
    settings: "OTSettings",
    stats: dict[str, PairStats] | None,
    magnitude: dict[str, torch.Tensor] | None,
    state: State,
    reference: State,
) -> dict[str, torch.Tensor]:
    """Every resolved space's map (n_parent x n_reference), in forward order."""
    maps: dict[str, torch.Tensor] = {}
    kind = COSTS[settings.cost]
    inputs = CostInputs(settings, stats, state, reference, graph, plan, maps)

    def cost(rule: OTRule) -> torch.Tensor:
        return normalize(kind.matrix(rule.name, inputs), settings.normalize_cost, rule.name)

    for rule in plan.rules:
        if isinstance(rule, OTRule):
            maps[rule.name] = solve(cost(rule), settings, rule.name)
        elif isinstance(rule, HeadRule):
            maps[rule.qk.name], maps[rule.v.name] = head_aware(
                cost(rule.qk), cost(rule.v), rule.heads, settings, rule.qk.name
            )
        else:
            maps[rule.name] = RESIDUALS[rule.policy].combine(rule, maps[rule.skip], maps[rule.branch], magnitude)
    return maps
