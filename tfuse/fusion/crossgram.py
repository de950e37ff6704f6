"""The lstsq repair without stored targets. A layer's target is ``Y = sum_k D_k (X_k W_k^T +
1 b_k^T)``, with ``X_k`` aligned parent k's input to the layer, seen in the same batch as the
fused model's input ``X``, and ``D_k`` the parent's weight on each sample (its alpha, or with
``repair_targets`` its per-sample weight). Either the target is formed batch by batch and dropped
(``OnTheFly``: narrow outputs, an MLP's down projection), or the normal equations come from
cross-Grams of the inputs alone (``CrossGram``: wide outputs, an untied vocabulary head, whose
logits are never formed). With ``Z_k = D_k X_k`` and ``d_k = D_k 1``:

    X^T Y = sum_k (X^T Z_k) W_k^T + (X^T d_k) b_k^T
    ||Y||^2 = sum_kl tr(W_k Z_k^T Z_l W_l^T) + 2 b_l^T W_k Z_k^T d_l + d_k^T d_l b_k^T b_l

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
    """Streamed ``X^T X``, ``X^T Z_k`` and ``Z_k^T Z_l`` of one stage, where ``Z_k = D_k X_k`` is
    aligned parent k's input with each row scaled by the parent's weight on that sample (``D_k``:
    its alpha, or its per-sample weight); each layer's right-hand side and target energy follow
    from the aligned parents' layers (``targets[k][name]``) at solve time."""

    def __init__(self, layers: dict[str, nn.Linear | RowSlice], ridge: float,
                 targets: Sequence[dict[str, nn.Linear | RowSlice]], weights: Sequence[float]):
        self.layers, self.ridge, self.targets, self.weights = layers, ridge, targets, list(weights)
        d = next(iter(layers.values())).in_features
        dev = next(iter(layers.values())).weight.device
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        self.n, self.xtx, self.xsum = 0, z(d, d), z(d)
        k = len(self.weights)
        self.cross = [z(d, d) for _ in range(k)]  # X^T Z_k
        self.xd = [z(d) for _ in range(k)]  # X^T d_k
        self.zsum = [z(d) for _ in range(k)]  # Z_k^T 1
        self.dsum = [0.0] * k  # d_k^T 1
        self.pair = {(a, b): z(d, d) for a in range(k) for b in range(a, k)}  # Z_a^T Z_b
        self.zd = {(a, b): z(d) for a in range(k) for b in range(k)}  # Z_a^T d_b
        self.dd = dict.fromkeys(self.pair, 0.0)  # d_a^T d_b
        self.xty, self.ysum, self.ysq = {}, {}, {}

    def add(self, x: torch.Tensor, parents: Sequence[torch.Tensor], factors: Sequence | None = None) -> None:
        """One batch: the fused model's inputs ``x``, the aligned parents' (same rows), and per
        parent a column of per-row weights (default: the alphas)."""
        rows = x.shape[0]
        self.n += rows
        for i in range(0, x.shape[1], GRAM_BLOCK):  # float32 products of one batch, float64 across batches
            self.xtx[i:i + GRAM_BLOCK, i:] += x[:, i:i + GRAM_BLOCK].T @ x[:, i:]
        self.xsum += x.sum(0)
        d = [x.new_full((rows, 1), a) for a in self.weights] if factors is None else [f.to(x.dtype) for f in factors]
        z = [xk * dk for xk, dk in zip(parents, d)]
        for k, zk in enumerate(z):
            self.cross[k] += x.T @ zk
            self.xd[k] += x.T @ d[k][:, 0]
            self.zsum[k] += zk.sum(0)
            self.dsum[k] += float(d[k].sum(dtype=torch.float64))
        for (a, b), gram in self.pair.items():
            gram += z[a].T @ z[b]
            self.dd[a, b] += float((d[a] * d[b]).sum(dtype=torch.float64))
        for (a, b), v in self.zd.items():
            v += z[a].T @ d[b][:, 0]

    def _system(self, layer, name: str, bias: bool):
        """The layer's X^T Y, Y^T 1 and ||Y||^2 from the Grams (``Y = sum_k D_k (X_k W_k^T + 1 b_k^T)``),
        then the base class's system."""
        w = [t[name].weight.detach().double() for t in self.targets]
        b = [t[name].bias.detach().double() if t[name].bias is not None else w[k].new_zeros(w[k].shape[0])
             for k, t in enumerate(self.targets)]
        self.xty[name] = sum(c @ wk.T + torch.outer(xd, bk) for c, xd, wk, bk in zip(self.cross, self.xd, w, b))
        self.ysum[name] = sum(wk @ s + ds * bk for wk, s, ds, bk in zip(w, self.zsum, self.dsum, b))
        energy = 0.0
        for (i, j), gram in self.pair.items():
            term = float(((w[i] @ gram) * w[j]).sum() + b[j] @ (w[i] @ self.zd[i, j]) + b[i] @ (w[j] @ self.zd[j, i])
                         + self.dd[i, j] * (b[i] @ b[j]))
            energy += term * (1 if i == j else 2)
        self.ysq[name] = energy
        system = super()._system(layer, name, bias)
        del self.xty[name], self.ysum[name]
        return system


class OnTheFly(LeastSquares):
    """The stage's targets formed from the aligned parents' inputs batch by batch (their layers
    applied, weighed by the alphas or per-row weights), summed into ``X^T Y`` and dropped."""

    def __init__(self, layers: dict[str, nn.Linear], ridge: float, targets: Sequence[dict[str, nn.Linear]],
                 weights: Sequence[float]):
        super().__init__(layers, ridge)
        self.targets, self.weights = targets, list(weights)

    def add(self, x: torch.Tensor, parents: Sequence[torch.Tensor], factors: Sequence | None = None) -> None:
        outputs = {}
        for name in self.layers:
            y = None
            for a, xk, t in zip(self.weights if factors is None else factors, parents, self.targets):
                layer = t[name]
                out = torch.nn.functional.linear(xk, layer.weight.float(), None if layer.bias is None else layer.bias.float())
                y = a * out if y is None else y.add_(a * out)
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
