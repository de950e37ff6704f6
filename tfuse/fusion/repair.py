"""Repair after alignment: the fused model's linear layers refit (``lstsq``) or rescaled
(``rescale``) toward the aligned parents, layer after layer in forward order.

*Targets*: every aligned parent (a parent moved into the anchor's basis by its maps; for hard
maps, the parent's own function) runs on the same calibration inputs, and a layer's target is the
alpha-weighted mean of their outputs of it. *Inputs*: the fused model's own inputs to the layer,
after the repair of every earlier layer. The solvers (``solvers.py``):

* ``lstsq``: ridge regression with bias, pulled toward the current fused weights,
  ``W = argmin ||[X 1] W - Y||^2 + lambda ||W - W_fused||^2`` with ``lambda = repair_ridge x mean
  diag([X 1]^T [X 1])``, from streamed ``X^T X`` and ``X^T Y`` (float64 solves). Since ``W_fused``
  is a candidate, a refit never raises the layer's calibration error to its target. Ridge 0 is
  the limit: the least-squares solution nearest the fused weights.
* ``rescale`` (REPAIR): every output neuron's mean and standard deviation over the calibration
  tokens set to the alpha-weighted mean of the aligned parents' (the parents' own spread, not the
  smaller spread of their average), folded into the weight rows and the bias.

The layers are every ``nn.Linear`` whose weight the flow graph describes, in the order one
forward pass calls them; consecutive layers reading one tensor (Q, K, V) form a *stage* and share
``X^T X`` (``replay.py``). A layer reading the model's inputs directly is already exact (the
average of the aligned layers applied to the same input is the mean of their outputs) and is
refit as a no-op. To stay linear in depth, every model runs from the block holding the stage
(``FlowGraph.blocks``): the block's input is cached per batch once the blocks before it are
final, and the blocks before are bypassed. The aligned parents never change, so each runs once
per block and batch, from its cached block input to the block's output (which becomes its next
cached input), and the targets of all the block's stages are taken from that one pass. The fused
model runs once per stage and batch, up to the stage's input (its inputs change with every
refit); its modules already final (those whose call ended before an earlier stage's first layer
was called) stand in by the outputs that earlier run of the block gave them (``held.py``). The
fused model's block inputs, the targets, the parents' block inputs and those outputs share
``HELD_BYTES`` of memory (CUDA: half the free device memory, if more); beyond it targets and
parents' block inputs go to a temporary folder, read back once, and modules run again. With
``fusion.cache_targets``, the targets are kept (``cache.py``, ``TargetStore``): a sweep that
leaves the aligned parents as they are (over ``repair_ridge``, or the finetune's knobs) runs only
the fused model.

*Per-sample targets* (``repair_targets``, lstsq): on each calibration sample, aligned parent k
weighs ``alpha_k x s_k`` normalised over the parents, where ``s_k`` is its probability of the
sample's true label (``label``) or its top probability (``confidence``), read off the task
(``competence``): the parent that knows a sample dominates its target, as it dominates the
ensemble's vote. ``mean`` (``s_k = 1``) is the plain alpha-weighted mean.
"""
from __future__ import annotations

import dataclasses
import itertools
from contextlib import nullcontext
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.held import Held, Kept, held_bytes, nbytes
from tfuse.fusion.recorder import kept_rows
from tfuse.fusion.replay import Replay, Stage, find_stages, linear_layers
from tfuse.fusion.settings import FusionSettings
from tfuse.fusion.solvers import LayerFit, LeastSquares, Rescale
from tfuse.fusion.tokens import token_mask
from tfuse.progress import track

if TYPE_CHECKING:
    from tfuse.fusion.cache import TargetStore

Batch = dict[str, torch.Tensor]


