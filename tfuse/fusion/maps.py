"""Compute the transport maps of one parent against the reference, rule by rule."""
from __future__ import annotations

import torch

from tfuse.fusion.apply import State, writer_rows
from tfuse.fusion.cost import activation_cost, normalize, weight_cost
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.plan import CombineRule, HeadRule, OTRule, Plan
from tfuse.fusion.settings import FusionSettings
from tfuse.fusion.statistics import PairStats
from tfuse.fusion.transport import head_aware, solve
from tfuse.errors import TfuseError


def compute_maps(
    plan: Plan,
    graph: FlowGraph,
    settings: FusionSettings,
    stats: dict[str, PairStats] | None,
    magnitude: dict[str, torch.Tensor] | None,
    state: State,
    reference: State,
) -> dict[str, torch.Tensor]:
    """Every resolved space's map (n_parent x n_reference), in forward order."""
    maps: dict[str, torch.Tensor] = {}

    def cost(rule: OTRule) -> torch.Tensor:
        if settings.cost == "activations":
            raw = activation_cost(stats[rule.name], settings)
        else:
            rows_a = writer_rows(state, graph, plan, maps, rule.name)
            rows_b = writer_rows(reference, graph, plan, maps, rule.name, aligned=False)
            if rows_a is None:
                raise TfuseError(
                    f"fusion.cost=weights: no weight writes layer '{rule.name}' from already aligned "
                    "inputs; use fusion.cost=activations for this architecture"
                )
            raw = weight_cost(rows_a, rows_b, settings)
        return normalize(raw, settings.normalize_cost, rule.name)

    for rule in plan.rules:
        if isinstance(rule, OTRule):
            maps[rule.name] = solve(cost(rule), settings, rule.name)
        elif isinstance(rule, HeadRule):
            maps[rule.qk.name], maps[rule.v.name] = head_aware(
                cost(rule.qk), cost(rule.v), rule.heads, settings, rule.qk.name
            )
        else:
            maps[rule.name] = combine(rule, maps[rule.skip], maps[rule.branch], magnitude)
    return maps


def combine(
    rule: CombineRule, skip: torch.Tensor, branch: torch.Tensor, magnitude: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    """The stream's map after ``skip + branch`` under the residual policy."""
    if rule.policy == "no_resid":
        return branch
    if rule.policy == "only_resid":
        return skip
    if rule.policy == "mean":
        return 0.5 * (skip + branch)
    w_skip, w_branch = magnitude[rule.skip_probe].double(), magnitude[rule.branch_probe].double()
    if rule.policy == "weighted_scalar":
        w_skip, w_branch = w_skip.mean(), w_branch.mean()
    else:  # weighted_matrix: per neuron of the parent (rows keep their mass)
        w_skip, w_branch = w_skip[:, None], w_branch[:, None]
    total = (w_skip + w_branch).clamp_min(1e-30)
    return (w_skip * skip + w_branch * branch) / total
