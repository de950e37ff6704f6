"""Compute the transport maps of one parent against the reference, rule by rule."""
from __future__ import annotations

from typing import Collection, MutableMapping, Protocol, Sequence

import torch

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State
from tfuse.fusion.cost import COSTS, CostInputs, CostSettings, normalize
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.residual import RESIDUALS
from tfuse.fusion.rules import CombineRule, GroupedHeadRule, HeadRule, OTRule, Plan, Rule
from tfuse.fusion.statistics import PairStats
from tfuse.fusion.transport import SolverSettings, grouped_head_aware, head_aware, procrustes, solve

ALIGNABLE = ("stream", "heads", "mlp")  # fusion.align: the kinds of space OT aligns; the others keep the identity


class MapSettings(CostSettings, SolverSettings, Protocol):
    """The knobs the maps read (with those of the costs and solvers); ``OTSettings`` satisfies it."""

    cost: str
    normalize_cost: str
    signs: bool
    maps: str
    align: Collection[str]


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
    norm gains folded first: ``fold.py``), and so are the value dimensions of matched heads. The
    spaces of a kind outside ``fusion.align`` (``ALIGNABLE``) keep the identity (an ablation: which
    maps help). ``rules`` (default: the plan's) are solved into ``maps``, which holds the maps
    solved before them."""
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

    ablated = set(settings.align) != set(ALIGNABLE)  # the default aligns every kind: no rule is classified
    for rule in plan.rules if rules is None else rules:
        if ablated and not isinstance(rule, CombineRule) and _kind(rule, graph, plan) not in settings.align:
            maps.update(_identities(rule, cost))
        elif isinstance(rule, OTRule) and settings.maps == "orthogonal" and rule.name == graph.stream:
            maps[rule.name] = procrustes(stats[rule.name].cross, graph.rotations == "centred", rule.name)
        elif isinstance(rule, OTRule):
            matrix, sign = signed_cost(rule)
            coupling = solve(matrix, settings, rule.name)
            maps[rule.name] = coupling if sign is None else coupling * sign
        elif isinstance(rule, GroupedHeadRule):
            cost_v, sign_v = signed_cost(rule.v)
            found = grouped_head_aware(cost(rule.q), cost(rule.k), cost_v, sign_v, rule.heads, rule.kv_heads,
                                       rule.rope, settings, rule.q.name, cross(rule.v), rule.rotary)
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


def _kind(rule: Rule, graph: FlowGraph, plan: Plan) -> str:
    """``stream`` (a stream point or a branch written onto it), ``heads`` (attention's spaces) or
    ``mlp`` (the rest)."""
    if isinstance(rule, (HeadRule, GroupedHeadRule)):
        return "heads"
    resolved = lambda spaces: {plan.where[s][0] for s in spaces if s in plan.where}  # noqa: E731
    if rule.name in resolved(s for att in graph.attention for s in (att.q, att.k, att.v, att.o) if s):
        return "heads"
    if graph.is_stream(rule.name) or rule.name in resolved(r.branch for r in graph.residuals):
        return "stream"
    return "mlp"


def _identities(rule: Rule, cost) -> dict[str, torch.Tensor]:
    """The identity maps of a rule left unaligned (nothing solved), each the size of its space."""
    if isinstance(rule, GroupedHeadRule):
        shapes = {r.name: cost(r).shape for r in (rule.q, rule.k, rule.v)}
        if rule.o is not None:  # every query head reads its group's values
            shapes[rule.o] = tuple(n * rule.heads // rule.kv_heads for n in shapes[rule.v.name])
    elif isinstance(rule, HeadRule):
        shapes = {r.name: cost(r).shape for r in (rule.qk, rule.v)}
    else:
        shapes = {rule.name: cost(rule).shape}
    for space, (n, m) in shapes.items():
        if n != m:
            raise TfuseError(f"fusion.align leaves space '{space}' unaligned, but its widths differ ({n} vs {m}); "
                             "align it (add its kind to fusion.align) or fuse parents of equal widths")
    return {space: torch.eye(n, dtype=torch.float64) / n for space, (n, _) in shapes.items()}
