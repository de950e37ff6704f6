"""Weight matching (git re-basin, Ainsworth et al. 2023): the data-free permutation baseline.

Each parent is permuted into the anchor's basis under the exact symmetries of a transformer
(one permutation for the whole residual stream; heads permuted as wholes, Q and K sharing the
permutation inside a head): coordinate descent over the flow graph's spaces, each step the linear
assignment that maximises ``sum <W_anchor, P W_parent>`` over every weight that reads or writes
that space, the others held at their current permutation, until a sweep changes none. Then the
parents are averaged (and repaired); with ``fusion.learn_steps``, the permutations are first
refined on the interpolated model's loss (``learned.py``). Only those two stages read data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State, align, average
from tfuse.fusion.compact import CompactMaps, HardMap
from tfuse.fusion.engine import FusionOutcome, check_parents, parameters, repair_fused, timed, with_state
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.learned import LearnSettings, refine
from tfuse.fusion.methods import METHODS, Method
from tfuse.fusion.methods.ot import OTSettings
from tfuse.fusion.plan import make_plan
from tfuse.fusion.rules import GroupedHeadRule, HeadRule, OTRule, Plan
from tfuse.fusion.settings import FusionSettings
from tfuse.fusion.transport import grouped_head_aware

# The plan of a transformer's exact symmetries: its resolved spaces are what one permutation serves.
SYMMETRIES = OTSettings(solver="emd", cost="weights", residual="global", qk="head_aware")


@dataclass
class WeightMatchingSettings(LearnSettings, FusionSettings):
    """``configs/fusion/weight_matching.yaml``."""

    max_sweeps: int = 100  # coordinate-descent sweeps over every space at most

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_learning(self.stream)
        if self.max_sweeps < 1:
            raise TfuseError(f"fusion.max_sweeps={self.max_sweeps} must be at least 1")


@METHODS.register("weight_matching")
class WeightMatching(Method):
    label = "WM"
    settings_class = WeightMatchingSettings

    def fuse(self, models, graph, anchor, calibration, settings):
        check_parents(models, graph, anchor)
        plan = make_plan(graph, SYMMETRIES)
        reference = parameters(models[anchor], graph)
        timings: dict[str, float] = {}
        with timed(timings, "match", models[anchor]):
            maps: list[CompactMaps] = [CompactMaps() for _ in models]
            aligned: dict[int, State] = {anchor: reference}
            sweeps = []
            for i in (i for i in range(len(models)) if i != anchor):
                state = parameters(models[i], graph)
                perms, used = match_weights(state, reference, graph, plan, settings.max_sweeps, settings.seed)
                for name, perm in perms.items():
                    maps[i].raw[name] = HardMap(perm.cpu(), None)  # as OT keeps its hard maps
                if not settings.learn_steps:
                    aligned[i] = align(state, graph, plan, maps[i].raw)
                sweeps.append(used)
        weights = settings.weights(len(models))
        info: dict = {"sweeps": sweeps}
        if settings.learn_steps:
            fused = refine(models, graph, plan, settings, anchor, maps, weights, calibration.objective, info, timings)
        else:
            fused = with_state(models[anchor], average([aligned[i] for i in range(len(models))], weights), graph)
        del aligned  # rebuilt from the maps when asked for: the outcome keeps no aligned copies
        targets = lambda: [  # noqa: E731
            models[i] if i == anchor
            else with_state(models[anchor], align(parameters(models[i], graph), graph, plan, maps[i].raw), graph)
            for i in range(len(models))]
        fits = repair_fused(
            fused, targets, weights, graph, settings, calibration.repair_batches(), calibration.model_inputs, timings,
            info, calibration.cache, calibration.competence,
        )
        return FusionOutcome(fused, maps, timings, fits, info, targets)


def match_weights(
    state: State, reference: State, graph: FlowGraph, plan: Plan, max_sweeps: int, seed: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Permutations (per resolved space: the parent's neuron at each of the reference's
    positions) maximising the weights' agreement; and the sweeps it took."""
    sizes = _sizes(state, reference, graph, plan)
    device = next(iter(state.values())).device  # the permutations index the weights where they are
    perms = {name: torch.arange(n, device=device) for name, n in sizes.items()}
    units = [rule if isinstance(rule, GroupedHeadRule) else (rule.qk.name, rule.v.name, rule.heads)
             if isinstance(rule, HeadRule) else (rule.name,)
             for rule in plan.rules if isinstance(rule, (OTRule, HeadRule, GroupedHeadRule))]
    axes = _axes_of(graph, plan)
    order = np.random.default_rng(seed)
    for sweep in range(1, max_sweeps + 1):
        changed = False
        for index in order.permutation(len(units)):
            unit = units[index]
            if isinstance(unit, GroupedHeadRule):
                new = _grouped_assignment(unit, {
                    rule.name: _similarity(rule.name, state, reference, graph, plan, perms, axes)
                    for rule in (unit.q, unit.k, unit.v)
                })
            elif len(unit) == 3:
                qk, v, heads = unit
                new = dict(zip((qk, v), _head_assignment(
                    _similarity(qk, state, reference, graph, plan, perms, axes),
                    _similarity(v, state, reference, graph, plan, perms, axes), heads)))
            else:
                similarity = _similarity(unit[0], state, reference, graph, plan, perms, axes)
                new = {unit[0]: _assignment(similarity)}
            for name, perm in new.items():
                changed |= not torch.equal(perm, perms[name])
                perms[name] = perm
        if not changed:
            return perms, sweep
    return perms, max_sweeps


