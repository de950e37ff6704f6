"""Repair after alignment: the fused model's linear layers refit (``lstsq``) or rescaled
(``rescale``) toward the aligned parents, layer after layer in forward order.

*Targets*: every aligned parent (a parent moved into the anchor's basis by its maps; for hard
maps, the parent's own function) runs on the same calibration inputs, and a layer's target is the
alpha-weighted mean of their outputs of it. *Inputs*: the fused model's own inputs to the layer,
after the repair of every earlier layer.

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
``X^T X``. A layer reading the model's inputs directly is already exact (the average of the
aligned layers applied to the same input is the mean of their outputs) and is refit as a no-op.
Each stage streams the calibration batches once. To stay linear in depth, every model is replayed
from the block holding the stage (``FlowGraph.blocks``): the block's input is cached per batch once
the blocks before it are final, the blocks before are bypassed, and the pass stops as soon as the
stage has been observed. With ``fusion.cache_targets``, the targets are kept (``cache.py``,
``TargetStore``): a sweep that leaves the aligned parents as they are (over ``repair_ridge``, or
the finetune's knobs) replays only the fused model.

*Per-sample targets* (``repair_targets``, lstsq): on each calibration sample, aligned parent k
weighs ``alpha_k x s_k`` normalised over the parents, where ``s_k`` is its probability of the
sample's true label (``label``) or its top probability (``confidence``), read off the task
(``competence``): the parent that knows a sample dominates its target, as it dominates the
ensemble's vote. ``mean`` (``s_k = 1``) is the plain alpha-weighted mean.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.settings import FusionSettings
from tfuse.fusion.statistics import call, kept_rows
from tfuse.fusion.tokens import token_mask
from tfuse.progress import track

if TYPE_CHECKING:
    from tfuse.fusion.cache import TargetStore

Batch = dict[str, torch.Tensor]
PINV_CUTOFF = 1e-6  # ridge 0: directions of X^T X below this share of its largest eigenvalue are rounding noise


@dataclass(frozen=True)
class Stage:
    """Linear layers that read one tensor, in call order. ``segment``: 0 before the first block,
    ``k + 1`` inside block ``k``, ``len(blocks) + 1`` after the last one."""

    modules: tuple[str, ...]
    segment: int


@dataclass
class LayerFit:
    """A refit layer's squared calibration error to its target, relative to the target's energy."""

    layer: str
    before: float
    after: float


class _Stop(Exception):
    """Raised by a hook once a replay has seen everything it was asked for."""


def _first(args: tuple, kwargs: dict):
    return args[0] if args else next(iter(kwargs.values()))


class _Transposed:
    """A linear module storing its weight as (in, out) (``FlowGraph.transposed``: GPT-2's
    ``Conv1D``) seen as an ``nn.Linear``: ``weight`` is a view of the stored one, so writes reach it."""

    def __init__(self, module: nn.Module):
        self.module = module

    in_features = property(lambda self: self.module.weight.shape[0])
    out_features = property(lambda self: self.module.weight.shape[1])
    weight = property(lambda self: self.module.weight.T)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def linear_layers(model: nn.Module, graph: FlowGraph) -> dict[str, nn.Linear]:
    """The model's linear modules whose weight the flow graph describes (``nn.Linear``, and the
    graph's ``transposed`` ones)."""
    described = graph.real_names()
    return {
        name: m if isinstance(m, nn.Linear) else _Transposed(m) for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) or name in graph.transposed) and f"{name}.weight" in described
    }


def find_stages(model: nn.Module, graph: FlowGraph, inputs: Batch) -> list[Stage]:
    """The repairable layers in call order, grouped into stages, read off one forward pass."""
    layers = linear_layers(model, graph)
    modules = dict(model.named_modules())
    segment = [0]
    calls: list[tuple[str, torch.Tensor, int]] = []

    def enter(index: int) -> None:
        segment[0] = index + 1

    def record(name: str, x: torch.Tensor) -> None:
        if any(n == name for n, _, _ in calls):
            raise TfuseError(f"repair: layer '{name}' runs more than once per forward pass (shared weights): not supported")
        calls.append((name, x, segment[0]))

    handles = [modules[b].register_forward_pre_hook(lambda m, a, k=k: enter(k)) for k, b in enumerate(graph.blocks)]
    if graph.blocks:
        handles.append(modules[graph.blocks[-1]].register_forward_hook(lambda m, i, o: enter(len(graph.blocks))))
    handles += [
        m.register_forward_pre_hook(lambda m, a, k, n=name: record(n, _first(a, k)), with_kwargs=True)
        for name, m in layers.items()
    ]
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list] = []
    for name, x, seg in calls:
        if stages and stages[-1][2] is x and stages[-1][1] == seg:
            stages[-1][0].append(name)
        else:
            stages.append([[name], seg, x])
    return [Stage(tuple(names), seg) for names, seg, _ in stages]


