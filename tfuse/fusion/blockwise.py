"""Pass 2 of streamed fusion (``stream.py``): part by part, every parent aligned into the anchor's
basis and averaged into the fused model (the anchor's skeleton); with ``fusion.repair=lstsq``,
each block's linear layers then refit toward the aligned parents before the walk moves on.

The repair walks the repair batches as pass 1 walks the statistics': the fused model and every
aligned parent (the anchor's own weights in a twin of its skeleton) keep their hidden states at
the current block boundary. For each stage of a block (layers reading one tensor, in call order:
``replay.find_stages``'s grouping) the fused block and each aligned parent's run up to the
stage's input, batch by batch, feeding the normal equations of ``crossgram.py`` (targets formed
and dropped batch by batch, or cross-Grams of the inputs); the stage is solved, and the next
stage reads the refit layers. No target is stored. The layers after the last block
(an untied head) are refit alike, in row chunks.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from tfuse.checkpoint import LazyModel
from tfuse.errors import TfuseError
from tfuse.fusion.apply import align, average
from tfuse.fusion.boundary import BoundaryCache
from tfuse.fusion.crossgram import for_stage
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.repair import Rows
from tfuse.fusion.replay import group_stages, linear_layers
from tfuse.fusion.rules import Plan
from tfuse.fusion.solvers import LayerFit
from tfuse.fusion.walk import OUTER, Walk, part_of
from tfuse.progress import track

Batch = dict[str, torch.Tensor]


def _virtual(graph: FlowGraph, real: Sequence[str]) -> list[str]:
    return [v for n in real for v in (graph.views[n].parts if n in graph.views else (n,)) if v in graph.params]


class _Merge:
    """Aligning and averaging one part at a time; with ``keep``, the aligned parents' parameters
    are written into their own skeletons (the repair's targets)."""

    def __init__(self, parents, targets, graph: FlowGraph, plan: Plan, maps, anchor: int, weights, keep: bool):
        self.parents, self.targets, self.graph, self.plan, self.maps = parents, targets, graph, plan, maps
        self.anchor, self.weights, self.keep = anchor, weights, keep

    def part(self, real: list[str]) -> None:
        virtual = _virtual(self.graph, real)
        aligned = []
        for i, p in enumerate(self.targets):
            aligned.append(self.aligned(i, real, virtual))
            if not self.keep and self.moves(i):
                p.release(real)  # the aligned copy is all that is needed
        fused = self.graph.to_real(average(aligned, self.weights))
        for n in real:
            self.parents[self.anchor].set(n, fused[n])
        if not self.keep:
            self.release(real)

    def moves(self, i: int) -> bool:
        return i != self.anchor and self.maps[i] is not None  # vanilla fusion: no maps

    def aligned(self, i: int, real: list[str], virtual: list[str]) -> dict[str, torch.Tensor]:
        """Parent ``i``'s part in the anchor's basis (virtual parameters); with ``keep``, also in
        its skeleton."""
        p = self.targets[i]
        p.load(real)
        state = self.graph.to_virtual({n: p.tensor(n) for n in real})
        if not self.moves(i):
            return state
        state = align(state, self.graph, self.plan, self.maps[i].raw, names=virtual)
        if self.keep:
            for n, w in self.graph.to_real(state).items():
                p.set(n, w)
        return state

    def release(self, real: list[str]) -> None:
        for i, p in enumerate(self.targets):
            if p is not self.parents[self.anchor]:
                p.release(real)


def align_and_repair(
    parents: Sequence[LazyModel], graph: FlowGraph, plan: Plan, maps, anchor: int, settings,
    calibration: Callable[[], Iterable[Batch]] | None, model_inputs: Callable[[Batch], Batch], cache: BoundaryCache,
) -> list[LayerFit]:
    """Pass 2: the anchor's skeleton becomes the fused model; the repair's fits (lstsq)."""
    weights = settings.weights(len(parents))
    blocks = graph.blocks
    parts: dict[int, list[str]] = {}
    for n in parents[anchor].names():
        parts.setdefault(part_of(n, blocks), []).append(n)
    outer = parts.get(OUTER, [])
    repair = settings.repair != "none"
    targets = list(parents)
    if repair:
        targets[anchor] = parents[anchor].twin()
    merge = _Merge(parents, targets, graph, plan, maps, anchor, weights, keep=repair)
    if not repair:
        for part in track(sorted(parts), "aligning and averaging, block by block", total=len(parts)):
            merge.part(parts[part])
        return []
    data = list(calibration())
    if not data:
        raise TfuseError("fusion.repair needs calibration data (fusion.repair_samples >= 1)")
    inputs = [model_inputs(batch) for batch in data]
    rows = Rows(graph, settings, data)
    fused = Walk(parents[anchor], graph, cache, "fused")
    walks = [Walk(t, graph, cache, i) for i, t in enumerate(targets)]
    layers = linear_layers(parents[anchor].model, graph)
    targets_layers = [linear_layers(t.model, graph) for t in targets]
    for m in [parents[anchor].model] + [t.model for t in targets]:
        m.eval()
    fits: list[LayerFit] = []
    merge.part(outer)
    for b, x in enumerate(inputs):
        for walk in (fused, *walks):
            walk.before(b, x)
    merge.release(outer)
    for k in track(range(len(blocks)), "aligning, averaging and repairing, block by block", total=len(blocks)):
        merge.part(parts.get(k + 1, []))
        for stage in _stages(fused, k, layers, blocks[k]):
            fits += _refit(stage, layers, targets_layers, weights, settings, inputs, rows,
                           lambda w, b, m: w.input_of(k, b, m), fused, walks)
        for b in range(len(inputs)):
            for walk in (fused, *walks):
                walk.block(k, b)
        merge.release(parts.get(k + 1, []))
    after = [n for n in layers if part_of(n, blocks) == OUTER]  # an untied head (one before the blocks reads the inputs: exact)
    if after:
        _realign(merge, outer)
        for name in after:
            fits += _refit([name], layers, targets_layers, weights, settings, inputs, rows,
                           lambda w, b, m: w.input_after(b, inputs[b], m), fused, walks)
        merge.release(outer)
    return fits


def _realign(merge: _Merge, outer: list[str]) -> None:
    """The aligned parents' outer parameters again (released after the part before the blocks)."""
    for i in range(len(merge.targets)):
        merge.aligned(i, outer, _virtual(merge.graph, outer))


def _stages(fused: Walk, k: int, layers, block: str) -> list[list[str]]:
    """Block ``k``'s linear layers grouped into stages (consecutive layers reading one tensor), in
    call order, read off one run of the block on the first batch."""
    inside = {n: m for n, m in layers.items() if part_of(n, [block]) == 1}
    calls: list[tuple[str, torch.Tensor, int]] = []
    modules = fused.modules
    handles = [modules[n].register_forward_pre_hook(
        lambda m, a, kw, n=n: calls.append((n, a[0] if a else next(iter(kw.values())), k)), with_kwargs=True)
        for n in inside]
    try:
        args, kwargs = fused.arguments[0][k]
        fused.blocks[k](fused.cache.get((fused.index, 0)), *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len({n for n, _, _ in calls}):
        raise TfuseError(f"repair: a layer of block '{block}' runs more than once per forward pass (shared weights): "
                         "not supported")
    return [list(stage.modules) for stage in group_stages(calls)]


def _refit(stage: list[str], layers, targets_layers, weights, settings, inputs, rows, input_of, fused: Walk,
           walks: list[Walk]) -> list[LayerFit]:
    """Stream one stage's normal equations over the repair batches, then solve it (``crossgram.py``)."""
    method = for_stage({n: layers[n] for n in stage}, settings.repair_ridge, [{n: t[n] for n in stage} for t in targets_layers],
                       weights)
    first = stage[0]
    for b in range(len(inputs)):
        x = rows(b, input_of(fused, b, first))
        method.add(x, [rows(b, input_of(w, b, first)) for w in walks])
    return method.solve()
