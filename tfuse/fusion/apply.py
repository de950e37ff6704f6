"""Apply transport maps to a parent's parameters, and average aligned parents.

Output side (axis written into a space with map T, n_a x n_b): each target neuron j gets the
barycentre of the parent's neurons, ``W~[j] = sum_i T_ij W[i] / nu_j`` with nu_j = 1 / n_b.
Input side (axis reading the space): ``W~ = W (T / mu)`` with mu_i = 1 / n_a, whose rows sum to
one, so the consumer keeps reading the same total signal. Both reduce to the same permutation
when T is one, and differ exactly when widths differ (heterogeneous fusion). A signed map (a
signed permutation: entries +-1/n) flips the neurons it negates on both sides; axes marked
``Out(..., magnitude=True)`` (gains) move by |T| and keep their sign. A map stored compactly as a
``HardMap`` (``compact.py``) is applied by gathering, never by a dense product.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from tfuse.errors import TfuseError
from tfuse.fusion.compact import HardMap
from tfuse.fusion.graph import FlowGraph, In, Out
from tfuse.fusion.rules import Plan

State = dict[str, torch.Tensor]
AVERAGE_CHUNK = 1 << 22  # elements averaged at once in float64 (32 MiB)


def _side(t: torch.Tensor, output: bool, dtype: torch.dtype) -> torch.Tensor:
    """n_b T^T (output side) or n_a T (input side), in ``dtype``: a fresh copy, cast first and then
    scaled in place (the map itself is never touched, even when it already has ``dtype``)."""
    return t.T.to(dtype, copy=True).mul_(t.shape[1]) if output else t.to(dtype, copy=True).mul_(t.shape[0])


def _out(w: torch.Tensor, axis: int, bary: torch.Tensor) -> torch.Tensor:
    moved = w.movedim(axis, 0)
    out = bary @ moved.reshape(moved.shape[0], -1)
    return out.reshape(bary.shape[0], *moved.shape[1:]).movedim(0, axis)


def _in(w: torch.Tensor, axis: int, keep: torch.Tensor) -> torch.Tensor:
    return (w.movedim(axis, -1) @ keep).movedim(-1, axis)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a parameter is transported in: its own, at least float32 (a soft map's
    barycentres in bfloat16 would lose the digits the weights keep)."""
    return torch.promote_types(dtype, torch.float32)


class SideMatrices:
    """n_b T^T and n_a T of every map, converted to the weights' precision once."""

    def __init__(self, maps: dict[str, torch.Tensor | HardMap], dtype: torch.dtype):
        self.maps, self.dtype = maps, dtype
        self._cache: dict[tuple[str, bool], torch.Tensor] = {}

    def get(self, space: str, output: bool, magnitude: bool = False) -> torch.Tensor:
        """``magnitude``: of the map's absolute value (axes that keep their sign under a flip)."""
        t = self.maps[space]
        t = t.dense() if isinstance(t, HardMap) else t
        magnitude = magnitude and bool((t < 0).any())  # unsigned maps share one matrix
        key = (space, output, magnitude)
        if key not in self._cache:
            self._cache[key] = _side(t.abs() if magnitude else t, output, self.dtype)
        return self._cache[key]


def _check(name: str, axis: int, w: torch.Tensor, t: torch.Tensor, space: str) -> None:
    if w.shape[axis] != t.shape[0]:
        raise TfuseError(
            f"parameter '{name}' axis {axis} has size {w.shape[axis]} but its space '{space}' has "
            f"{t.shape[0]} neurons: the flow graph does not match this model"
        )


