"""The lstsq repair without stored targets. A layer's target is ``Y = sum_k alpha_k (X_k W_k^T +
b_k)``, with ``X_k`` aligned parent k's input to the layer, seen in the same batch as the fused
model's input ``X``. Either the target is formed batch by batch and dropped (``OnTheFly``: narrow
outputs, an MLP's down projection), or the normal equations come from cross-Grams of the inputs
alone (``CrossGram``: wide outputs, an untied vocabulary head, whose logits are never formed):

    X^T Y = sum_k alpha_k (X^T X_k) W_k^T + (X^T 1) sum_k alpha_k b_k^T
    ||Y||^2 = sum_kl alpha_k alpha_l [tr(W_k X_k^T X_l W_l^T) + 2 b_k^T W_l X_l^T 1 + n b_k^T b_l]

(the second for the fit's reported error). Nothing per sample is kept, and a layer with many
outputs is solved ``CHUNK_ROWS`` outputs at a time. ``for_stage`` takes whichever costs fewer
products per sample.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tfuse.fusion.solvers import GRAM_BLOCK, LeastSquares

CHUNK_ROWS = 8192  # outputs solved at once: X^T Y of a 128K vocabulary is never held whole


class RowSlice:
    """Outputs ``start:stop`` of a linear layer, seen as one (views: writes reach the layer)."""

    def __init__(self, layer: nn.Linear, start: int, stop: int):
        self.weight = layer.weight[start:stop]
        self.bias = None if layer.bias is None else layer.bias[start:stop]
        self.in_features, self.out_features = layer.in_features, stop - start


def chunks(name: str, layer: nn.Linear) -> dict[str, nn.Linear | RowSlice]:
    """The layer, or its row chunks of ``CHUNK_ROWS`` named ``name[start:stop]``."""
    rows = layer.out_features
    if rows <= CHUNK_ROWS:
        return {name: layer}
    return {f"{name}[{a}:{min(a + CHUNK_ROWS, rows)}]": RowSlice(layer, a, min(a + CHUNK_ROWS, rows))
            for a in range(0, rows, CHUNK_ROWS)}


class CrossGram(LeastSquares):
    """Streamed ``X^T X``, ``X^T X_k`` and ``X_k^T X_l`` of one stage; each layer's right-hand side
    and target energy follow from the aligned parents' layers (``targets[k][name]``) at solve time."""

    def __init__(self, layers: dict[str, nn.Linear | RowSlice], ridge: float,
                 targets: Sequence[dict[str, nn.Linear | RowSlice]], weights: Sequence[float]):
        self.layers, self.ridge, self.targets, self.weights = layers, ridge, targets, list(weights)
        d = next(iter(layers.values())).in_features
        dev = next(iter(layers.values())).weight.device
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        self.n, self.xtx, self.xsum = 0, z(d, d), z(d)
        k = len(self.weights)
        self.cross = [z(d, d) for _ in range(k)]  # X^T X_k
        self.ksum = [z(d) for _ in range(k)]  # X_k^T 1
        self.pair = {(a, b): z(d, d) for a in range(k) for b in range(a, k)}  # X_a^T X_b
        self.xty, self.ysum, self.ysq = {}, {}, {}

    def add(self, x: torch.Tensor, parents: Sequence[torch.Tensor]) -> None:
        self.n += x.shape[0]
        for i in range(0, x.shape[1], GRAM_BLOCK):  # float32 products of one batch, float64 across batches
            self.xtx[i:i + GRAM_BLOCK, i:] += x[:, i:i + GRAM_BLOCK].T @ x[:, i:]
        self.xsum += x.sum(0)
        for k, xk in enumerate(parents):
            self.cross[k] += x.T @ xk
            self.ksum[k] += xk.sum(0)
        for (a, b), gram in self.pair.items():
            gram += parents[a].T @ parents[b]

    def _system(self, layer, name: str, bias: bool):
        """The layer's X^T Y, Y^T 1 and ||Y||^2 from the Grams, then the base class's system."""
        w = [t[name].weight.detach().double() for t in self.targets]
        b = [t[name].bias.detach().double() if t[name].bias is not None else w[k].new_zeros(w[k].shape[0])
             for k, t in enumerate(self.targets)]
        a = self.weights
        bias_mean = sum(ak * bk for ak, bk in zip(a, b))
        self.xty[name] = sum(ak * (c @ wk.T) for ak, c, wk in zip(a, self.cross, w)) + torch.outer(self.xsum, bias_mean)
        self.ysum[name] = sum(ak * (wk @ s + self.n * bk) for ak, wk, s, bk in zip(a, w, self.ksum, b))
        energy = 0.0
        for (i, j), gram in self.pair.items():
            term = float(((w[i] @ gram) * w[j]).sum() + b[i] @ (w[j] @ self.ksum[j]) + b[j] @ (w[i] @ self.ksum[i])
                         + self.n * (b[i] @ b[j]))
            energy += a[i] * a[j] * term * (1 if i == j else 2)
        self.ysq[name] = energy
        system = super()._system(layer, name, bias)
        del self.xty[name], self.ysum[name]
        return system


class OnTheFly(LeastSquares):
    """The stage's targets formed from the aligned parents' inputs batch by batch (their layers
    applied), summed into ``X^T Y`` and dropped."""

    def __init__(self, layers: dict[str, nn.Linear], ridge: float, targets: Sequence[dict[str, nn.Linear]],
                 weights: Sequence[float]):
        super().__init__(layers, ridge)
        self.targets, self.weights = targets, list(weights)

    def add(self, x: torch.Tensor, parents: Sequence[torch.Tensor]) -> None:
        outputs = {}
        for name in self.layers:
            y = None
            for a, xk, t in zip(self.weights, parents, self.targets):
                layer = t[name]
                out = torch.nn.functional.linear(xk, layer.weight.float(), None if layer.bias is None else layer.bias.float())
                y = a * out if y is None else y.add_(out, alpha=a)
            outputs[name] = y
        super().add(x, outputs)


def for_stage(layers: dict[str, nn.Linear], ridge: float, targets: Sequence[dict[str, nn.Linear]],
              weights: Sequence[float]) -> LeastSquares:
    """The cheaper solver for a stage: per sample, forming the targets costs ``(N + 1) d_in sum(out)``
    products, the cross-Grams ``(N + N(N+1)/2) d_in^2``; heads too wide for one solve are chunked
    and always take the cross-Grams."""
    n = len(weights)
    d = next(iter(layers.values())).in_features
    outputs = sum(m.out_features for m in layers.values())
    if any(m.out_features > CHUNK_ROWS for m in layers.values()) or (n + n * (n + 1) // 2) * d < (n + 1) * outputs:
        pieces = [{} for _ in targets]
        mine = {}
        for name, layer in layers.items():
            mine.update(chunks(name, layer))
            for k, t in enumerate(targets):
                pieces[k].update(chunks(name, t[name]))
        return CrossGram(mine, ridge, pieces, weights)
    return OnTheFly(layers, ridge, targets, weights)
