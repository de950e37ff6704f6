"""Function-preserving transformations of a model, read off its flow graph.

``permuted_copy`` relabels every hidden space at random (the stream with one permutation, heads
as wholes plus dimensions inside them); ``symmetric_copy`` draws from every symmetry the graph
claims (grouped heads, RoPE, sign flips); ``widened_copy`` duplicates neurons and halves what
reads them. Each computes the same function as the original: the test bed of fusion, and the
second parent of the benchmark's scale cases.

The two relabelling copies gather every parameter by index, one at a time, into a copy of the
model: exact in any dtype, and at most one extra model in memory whatever the widths (a dense
map of a 5,632-wide MLP alone is 250 MB). ``widened_copy`` goes through the engine's dense
transport maps, which only small models can afford.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State, align
from tfuse.fusion.engine import parameters, with_state
from tfuse.fusion.graph import FlowGraph, Out
from tfuse.fusion.rules import Plan
from tfuse.fusion.transport import centred_basis

Relabel = tuple[torch.Tensor, torch.Tensor | None]  # neuron j of the copy is the original's index[j], times sign[j]


def space_sizes(graph: FlowGraph, state: State) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, axes in graph.params.items():
        for axis, spec in enumerate(axes):
            if isinstance(spec, Out):
                sizes.setdefault(spec.space, state[name].shape[axis])
    return sizes


def symmetry_groups(graph: FlowGraph) -> list[list[str]]:
    """Spaces that must share one permutation: the whole stream with its branches; Q with K."""
    stream = graph.stream_points() + [r.branch for r in graph.residuals]
    groups = [stream]
    for att in graph.attention:
        groups += [[att.q, att.k], [att.v]]
    grouped = {s for g in groups for s in g}
    groups += [[s] for s in graph.spaces() if s not in grouped]
    return groups


def relabelled(model: nn.Module, graph: FlowGraph, relabel: dict[str, Relabel]) -> nn.Module:
    """A copy of ``model`` whose every space is relabelled: each axis gathers its space's
    ``index`` and takes its ``sign``, except the axes that keep their sign (``magnitude``)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for real, p in twin.named_parameters():  # one real parameter at a time, its fused parts together
            virtual = graph.to_virtual({real: p.detach()})
            moved = {name: _relabelled(w, graph.params[name], relabel) for name, w in virtual.items()}
            if any(moved[name] is not w for name, w in virtual.items()):
                p.copy_(graph.to_real(moved)[real])
    return twin


def _relabelled(w: torch.Tensor, axes, relabel: dict[str, Relabel]) -> torch.Tensor:
    """``w`` with each axis gathered by its space's ``index`` and signed (``w`` itself when no axis moves)."""
    for axis, spec in enumerate(axes):
        if spec is None:
            continue
        index, sign = relabel[spec.space]
        w = w.index_select(axis, index)  # a fresh tensor: the sign goes in in place
        if sign is not None and not (isinstance(spec, Out) and spec.magnitude):
            shape = [1] * w.dim()
            shape[axis] = -1
            w.mul_(sign.to(w.dtype).view(shape))
    return w