def _sizes(state: State, reference: State, graph: FlowGraph, plan: Plan) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, specs in graph.params.items():
        for axis, spec in enumerate(specs):
            if spec is None:
                continue
            resolved = plan.where[spec.space][0]
            if state[name].shape[axis] != reference[name].shape[axis]:
                raise TfuseError(
                    f"fusion.method=weight_matching permutes neurons: '{name}' axis {axis} has "
                    f"{state[name].shape[axis]} vs {reference[name].shape[axis]}; use fusion.method=ot for different widths"
                )
            sizes[resolved] = state[name].shape[axis]
    return sizes


def _axes_of(graph: FlowGraph, plan: Plan) -> dict[str, list[tuple[str, int]]]:
    """Per resolved space: every (parameter, axis) that reads or writes it."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name, specs in graph.params.items():
        for axis, spec in enumerate(specs):
            if spec is not None:
                out.setdefault(plan.where[spec.space][0], []).append((name, axis))
    return out


def _similarity(space, state, reference, graph, plan, perms, axes) -> torch.Tensor:
    """``S[i, j]``: agreement of the parent's neuron i with the reference's neuron j over every
    weight touching ``space``, the weights' other axes permuted as they stand."""
    total = None
    for name, axis in axes[space]:
        w = state[name]
        for other, spec in enumerate(graph.params[name]):
            if spec is not None and other != axis:
                w = w.index_select(other, perms[plan.where[spec.space][0]])
        a = w.movedim(axis, 0).reshape(w.shape[axis], -1).double()
        b = reference[name].movedim(axis, 0).reshape(w.shape[axis], -1).double()
        product = a @ b.T
        total = product if total is None else total + product
    return total


def _assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The linear assignment (scipy, on the CPU) as a permutation on ``similarity``'s device."""
    rows, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return perm.to(similarity.device)


def _head_assignment(qk: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads matched as wholes by the best inner assignments' total (Q/K and V together), then
    the dimensions inside each matched pair of heads. Solved on the CPU, where scipy runs the
    heads^2 small assignments; the permutations are returned on the similarities' device."""
    device = qk.device
    qk, v = qk.cpu(), v.cpu()
    d = qk.shape[0] // heads
    inner: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    value = np.zeros((heads, heads))
    for h in range(heads):  # the parent's head
        for g in range(heads):  # the reference's
            blocks = [s[h * d:(h + 1) * d, g * d:(g + 1) * d] for s in (qk, v)]
            perms = [_assignment(block) for block in blocks]
            inner[h, g] = (perms[0], perms[1])
            value[h, g] = sum(float(block[p, torch.arange(d)].sum()) for block, p in zip(blocks, perms))
    rows, cols = linear_sum_assignment(value, maximize=True)
    full_qk, full_v = torch.empty(heads * d, dtype=torch.long), torch.empty(heads * d, dtype=torch.long)
    for h, g in zip(rows.tolist(), cols.tolist()):
        p_qk, p_v = inner[h, g]
        full_qk[g * d:(g + 1) * d] = h * d + p_qk
        full_v[g * d:(g + 1) * d] = h * d + p_v
    return full_qk.to(device), full_v.to(device)


def _grouped_assignment(rule: GroupedHeadRule, similarity: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Grouped heads (GQA, RoPE) matched as OT's grouped head rule matches them, on the costs
    ``max S - S`` with exact OT (whose couplings are permutations here)."""
    cost = {name: s.max() - s for name, s in similarity.items()}
    maps = grouped_head_aware(cost[rule.q.name], cost[rule.k.name], cost[rule.v.name], None, rule.heads,
                              rule.kv_heads, rule.rope, SYMMETRIES, rule.q.name, rotary=rule.rotary)
    names = (rule.q.name, rule.k.name, rule.v.name, rule.o)
    return {name: t.argmax(0) for name, t in zip(names, maps) if name is not None}
