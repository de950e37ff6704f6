"""Partial fusion (``fusion.width``, ``fusion.widen``): the best-matched MLP units (and, with
``heads``, attention heads) merged, the rest of every parent's kept alongside, for a fused model
between one parent's size (width 1) and all the parents' units (width N).

After alignment, unit ``j`` of every aligned parent is matched to the anchor's unit ``j``; a unit
is an MLP neuron, or a key/value group of heads (a head without grouped-query attention) with
all its query, key, value and output dimensions. Each such group is ranked by its transport cost
(the parents' costs to the anchor under their maps; a head's is its value dimensions'); the
``k`` cheapest groups are merged (averaged, as in plain fusion) and every other group keeps one
unit per parent, so ``n`` units become ``k + N (n - k)``. Each aligned parent is widened without
changing its function: a unit another parent owns gets that parent's input weights (a head: its
query, key and value projections) and no output weight, so the plain weighted average of the
widened parents keeps each owned unit's input weights whole and scales its output by the owner's
alpha. At width N no unit is merged: every MLP and widened attention block is the weighted sum of
the parents' (aligned) ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State
from tfuse.fusion.cost import COSTS, CostInputs, normalize
from tfuse.fusion.graph import FlowGraph, In, Out
from tfuse.fusion.rules import GroupedHeadRule, HeadRule, OTRule, Plan

KINDS = ("mlp", "heads")  # fusion.widen: what partial fusion keeps apart


@dataclass(frozen=True)
class Units:
    """Units widened together: per resolved space, the dimensions one unit spans, and each anchor
    unit's cost."""

    spans: dict[str, int]
    cost: torch.Tensor


@dataclass(frozen=True)
class Widths:
    """One kind's units per block before widening, the groups merged, and the units after."""

    units: int
    merged: int
    width: int


def mlp_spaces(graph: FlowGraph, plan: Plan) -> list[str]:
    """The resolved spaces of the MLPs' hidden units: outside attention, read by a layer that
    writes a residual branch (a pooler or a classifier's hidden layer is not widened)."""
    attention = {s for att in graph.attention for s in (att.q, att.k, att.v, att.o) if s}
    branches = {r.branch for r in graph.residuals}
    hidden = {ax.space for axes in graph.params.values() if any(isinstance(b, Out) and b.space in branches for b in axes)
              for ax in axes if isinstance(ax, In) and ax.space not in attention}
    resolved = {plan.where[s][0] for s in hidden if s in plan.where}
    return [r.name for r in plan.rules if isinstance(r, OTRule) and r.name in resolved]


def group_costs(space: str, settings, stats, states: Sequence[State], anchor: int, graph: FlowGraph, plan: Plan,
                maps: Sequence) -> torch.Tensor:
    """Per anchor unit of ``space``: the summed normalised cost of the units mapped onto it."""
    total = None
    for i, state in enumerate(states):
        if i == anchor:
            continue
        inputs = CostInputs(settings, stats[i] if stats else None, state, states[anchor], graph, plan, maps[i])
        cost = normalize(COSTS[settings.cost].matrix(space, inputs), settings.normalize_cost, space).double()
        t = maps[i][space].abs()
        part = (t * cost).sum(0) * t.shape[1]  # the expected cost of each anchor unit under the map
        total = part if total is None else total + part
    return total


def kv_groups(graph: FlowGraph) -> int:
    """Key/value groups per attention block (heads without grouped-query attention)."""
    if not graph.attention:
        raise TfuseError("fusion.widen=[...heads]: the flow graph has no attention heads to keep apart")
    att = graph.attention[0]
    return att.kv_heads or att.heads


def head_counts(graph: FlowGraph, groups: int) -> tuple[int, int]:
    """(query heads, key/value heads) of ``groups`` key/value groups of the graph's attention."""
    return groups * (graph.attention[0].heads // kv_groups(graph)), groups


def head_units(graph: FlowGraph, plan: Plan, state: State, cost) -> list[Units]:
    """Per attention block under whole-head maps (``fusion.qk=head_aware``): its key/value groups
    as units over every resolved space of the block, each costed by its value dimensions'
    ``cost(space)``."""
    kv_groups(graph)  # a graph without attention is one line
    out = []
    for rule in plan.rules:
        if isinstance(rule, GroupedHeadRule):
            groups, spaces = rule.kv_heads, [rule.q.name, rule.k.name, rule.v.name, rule.o]
        elif isinstance(rule, HeadRule):
            groups, spaces = rule.heads, [rule.qk.name, rule.v.name]
        else:
            continue
        sizes = {space: _width(graph, plan, state, space) for space in spaces if space is not None}
        value = cost(rule.v.name)
        out.append(Units({space: n // groups for space, n in sizes.items()}, value.view(groups, -1).sum(1)))
    return out


def _width(graph: FlowGraph, plan: Plan, state: State, resolved: str) -> int:
    """The dimensions of a resolved space, read from a parameter axis of ``state`` that carries it."""
    for name, axes in graph.params.items():
        for axis, spec in enumerate(axes):
            if spec is not None and plan.where[spec.space][0] == resolved:
                return state[name].shape[axis]
    raise TfuseError(f"space '{resolved}': no parameter gives its width")


def _dims(units: torch.Tensor, span: int) -> torch.Tensor:
    """The dimensions of ``units`` that span ``span`` consecutive dimensions each."""
    return (units[:, None] * span + torch.arange(span)).flatten()


def widths(factor: float, units: int, parents: int) -> tuple[int, int]:
    """(merged groups, new width) for ``fusion.width=factor``: ``k + N (n - k)`` closest to
    ``factor x n``."""
    if not 1 <= factor <= parents:
        raise TfuseError(f"fusion.width={factor} must lie between 1 (one parent's widths) and {parents} (every unit "
                         "of every parent kept)")
    merged = units if parents == 1 else round((parents * units - factor * units) / (parents - 1))
    return merged, merged + parents * (units - merged)


def widen(aligned: Sequence[State], graph: FlowGraph, plan: Plan, kinds: dict[str, list[Units]], factor: float
          ) -> tuple[list[State], dict[str, Widths]]:
    """Every aligned parent widened in the units of ``kinds`` (``mlp``, ``heads``), function kept."""
    n_parents = len(aligned)
    keep: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shapes = {}
    for kind, sets in kinds.items():
        sizes = {len(u.cost) for u in sets}
        if len(sizes) != 1:
            raise TfuseError(f"fusion.widen={kind} needs every block of one width (a model config has one)")
        units = sizes.pop()
        merged, width = widths(factor, units, n_parents)
        shapes[kind] = Widths(units, merged, width)
        for u in sets:
            order = torch.argsort(u.cost, stable=True)
            both, alone = order[:merged].sort().values, order[merged:].sort().values
            for space, span in u.spans.items():
                keep[space] = (_dims(both, span), _dims(alone, span))
    out = []
    for p, state in enumerate(aligned):
        wide = dict(state)
        for name, axes in graph.params.items():
            for axis, spec in enumerate(axes):
                space = None if spec is None else plan.where[spec.space][0]
                if space not in keep:
                    continue
                both, alone = keep[space]
                own = lambda q: aligned[q][name].index_select(axis, alone.to(state[name].device))  # noqa: E731
                pieces = [wide[name].index_select(axis, both.to(state[name].device))]
                for q in range(n_parents):  # the units each parent keeps alone: only its own write out
                    piece = own(q)
                    pieces.append(piece if not isinstance(spec, In) or q == p else torch.zeros_like(piece))
                wide[name] = torch.cat(pieces, dim=axis)
        out.append(wide)
    return out, shapes