def permuted_copy(model: nn.Module, graph: FlowGraph, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every hidden space consistently permuted (same function)."""
    sizes = space_sizes(graph, parameters(model, graph))
    gen = torch.Generator().manual_seed(seed)
    heads = {}
    for att in graph.attention:
        heads[att.q] = heads[att.k] = heads[att.v] = (att.heads, torch.randperm(att.heads, generator=gen))
    relabel = {}
    for group in symmetry_groups(graph):
        n = sizes[group[0]]
        if group[0] in heads:
            count, head_perm = heads[group[0]]
            dim = n // count
            perm = torch.cat([h * dim + torch.randperm(dim, generator=gen) for h in head_perm.tolist()])
        else:
            perm = torch.randperm(n, generator=gen)
        relabel.update({space: (perm, None) for space in group})
    return relabelled(model, graph, relabel)


def _identity_plan(graph: FlowGraph) -> Plan:
    return Plan(rules=[], where={s: (s, 0) for s in graph.spaces()})


def _duplication_map(n: int, factor: int) -> torch.Tensor:
    """n -> factor * n: neuron i goes whole to neurons factor * i .. factor * i + factor - 1."""
    t = torch.zeros(n, factor * n, dtype=torch.float64)
    for r in range(factor):
        t[torch.arange(n), factor * torch.arange(n) + r] = 1.0 / (factor * n)
    return t


def widened_copy(model: nn.Module, graph: FlowGraph, wide: nn.Module, spaces: list[str], factor: int = 2) -> nn.Module:
    """``wide`` (a model of the wider architecture) carrying ``model``'s function: every neuron of
    the symmetry groups of ``spaces`` (``graph.stream`` names the whole residual stream) is
    duplicated ``factor`` times and what reads it is divided by ``factor``.

    This is the transport-map application itself: with the duplication map T (n x factor n), the
    output side's barycentre copies each row, the input side's T / mu splits each column. The
    residual stream keeps its function because a LayerNorm over duplicated neurons sees the same
    mean and variance. Attention spaces are refused: widening queries and keys changes the
    attention logits' scale."""
    state = parameters(model, graph)
    sizes = space_sizes(graph, state)
    attention = {s for att in graph.attention for s in (att.q, att.k, att.v)}
    wanted = {graph.stream_points()[0] if s == graph.stream else s for s in spaces}
    unknown = sorted(wanted - set(sizes))
    if unknown:
        raise TfuseError(f"widened_copy: unknown space(s) {', '.join(unknown)}")
    maps = {}
    for group in symmetry_groups(graph):
        if not wanted & set(group):
            continue
        if attention & set(group):
            raise TfuseError(f"widened_copy: attention space '{group[0]}' cannot be widened without changing the function")
        maps.update({space: _duplication_map(sizes[space], factor) for space in group})
    return with_state(wide, align(state, graph, _identity_plan(graph), maps), graph)


def symmetric_copy(model: nn.Module, graph: FlowGraph, seed: int = 0, signs: bool = False) -> nn.Module:
    """A copy of ``model`` under a random element of every symmetry its graph claims: the stream
    and the other spaces permuted, heads as wholes; grouped attention (GQA, RoPE) by a group
    permutation, query heads permuted inside their group and value dimensions inside their head,
    the Q/K dimensions in place under RoPE (partial RoPE: the free ones permuted jointly in Q and
    K); with ``signs``, every space of ``graph.signed`` also flipped at random (the value
    dimensions with the output projection's columns)."""
    sizes = space_sizes(graph, parameters(model, graph))
    gen = torch.Generator().manual_seed(seed)
    flip = lambda n: (torch.randint(0, 2, (n,), generator=gen) * 2 - 1) if signs else None  # noqa: E731
    relabel: dict[str, Relabel] = {}
    for att in graph.attention:
        heads, kv = att.heads, att.kv_heads or att.heads
        r = heads // kv
        dk, dv = sizes[att.k] // kv, sizes[att.v] // kv
        groups = torch.randperm(kv, generator=gen)
        inner_q = [torch.randperm(r, generator=gen) for _ in range(kv)]
        pinned = att.pinned(dk)
        inner_k = [torch.cat([torch.arange(pinned), pinned + torch.randperm(dk - pinned, generator=gen)])
                   for _ in range(kv)]
        inner_v = [torch.randperm(dv, generator=gen) for _ in range(kv)]
        sign_v = flip(sizes[att.v]) if att.v in graph.signed else None
        perm = {s: [] for s in ("q", "k", "v", "o")}
        sign_o = []
        for g in range(kv):
            perm["k"] += [int(groups[g]) * dk + int(inner_k[g][e]) for e in range(dk)]
            perm["v"] += [int(groups[g]) * dv + int(inner_v[g][e]) for e in range(dv)]
            for i in range(r):
                head = int(groups[g]) * r + int(inner_q[g][i])
                perm["q"] += [head * dk + int(inner_k[g][e]) for e in range(dk)]
                perm["o"] += [head * dv + int(inner_v[g][e]) for e in range(dv)]
                if sign_v is not None:
                    sign_o.append(sign_v[g * dv:(g + 1) * dv])
        relabel[att.q] = (torch.tensor(perm["q"]), None)
        relabel[att.k] = (torch.tensor(perm["k"]), None)
        relabel[att.v] = (torch.tensor(perm["v"]), sign_v)
        if att.o is not None:
            relabel[att.o] = (torch.tensor(perm["o"]), torch.cat(sign_o) if sign_o else None)
    for group in symmetry_groups(graph):
        group = [s for s in group if s not in relabel]
        if not group:
            continue
        perm = torch.randperm(sizes[group[0]], generator=gen)
        sign = flip(len(perm)) if all(s in graph.signed for s in group) else None
        relabel.update({space: (perm, sign) for space in group})
    return relabelled(model, graph, relabel)


def rotation(d: int, generator: torch.Generator, centred: bool = False) -> torch.Tensor:
    """A random orthogonal matrix (float64); ``centred``: one that fixes the all-ones direction."""
    if not centred:
        return torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]
    basis = centred_basis(d)
    return basis @ rotation(d - 1, generator) @ basis.T + 1.0 / d


def rotated_copy(model: nn.Module, graph: FlowGraph, seed: int = 0) -> nn.Module:
    """A copy of ``model`` (its norm gains folded: ``arch.folded``) with its stream rotated at
    random (fixing the all-ones direction when its norms centre), and the value dimensions of
    every key/value head with the output projection's columns that read them, through the
    engine's own alignment."""
    from tfuse.fusion.methods.ot import OTSettings
    from tfuse.fusion.plan import make_plan

    if graph.rotations is None or graph.norms:
        raise TfuseError("rotated_copy: the stream must admit rotations, with its norm gains folded (arch.folded)")
    generator = torch.Generator().manual_seed(seed)
    state = parameters(model, graph)
    sizes = space_sizes(graph, state)
    plan = make_plan(graph, OTSettings(residual="global", qk="head_aware"))
    d = sizes[graph.stream_points()[0]]
    maps = {graph.stream: rotation(d, generator, graph.rotations == "centred") / d}
    for att in graph.attention:
        kv, n_v = att.kv_heads or att.heads, sizes[att.v]
        blocks = [rotation(n_v // kv, generator) for _ in range(kv)]
        maps[plan.where[att.v][0]] = torch.block_diag(*blocks) / n_v
        if att.o is not None:  # every query head reads its group's value head
            maps[plan.where[att.o][0]] = torch.block_diag(*(blocks[a * kv // att.heads] for a in range(att.heads))) / (
                n_v * att.heads // kv)
    return with_state(model, align(state, graph, plan, maps), graph)