class Rows:
    """The samples of an activation: kept (example, token) rows of ``(batch, tokens, width)``
    (``repair_tokens``; padding never counts), every row of a pooled ``(batch, width)``."""

    def __init__(self, graph: FlowGraph, settings: FusionSettings, batches: list[Batch]):
        self.graph, self.batches = graph, batches
        self.settings = dataclasses.replace(settings, tokens=settings.repair_tokens)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.cache: dict[tuple[int, int], torch.Tensor | None] = {}

    def __call__(self, b: int, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x.float()
        rows = self._rows(b, x)
        flat = x.reshape(-1, x.shape[-1])
        return (flat if rows is None else flat.index_select(0, rows)).float()

    def per_row(self, b: int, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``values`` given per example of batch ``b`` (first axis), repeated for each of the
        example's rows that ``self(b, x)`` keeps."""
        if x.dim() == 2:
            return values
        spread = values.repeat_interleave(x.shape[1], dim=0)
        rows = self._rows(b, x)
        return spread if rows is None else spread.index_select(0, rows.to(spread.device))

    def _rows(self, b: int, x: torch.Tensor) -> torch.Tensor | None:
        key = (b, x.shape[1])
        if key not in self.cache:
            mask = token_mask(self.batches[b], x.shape[1], self.graph.tokens, self.settings, self.generator)
            self.cache[key] = kept_rows(mask, x.device)
        return self.cache[key]


def sample_weights(
    targets: Sequence[nn.Module], weights: Sequence[float], batches: Sequence[Batch], kind: str, competence,
) -> list[torch.Tensor]:
    """Per batch, each example's weight of every aligned parent, ``(examples, parents)``, summing
    to one per example: ``alpha_k x s_k`` normalised, ``s_k`` the parent's probability of the true
    label (``label``) or its top probability (``confidence``); the plain alphas where every
    parent gives a sample zero."""
    if competence is None:
        raise TfuseError(f"fusion.repair_targets={kind} needs the task's per-sample predictions, which this task "
                         "does not give; use fusion.repair_targets=mean")
    out = []
    for batch in batches:
        chosen = [competence(m, batch)[0 if kind == "label" else 1] for m in targets]
        if any(score is None for score in chosen):
            raise TfuseError("fusion.repair_targets=label needs labelled calibration samples; use confidence or mean")
        scores = torch.stack([score.double() for score in chosen], dim=1)
        alpha = scores.new_tensor(list(weights))
        raw = scores * alpha
        total = raw.sum(1, keepdim=True)
        out.append(torch.where(total > 0, raw / total.clamp_min(1e-300), alpha / alpha.sum()).float())
    return out


def repair(
    fused: nn.Module,
    targets: Sequence[nn.Module],
    weights: Sequence[float],
    graph: FlowGraph,
    settings: FusionSettings,
    batches: Iterable[Batch],
    model_inputs,
    store: "TargetStore | None" = None,
    competence=None,
) -> list[LayerFit]:
    """Repair ``fused`` in place toward the weighted mean of ``targets`` (the aligned parents, in
    ``fused``'s architecture; per sample with ``repair_targets``, scored by ``competence(model,
    batch) -> (p_label, p_top)`` per example); returns each refit layer's calibration error before
    and after. With ``store``, the targets are read from it when it holds them for these stages
    (the targets are not run at all), else computed and written to it."""
    if settings.repair == "none":
        return []
    data = list(batches)
    if not data:
        raise TfuseError("fusion.repair needs calibration data (fusion.repair_samples >= 1)")
    inputs = [model_inputs(batch) for batch in data]
    rows = Rows(graph, settings, data)
    models = (fused, *targets)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            per_sample = (None if settings.repair_targets == "mean"
                          else sample_weights(targets, weights, data, settings.repair_targets, competence))
            return _repair(fused, targets, weights, graph, settings, inputs, rows, store, per_sample)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _repair(fused, targets, weights, graph, settings, inputs, rows, store, per_sample) -> list[LayerFit]:
    stages, repeated = find_stages(fused, graph, _first_example(inputs[0]))
    if not stages:
        raise TfuseError("repair: no linear layer that the flow graph describes ran in the forward pass")
    stored = store is not None and store.begin([s.modules for s in stages], len(inputs), fused)
    held = Held(held_bytes(next(fused.parameters()).device))
    run = _Run(fused, [] if stored else targets, weights, graph, settings, inputs, rows, per_sample, held, repeated,
               store, stored)
    groups = [list(g) for _, g in itertools.groupby(enumerate(stages), key=lambda s: s[1].segment)]
    fits: list[LayerFit] = []
    try:
        for group in track(groups, f"repair ({settings.repair})", total=len(groups)):
            segment = group[0][1].segment
            start = max(segment - 1, 0)
            run.advance(start)
            if not stored:
                run.capture(group, ends_block=1 <= segment <= len(graph.blocks))
            for index, stage in group:
                fits += run.refit(index, stage)
    finally:
        held.close()
    return fits


def _first_example(batch: Batch) -> Batch:
    """The batch's first example: the tensors whose first axis runs over the batch, cut to one."""
    size = len(next(iter(batch.values())))
    return {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and len(v) == size else v for k, v in batch.items()}


class _Run:
    """The state of one repair: the models' replays, the fused model's cached block inputs, the
    parents' block inputs and the targets (in ``held``), the fused model's kept outputs."""

    def __init__(self, fused, parents, weights, graph, settings, inputs, rows, per_sample, held, repeated, store, stored):
        self.fused, self.parents = Replay(fused, graph.blocks), [Replay(p, graph.blocks) for p in parents]
        self.layers = linear_layers(fused, graph)
        self.weights, self.inputs, self.rows, self.per_sample = weights, inputs, rows, per_sample
        self.held, self.kept = held, Kept(held, fused, graph.blocks, repeated)
        self.states: list[torch.Tensor] = []  # per batch, the fused model's input of block ``fused.start``
        self.store, self.stored = store, stored
        self.solver, self.knob = (LeastSquares, settings.repair_ridge) if settings.repair == "lstsq" else (Rescale, weights)

    def advance(self, start: int) -> None:
        """Every model's cached block inputs moved on to block ``start``."""
        while self.fused.start < start:
            for b, x in enumerate(self.inputs):
                state = self.states[b] if self.fused.start else None
                out = self.fused.run(x, state, block_output=True, reuse=self.kept.reuse(b))["block"]
                if b < len(self.states) and self.states[b].shape == out.shape:
                    self.states[b].copy_(out)  # allocated once: two blocks' inputs are never held whole
                else:
                    self.held.left += nbytes(self.states[b:b + 1]) - nbytes([out])
                    self.states[b:b + 1] = [out.clone()]
            self.fused.start += 1
            self.kept.clear()
        for k, replay in enumerate(self.parents):
            while replay.start < start:
                for b, x in enumerate(self.inputs):
                    self._parent(k, b, x, (), block_output=True)
                replay.start += 1

    def _parent(self, k: int, b: int, x: Batch, outputs_of: Sequence[str], block_output: bool) -> dict:
        """Parent ``k`` on batch ``b``; with ``block_output``, its block output becomes its cached input."""
        replay = self.parents[k]
        state = self.held.take(("input", k, b))["x"] if replay.start else None
        got = replay.run(x, state, outputs_of=outputs_of, block_output=block_output)
        if block_output:
            self.held.put(("input", k, b), {"x": got["block"]})
        return got

    def capture(self, group: list[tuple[int, Stage]], ends_block: bool) -> None:
        """One pass of every parent over the segment of ``group``: each stage's targets, held per
        batch; a block's output advances the parents' cached inputs."""
        names = [n for _, stage in group for n in stage.modules]
        for b, x in enumerate(self.inputs):
            outs = [self._parent(k, b, x, names, ends_block) for k in range(len(self.parents))]
            for index, stage in group:
                factors = self.weights
                if self.per_sample is not None:  # one column of row weights per parent
                    shape = outs[0]["out", stage.modules[0]]
                    w = self.rows.per_row(b, shape, self.per_sample[b].to(shape.device))
                    factors = [w[:, k:k + 1] for k in range(w.shape[1])]
                parents = [{n: self.rows(b, got["out", n]) for n in stage.modules} for got in outs]
                self.held.put(("target", index, b), self.solver.target(parents, factors))
        if ends_block:
            for replay in self.parents:
                replay.start += 1

    def refit(self, index: int, stage: Stage) -> list[LayerFit]:
        """Stream the fused model's samples of ``stage`` against their targets (read from
        ``store`` when it holds them, else taken from ``held`` and, with a store, written to it),
        then solve."""
        method = self.solver({n: self.layers[n] for n in stage.modules}, self.knob)
        in_block = 1 <= stage.segment <= len(self.kept.inside)
        for b, x in enumerate(self.inputs):
            state = self.states[b] if self.fused.start else None
            reuse = self.kept.reuse(b)
            with self.kept.watch(b, self.fused.start, stage.modules[0]) if in_block else nullcontext():
                if method.needs_inputs:
                    seen = self.fused.run(x, state, inputs_of=stage.modules[:1], reuse=reuse)
                    sample = self.rows(b, seen["in", stage.modules[0]])
                else:
                    seen = self.fused.run(x, state, outputs_of=stage.modules, reuse=reuse)
                    sample = {n: self.rows(b, seen["out", n]) for n in stage.modules}
            target = self.store.read(index, b) if self.stored else self.held.take(("target", index, b))
            if self.store is not None and not self.stored:
                self.store.write(index, b, target)
            method.add(sample, target)
        if self.store is not None and not self.stored:
            self.store.end_stage(index)
        return method.solve()