def align(
    state: State,
    graph: FlowGraph,
    plan: Plan,
    maps: dict[str, torch.Tensor | HardMap],
    names: Sequence[str] | None = None,
) -> State:
    """The parent's parameters expressed in the reference's neuron basis, each in its own dtype
    (transported in ``working_dtype``).

    ``names`` restricts the work to some parameters; axes whose resolved space has no map in
    ``maps`` yet are left as they are.
    """
    out: State = {}
    sides: dict[torch.dtype, SideMatrices] = {}  # one per working precision
    stacked: dict[str, dict[int, list[tuple[str, int]]]] = defaultdict(lambda: defaultdict(list))
    for name in names or graph.params:
        w = state[name]
        dtype = working_dtype(w.dtype)
        side = sides.setdefault(dtype, SideMatrices(maps, dtype))
        for axis, spec in enumerate(graph.params[name]):
            if spec is None:
                continue
            space, segment = plan.where[spec.space]
            t = maps.get(space)
            if t is None:
                continue
            if len(plan.segments.get(space, ((),))) > 1:
                if isinstance(spec, In):
                    raise TfuseError(f"parameter '{name}' reads the stacked space '{space}': not supported")
                stacked[space][segment].append((name, axis))
                continue
            _check(name, axis, w, t, spec.space)
            output = isinstance(spec, Out)
            if isinstance(t, HardMap):
                w = t.gather(w, axis, output and spec.magnitude)
                continue
            w = (_out if output else _in)(w.to(dtype), axis, side.get(space, output, output and spec.magnitude))
        out[name] = w.to(state[name].dtype)
    for space, by_segment in stacked.items():
        segments = [by_segment[s] for s in sorted(by_segment)]
        dtype = working_dtype(state[segments[0][0][0]].dtype)
        _apply_stacked(out, sides.setdefault(dtype, SideMatrices(maps, dtype)).get(space, True), segments, space)
    return out


def _apply_stacked(state: State, bary: torch.Tensor, segments: list[list[tuple[str, int]]], space: str) -> None:
    """Output side of a space stacked from segments (Q and K in ``qk=joint``): parameters at the
    same position of every segment are concatenated, transported together (in ``bary``'s dtype)
    and split again, each into its own dtype."""
    if len({len(s) for s in segments}) != 1:
        raise TfuseError(f"the segments of the stacked space '{space}' hold different parameters")
    for group in zip(*segments):
        axis = group[0][1]
        parts = [state[name] for name, _ in group]
        joined = _out(torch.cat([p.to(bary.dtype) for p in parts], dim=axis), axis, bary)
        sizes = [p.shape[axis] * bary.shape[0] // bary.shape[1] for p in parts]
        for (name, _), piece, part in zip(group, joined.split(sizes, dim=axis), parts):
            state[name] = piece.to(part.dtype)


def writer_rows(
    state: State, graph: FlowGraph, plan: Plan, maps: dict[str, torch.Tensor], space: str, aligned: bool = True,
    signed: bool = False,
) -> torch.Tensor | None:
    """Features of each neuron of a resolved space for the weight cost: the rows of every
    parameter written into it, aligned on their other axes when ``aligned`` (only writers whose
    other axes are already mapped count). Segments of a stacked space are stacked along neurons.
    ``signed``: only the writers that flip with the neuron (no gains), so that a row's sign is
    the neuron's."""
    by_segment: dict[int, list[torch.Tensor]] = defaultdict(list)
    for name, axes in graph.params.items():
        writes = [(i, ax) for i, ax in enumerate(axes) if isinstance(ax, Out) and plan.where[ax.space][0] == space]
        if len(writes) != 1 or (signed and writes[0][1].magnitude):
            continue
        axis, spec = writes[0]
        others = [ax for i, ax in enumerate(axes) if ax is not None and i != axis]
        if any(plan.where[ax.space][0] not in maps for ax in others):
            continue
        w = align(state, graph, plan, maps, names=[name])[name] if aligned else state[name]
        moved = w.movedim(axis, 0)
        by_segment[plan.where[spec.space][1]].append(moved.reshape(moved.shape[0], -1).double())
    if not by_segment:
        return None
    return torch.cat([torch.cat(by_segment[s], dim=1) for s in sorted(by_segment)], dim=0)


def average(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted average of parameter dicts with equal shapes."""
    first = states[0]
    for i, s in enumerate(states[1:], start=1):
        for name, w in first.items():
            if s[name].shape != w.shape:
                raise TfuseError(
                    f"parameter '{name}' has shape {tuple(s[name].shape)} in parent {i} but "
                    f"{tuple(w.shape)} in parent 0; vanilla fusion needs identical architectures"
                )
    out: State = {}
    for name, w in first.items():
        out[name] = torch.empty_like(w)
        rows = max(1, AVERAGE_CHUNK // max(1, w[0].numel() if w.dim() else 1))
        for start in range(0, max(len(w), 1) if w.dim() else 1, rows):  # a vocabulary's rows a slice at a time
            part = (lambda t: t[start:start + rows]) if w.dim() else (lambda t: t)
            total = part(w).to(torch.float64, copy=True).mul_(weights[0])  # a float64 copy (never w itself), then in place
            for a, s in zip(weights[1:], states[1:]):
                total.add_(part(s[name]).double(), alpha=a)
            part(out[name]).copy_(total)
    return out
