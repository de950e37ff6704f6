"""The repair's two solvers, fed batch by batch with the fused model's samples and their
targets: ``LeastSquares`` (``lstsq``: streamed normal equations, a ridge refit toward the fused
weights) and ``Rescale`` (``rescale``: every output neuron's mean and spread set to the aligned
parents'). Each takes a stage's layers and refits them in place in ``solve``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError

PINV_CUTOFF = 1e-6  # ridge 0: directions of X^T X below this share of its largest eigenvalue are rounding noise
GRAM_BLOCK = 128  # X^T X is streamed in row blocks of this many features, on and above the diagonal only


@dataclass
class LayerFit:
    """A refit layer's squared calibration error to its target, relative to the target's energy."""

    layer: str
    before: float
    after: float


class LeastSquares:
    """Streamed normal equations of one stage; the layers share ``X^T X`` (symmetric: its upper
    triangle is summed, ``GRAM_BLOCK`` rows at a time, about half the products of the whole)."""

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

    @staticmethod
    def target(parents: list[dict[str, torch.Tensor]], weights: Sequence) -> dict[str, torch.Tensor]:
        """Each layer's target: the weighted mean of the aligned parents' outputs (a weight per
        parent, or a column of per-row weights)."""
        return {n: sum(a * p[n] for a, p in zip(weights, parents)) for n in parents[0]}

    def add(self, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        self.n += x.shape[0]
        for i in range(0, x.shape[1], GRAM_BLOCK):  # float32 products of one batch, float64 across batches
            self.xtx[i:i + GRAM_BLOCK, i:] += x[:, i:i + GRAM_BLOCK].T @ x[:, i:]
        self.xsum += x.sum(0)
        for name, y in targets.items():
            self.xty[name] += x.T @ y
            self.ysum[name] += y.sum(0)
            self.ysq[name] += float((y * y).sum(dtype=torch.float64))

    def solve(self) -> list[LayerFit]:
        self.xtx = torch.triu(self.xtx) + torch.triu(self.xtx, 1).T  # the lower triangle mirrored
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


class Rescale:
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
