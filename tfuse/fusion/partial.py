"""Partial fusion (``fusion.width``): the MLPs' best-matched units merged, the rest of every
parent's kept alongside, for a fused model between one parent's size (width 1) and all the
parents' units (width N).

After alignment, unit ``j`` of every aligned parent is matched to the anchor's unit ``j``. Each
such group is ranked by its transport cost (the parents' costs to the anchor under their maps);
the ``k`` cheapest groups are merged (averaged, as in plain fusion) and every other group keeps
one unit per parent, so an MLP of ``n`` units becomes ``k + N (n - k)`` wide. Each aligned parent
is widened without changing its function: a unit another parent owns gets that parent's input
weights and no output weight, so the plain weighted average of the widened parents keeps each
owned unit's input weights whole and scales its output by the owner's alpha. At width N no
unit is merged and every MLP is the weighted sum of the parents' (aligned) MLPs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State
from tfuse.fusion.cost import COSTS, CostInputs, normalize
from tfuse.fusion.graph import FlowGraph, In, Out
from tfuse.fusion.rules import OTRule, Plan


@dataclass(frozen=True)
class Widths:
    """The MLP spaces widened, their units, the groups merged, and the new width."""

    spaces: tuple[str, ...]
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


def widths(factor: float, units: int, parents: int) -> tuple[int, int]:
    """(merged groups, new width) for ``fusion.width=factor``: ``k + N (n - k)`` closest to
    ``factor x n``."""
    if not 1 <= factor <= parents:
        raise TfuseError(f"fusion.width={factor} must lie between 1 (one parent's widths) and {parents} (every unit "
                         "of every parent kept)")
    merged = units if parents == 1 else round((parents * units - factor * units) / (parents - 1))
    return merged, merged + parents * (units - merged)


def widen(aligned: Sequence[State], graph: FlowGraph, plan: Plan, costs: dict[str, torch.Tensor], factor: float
          ) -> tuple[list[State], Widths]:
    """Every aligned parent widened in the MLP spaces of ``costs``, function kept."""
    n_parents = len(aligned)
    sizes = {len(c) for c in costs.values()}
    if len(sizes) != 1:
        raise TfuseError("fusion.width needs every MLP of one width (a model config has one)")
    units = sizes.pop()
    merged, width = widths(factor, units, n_parents)
    order = {space: torch.argsort(c, stable=True) for space, c in costs.items()}
    keep = {space: (o[:merged].sort().values, o[merged:].sort().values) for space, o in order.items()}
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
    return out, Widths(tuple(costs), units, merged, width)
