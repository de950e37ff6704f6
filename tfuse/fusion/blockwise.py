"""Pass 2 of streamed fusion (``stream.py``): part by part, every parent aligned into the anchor's
basis and averaged into the fused model (the anchor's skeleton); with ``fusion.repair=lstsq``,
each block's linear layers then refit toward the aligned parents before the walk moves on
(``rescale``: their outputs' means and spreads set to the aligned parents').

The repair walks the repair batches as pass 1 walks the statistics': the fused model and every
aligned parent (the anchor's own weights in a twin of its skeleton) keep their hidden states at
the current block boundary. For each stage of a block (layers reading one tensor, in call order:
``replay.find_stages``'s grouping) the fused block and each aligned parent's run up to the
stage's input, batch by batch, feeding the normal equations of ``crossgram.py`` (targets formed
and dropped batch by batch, or cross-Grams of the inputs); the stage is solved, and the next
stage reads the refit layers. No target is stored. The layers after the last block
(an untied head) are refit alike, in row chunks. Per-sample targets (``repair_targets``) are
scored before the walk, each aligned parent run whole with one block resident.
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
from tfuse.fusion.repair import Rows, sample_weights
from tfuse.fusion.replay import group_stages, linear_layers
from tfuse.fusion.rules import Plan
from tfuse.fusion.solvers import LayerFit, Rescale
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
    competence: Callable | None = None,
) -> list[LayerFit]:
    """Pass 2: the anchor's skeleton becomes the fused model; the repair's fits (lstsq). With
    ``repair_targets``, ``competence(model, batch)`` scores the aligned parents per sample
    (``repair.sample_weights``)."""
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
    per_sample = None
    if settings.repair_targets != "mean":
        per_sample = _sample_weights(merge, parts, data, weights, settings.repair_targets, competence)
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
                           lambda w, b, m: w.input_of(k, b, m), fused, walks, per_sample)
        for b in range(len(inputs)):
            for walk in (fused, *walks):
                walk.block(k, b)
        merge.release(parts.get(k + 1, []))
    after = [n for n in layers if part_of(n, blocks) == OUTER]  # an untied head (one before the blocks reads the inputs: exact)
    if after:
        _realign(merge, outer)
        for name in after:
            fits += _refit([name], layers, targets_layers, weights, settings, inputs, rows,
                           lambda w, b, m: w.input_after(b, inputs[b], m), fused, walks, per_sample)
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
           walks: list[Walk], per_sample: list[torch.Tensor] | None) -> list[LayerFit]:
    """Stream one stage's normal equations (``crossgram.py``; ``rescale``: its output moments)
    over the repair batches, then solve it."""
    mine = {n: layers[n] for n in stage}
    theirs = [{n: t[n] for n in stage} for t in targets_layers]
    rescale = settings.repair == "rescale"
    method = Rescale(mine, weights) if rescale else for_stage(mine, settings.repair_ridge, theirs, weights)
    first = stage[0]
    for b in range(len(inputs)):
        raw = input_of(fused, b, first)
        x = rows(b, raw)
        xs = [rows(b, input_of(w, b, first)) for w in walks]
        if rescale:
            method.add(_outputs(mine, x), Rescale.target([_outputs(t, xk) for t, xk in zip(theirs, xs)], weights))
        elif per_sample is None:
            method.add(x, xs)
        else:
            w = rows.per_row(b, raw, per_sample[b].to(x.device))
            method.add(x, xs, [w[:, k:k + 1] for k in range(w.shape[1])])
    return method.solve()


def _outputs(layers: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {n: torch.nn.functional.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())
            for n, m in layers.items()}


def _sample_weights(merge: _Merge, parts: dict[int, list[str]], data: list[Batch], weights, kind: str,
                    competence) -> list[torch.Tensor]:
    """``repair.sample_weights`` of the aligned parents, each run whole with one block resident:
    a block's part is aligned when the block is called and released when it returns."""
    graph, outer = merge.graph, parts.get(OUTER, [])
    handles = []

    def hooks(i: int, real: list[str]):
        def load(module, args):
            merge.aligned(i, real, _virtual(graph, real))

        def release(module, args, out):
            merge.targets[i].release(real)
        return load, release

    try:
        for i, target in enumerate(merge.targets):
            merge.aligned(i, outer, _virtual(graph, outer))
            modules = dict(target.model.named_modules())
            for k, block in enumerate(graph.blocks):
                load, release = hooks(i, parts.get(k + 1, []))
                handles += [modules[block].register_forward_pre_hook(load), modules[block].register_forward_hook(release)]
        return sample_weights([t.model for t in merge.targets], weights, data, kind, competence)
    finally:
        for h in handles:
            h.remove()
        merge.release(outer)