class _Replay:
    """One model run batch by batch from a block whose input is cached (``start``), the blocks
    before it bypassed: the first returns the cached input, the others pass it on."""

    def __init__(self, model: nn.Module, blocks: Sequence[str]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.blocks = [self.modules[b] for b in blocks]
        self.block_names = list(blocks)
        self.start = 0
        self.cache: list[torch.Tensor] = []

    def run(
        self, b: int, inputs: Batch, inputs_of: Sequence[str] = (), outputs_of: Sequence[str] = (),
        block_output: bool = False,
    ) -> dict:
        """Forward batch ``b`` until the inputs of ``inputs_of``, the outputs of ``outputs_of`` and
        (``block_output``) the output of block ``start`` have been seen; returns them by
        ``("in", name)``, ``("out", name)`` and ``"block"``."""
        seen: dict = {}
        want = len(inputs_of) + len(outputs_of) + int(block_output)

        def done(key, value) -> None:
            seen[key] = value
            if len(seen) == want:
                raise _Stop

        handles = [
            self.modules[n].register_forward_pre_hook(lambda m, a, k, n=n: done(("in", n), _first(a, k)), with_kwargs=True)
            for n in inputs_of
        ]
        handles += [self.modules[n].register_forward_hook(lambda m, i, o, n=n: done(("out", n), o)) for n in outputs_of]
        if block_output:
            handles.append(self.blocks[self.start].register_forward_hook(lambda m, i, o: done("block", self._tensor(o))))
        bypassed = self.blocks[: self.start]
        if bypassed:
            state = self.cache[b]
            bypassed[0].forward = lambda *a, **k: state
            for block in bypassed[1:]:
                block.forward = lambda *a, **k: _first(a, k)
        try:
            call(self.model, inputs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
            for block in bypassed:
                vars(block).pop("forward", None)
        return seen

    def _tensor(self, out) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TfuseError(
                f"repair: block '{self.block_names[self.start]}' returns a {type(out).__name__}, not a tensor: "
                "the flow graph's blocks must each map a tensor to a tensor"
            )
        return out

    def advance_batch(self, b: int, block_output: torch.Tensor) -> None:
        """Batch ``b``'s cached input becomes the next block's, copied into the buffer it had: the
        cache is allocated once and two blocks' inputs are never held whole."""
        if b >= len(self.cache):
            self.cache.append(block_output.clone())
        elif self.cache[b].shape == block_output.shape:
            self.cache[b].copy_(block_output)
        else:
            self.cache[b] = block_output.clone()

    def advance(self) -> None:
        """Every batch holds the next block's input: replays start there."""
        self.start += 1


class _Rows:
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


class _LeastSquares:
    """Streamed normal equations of one stage; the layers share ``X^T X``."""

    needs_inputs = True

    def __init__(self, layers: dict[str, nn.Linear], ridge: float):
        self.layers, self.ridge = layers, ridge
        d = next(iter(layers.values())).in_features
        dev = next(iter(layers.values())).weight.device
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        self.n, self.xtx, self.xsum = 0, z(d, d), z(d)
        self.xty = {n: z(d, m.out_features) for n, m in layers.items()}
        self.ysum = {n: z(m.out_features) for n, m in layers.items()}
        self.ysq = dict.fromkeys(layers, 0.0)

    def target(self, parents: list[dict[str, torch.Tensor]], weights: Sequence) -> dict[str, torch.Tensor]:
        """Each layer's target: the weighted mean of the aligned parents' outputs (a weight per
        parent, or a column of per-row weights)."""
        return {n: sum(a * p[n] for a, p in zip(weights, parents)) for n in self.layers}

    def add(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        self.n += x.shape[0]
        self.xtx += x.T @ x  # float32 product of one batch, float64 across batches
        self.xsum += x.sum(0)
        for name, y in targets.items():
            self.xty[name] += x.T @ y
            self.ysum[name] += y.sum(0)
            self.ysq[name] += float((y * y).sum(dtype=torch.float64))

    def solve(self) -> list[LayerFit]:
        fits = []
        for name, layer in self.layers.items():
            gram, rhs, current = self._system(layer, name, layer.bias is not None)
            if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
                raise TfuseError(
                    f"repair: the inputs or targets of layer '{name}' are not finite; check the parents' weights"
                )
            new = self._solve(gram, rhs, current, name)
            if not torch.isfinite(new).all():
                raise TfuseError(f"repair: the refit of layer '{name}' is not finite; raise fusion.repair_ridge")
            energy = max(self.ysq[name], 1e-30)
            fits.append(LayerFit(name, self._error(gram, rhs, current, name) / energy, self._error(gram, rhs, new, name) / energy))
            with torch.no_grad():
                layer.weight.copy_(new[: layer.in_features].T.to(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.copy_(new[-1].to(layer.bias.dtype))
        return fits

    def _solve(self, gram: torch.Tensor, rhs: torch.Tensor, current: torch.Tensor, name: str) -> torch.Tensor:
        """(G + lambda I)^-1 (R + lambda W) by Cholesky; with ridge 0 its limit, the least-squares
        solution nearest the current weights (pseudo-inverse: [X 1] is rank-deficient whenever X
        is a LayerNorm's output, whose features sum to a constant)."""
        if self.ridge == 0:
            values, vectors = torch.linalg.eigh(gram)
            keep = values > PINV_CUTOFF * values.max().clamp_min(1e-300)
            v = vectors[:, keep]
            return current + v @ ((v.T @ (rhs - gram @ current)) / values[keep, None])
        lam = self.ridge * float(gram.diagonal().mean())
        factor, info = torch.linalg.cholesky_ex(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device))
        if int(info) != 0:
            raise TfuseError(
                f"repair: the least-squares system of layer '{name}' is not positive definite; raise "
                f"fusion.repair_ridge above {self.ridge}"
            )
        return torch.cholesky_solve(rhs + lam * current, factor)

    def _system(self, layer: nn.Linear, name: str, bias: bool) -> tuple[torch.Tensor, ...]:
        """[X 1]^T [X 1], [X 1]^T Y and the current weights [W^T; b^T] (without the ones column
        when the layer has no bias)."""
        current = layer.weight.detach().double().T
        if not bias:
            return self.xtx, self.xty[name], current
        d = len(self.xtx)
        gram = self.xtx.new_empty(d + 1, d + 1)
        gram[:d, :d], gram[:d, d], gram[d, :d], gram[d, d] = self.xtx, self.xsum, self.xsum, self.n
        rhs = torch.cat([self.xty[name], self.ysum[name][None]])
        return gram, rhs, torch.cat([current, layer.bias.detach().double()[None]])

    def _error(self, gram: torch.Tensor, rhs: torch.Tensor, w: torch.Tensor, name: str) -> float:
        """||[X 1] W - Y||^2 from the sums: tr(W^T G W) - 2 tr(W^T R) + ||Y||^2."""
        return max(float((w * (gram @ w)).sum() - 2 * (w * rhs).sum()) + self.ysq[name], 0.0)


class _Rescale:
    """REPAIR: per output neuron, the fused model's mean and spread against the parents'."""

    needs_inputs = False

    def __init__(self, layers: dict[str, nn.Linear], weights: Sequence[float]):
        self.layers, self.weights = layers, list(weights)
        dev = next(iter(layers.values())).weight.device
        moments = lambda m: [0, torch.zeros(m.out_features, dtype=torch.float64, device=dev),  # noqa: E731
                             torch.zeros(m.out_features, dtype=torch.float64, device=dev)]
        self.fused = {n: moments(m) for n, m in layers.items()}
        self.parents = [{n: moments(m) for n, m in layers.items()} for _ in self.weights]

    @staticmethod
    def _add(moments: list, x: torch.Tensor) -> None:
        """Count, mean and centred sum of squares, merged batch by batch (Chan et al.): a neuron
        that barely varies (the class token before the first block) keeps a true spread near
        zero, where sums of squares would leave rounding noise."""
        n, m = moments[0], x.shape[0]
        batch_mean = x.sum(0, dtype=torch.float64) / m
        centred = ((x - batch_mean.to(x.dtype)) ** 2).sum(0, dtype=torch.float64)
        delta = batch_mean - moments[1]
        moments[0] = n + m
        moments[1] += delta * (m / (n + m))
        moments[2] += centred + delta * delta * (n * m / (n + m))

    @staticmethod
    def target(parents: list[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """Every aligned parent's outputs of every layer, as ``"k|layer"``."""
        return {f"{k}|{n}": y for k, p in enumerate(parents) for n, y in p.items()}

    def add(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        for name, z in outputs.items():
            self._add(self.fused[name], z)
            for k, store in enumerate(self.parents):
                self._add(store[name], targets[f"{k}|{name}"])

    def solve(self) -> list[LayerFit]:
        for name, layer in self.layers.items():
            mean, std = _mean_std(self.fused[name])
            goal_mean = sum(a * _mean_std(p[name])[0] for a, p in zip(self.weights, self.parents))
            goal_std = sum(a * _mean_std(p[name])[1] for a, p in zip(self.weights, self.parents))
            # a neuron constant over the samples has no spread to rescale: only its mean moves
            scale = torch.where(std > 1e-6 * (1e-6 + mean.abs()), goal_std / std.clamp_min(1e-30), torch.ones_like(std))
            if not (torch.isfinite(scale).all() and torch.isfinite(goal_mean).all()):
                raise TfuseError(f"repair: the rescaling of layer '{name}' is not finite; check the parents' activations")
            with torch.no_grad():
                layer.weight.mul_(scale[:, None].to(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.copy_((scale * (layer.bias.double() - mean) + goal_mean).to(layer.bias.dtype))
        return []


def _mean_std(moments: list) -> tuple[torch.Tensor, torch.Tensor]:
    n, mean, centred = moments
    return mean, (centred / max(n, 1)).sqrt()


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
    rows = _Rows(graph, settings, data)
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
    stages = find_stages(fused, graph, inputs[0])
    if not stages:
        raise TfuseError("repair: no linear layer that the flow graph describes ran in the forward pass")
    layers = linear_layers(fused, graph)
    stored = store is not None and store.begin([s.modules for s in stages], len(inputs), fused)
    replays = [_Replay(m, graph.blocks) for m in (fused, *([] if stored else targets))]
    fits: list[LayerFit] = []
    last_block = len(graph.blocks)
    for index, stage in enumerate(track(stages, f"repair ({settings.repair})", total=len(stages))):
        start = max(stage.segment - 1, 0)
        for replay in replays:
            while replay.start < start:
                for b, x in enumerate(inputs):
                    replay.advance_batch(b, replay.run(b, x, block_output=True)["block"])
                replay.advance()
        ends_block = 1 <= stage.segment <= last_block and (
            index + 1 == len(stages) or stages[index + 1].segment != stage.segment
        )
        own = {n: layers[n] for n in stage.modules}
        method = _LeastSquares(own, settings.repair_ridge) if settings.repair == "lstsq" else _Rescale(own, weights)
        for b, x in enumerate(inputs):
            if method.needs_inputs:
                seen = replays[0].run(b, x, inputs_of=stage.modules[:1])
                fused_seen = rows(b, seen["in", stage.modules[0]])
            else:
                seen = replays[0].run(b, x, outputs_of=stage.modules)
                fused_seen = {n: rows(b, seen["out", n]) for n in stage.modules}
            if stored:
                target = store.read(index, b)
            else:
                parents, shape = [], None
                for replay in replays[1:]:
                    got = replay.run(b, x, outputs_of=stage.modules, block_output=ends_block)
                    if ends_block:  # the block's last use of this batch's input
                        replay.advance_batch(b, got["block"])
                    parents.append({n: rows(b, got["out", n]) for n in stage.modules})
                    shape = got["out", stage.modules[0]]
                factors = weights
                if per_sample is not None:  # one column of row weights per parent
                    w = rows.per_row(b, shape, per_sample[b].to(shape.device))
                    factors = [w[:, k:k + 1] for k in range(w.shape[1])]
                target = method.target(parents, factors)
                if store is not None:
                    store.write(index, b, target)
            method.add(fused_seen, target)
        if store is not None and not stored:
            store.end_stage(index)
        if ends_block:
            for replay in replays[1:]:
                replay.advance()
        fits += method.solve()
    return fits
