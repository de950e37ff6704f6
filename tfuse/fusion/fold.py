"""Normalisation gains folded into the layers that read them, so that the residual stream admits
rotations (``fusion.maps=orthogonal``).

A norm's gain ``g`` scales each coordinate after normalising: ``W (g * n(x)) = (W diag(g)) n(x)``.
Folded into every layer reading the norm (``In`` axes of the space it writes), the gain becomes
one and the model's function is unchanged. Without gains, RMSNorm commutes with every rotation
of the stream (``n(xQ) = n(x) Q``: the norm is kept) and LayerNorm with those that fix the
all-ones direction (centring commutes with them too). A LayerNorm's shift ``b`` stays, divided by
the gain (``g * n(x) + b = g * (n(x) + b / g)``): written into the normalised stream, it rotates
with it. Graph-driven: no layer is named here.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph, In


def fold_gains(model: nn.Module, graph: FlowGraph) -> FlowGraph:
    """Fold every norm's gain of ``model`` (in place) into the layers reading it; returns the
    folded model's graph, in which the gains (now ones) are fixed: no map moves them."""
    if graph.rotations is None:
        raise TfuseError("fusion.maps=orthogonal: this family's stream does not admit rotations (norms on the stream "
                         "itself, post-LN, or per-channel scales on it); use fusion.maps=permutation")
    shared = sorted(space for space, norm in graph.norms.items() if norm is None)
    if shared:
        raise TfuseError(f"fusion.maps=orthogonal: two norms write space '{shared[0]}', so their readers cannot be told "
                         "apart; give each norm a space of its own in the flow graph")
    state = graph.to_virtual({n: p.detach() for n, p in model.named_parameters()})
    folded: dict[str, torch.Tensor] = {}
    for space, norm in graph.norms.items():
        readers = [(name, axis) for name, axes in graph.params.items()
                   for axis, ax in enumerate(axes) if isinstance(ax, In) and ax.space == space]
        if not readers:
            raise TfuseError(f"fusion.maps=orthogonal: no layer of the flow graph reads the output of '{norm.gain}' "
                             "(an output embedding tied to the input one?); untie it first")
        gain = state[norm.gain].double()
        if norm.bias is not None:
            if bool((gain == 0).any()):
                raise TfuseError(f"fusion.maps=orthogonal: '{norm.gain}' has a zero gain, which cannot be folded; "
                                 "use fusion.maps=permutation")
            folded[norm.bias] = (state[norm.bias].double() / gain).to(state[norm.bias].dtype)
        for name, axis in readers:
            shape = [1] * state[name].dim()
            shape[axis] = -1
            folded[name] = (state[name].double() * gain.view(shape)).to(state[name].dtype)
        folded[norm.gain] = torch.ones_like(state[norm.gain])
    real = graph.to_real({**state, **folded})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in real:
                p.copy_(real[name])
    fixed = {norm.gain for norm in graph.norms.values()}
    return dataclasses.replace(graph, params={n: (None,) * len(a) if n in fixed else a for n, a in graph.params.items()},
                               norms={})
