"""Ground costs between the neurons of a model and those of the reference (``fusion.cost``).

Activation costs come from streamed sums alone: with a' = (a - c_a) / s_a (``center`` sets c_a
to the mean, ``standardize`` sets s_a to the standard deviation) the norms and dot products of
the transformed vectors are closed forms of sum, sum of squares and cross-products.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from tfuse.errors import TfuseError
from tfuse.fusion.apply import State, writer_rows
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.registry import Registry
from tfuse.fusion.rules import Plan
from tfuse.fusion.statistics import Moments, PairStats


class CostSettings(Protocol):
    """The knobs the costs read; ``OTSettings`` satisfies it."""

    metric: str
    center: bool
    standardize: bool
    unit_norm: bool


@dataclass
class CostInputs:
    """What a cost may read for one parent: its streamed statistics (when the cost needs them),
    its parameters and the reference's, and the maps of the spaces solved before."""

    settings: CostSettings
    stats: dict[str, PairStats] | None
    state: State
    reference: State
    graph: FlowGraph
    plan: Plan
    maps: dict[str, torch.Tensor]


class Cost(ABC):
    """A ground cost: whether it reads activation statistics, its Sinkhorn reg when none is set,
    and the raw cost matrix (n_parent x n_reference) of a resolved space."""

    needs_statistics = False
    default_reg = 0.08

    @abstractmethod
    def matrix(self, space: str, inputs: CostInputs, signed: bool = False):
        """The raw cost of ``space`` (normalised by the caller); with ``signed``, ``(cost, sign)``:
        the cost of the better of a neuron and its negation (the magnitude of their agreement)
        and the sign (+-1) that achieves it."""


COSTS: Registry[Cost] = Registry("cost")
METRICS = ("euclidean", "sqeuclidean", "cosine")
NORMALIZERS = ("max", "median", "mean", "none")


@COSTS.register("activations")
class _Activations(Cost):
    """The metric between the neurons' activations on the calibration samples."""

    needs_statistics = True
    default_reg = 0.08

    def matrix(self, space, inputs, signed=False):
        return activation_cost(inputs.stats[space], inputs.settings, signed)


@COSTS.register("weights")
class _Weights(Cost):
    """The metric between the rows written into the space, aligned on their inputs first."""

    default_reg = 0.06

    def matrix(self, space, inputs, signed=False):
        rows_a = writer_rows(inputs.state, inputs.graph, inputs.plan, inputs.maps, space, signed=signed)
        rows_b = writer_rows(inputs.reference, inputs.graph, inputs.plan, inputs.maps, space, aligned=False, signed=signed)
        if rows_a is None:
            raise TfuseError(
                f"fusion.cost=weights: no weight writes layer '{space}' from already aligned "
                "inputs; use fusion.cost=activations for this architecture"
            )
        return weight_cost(rows_a, rows_b, inputs.settings, signed)


def _affine(m: Moments, settings: CostSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift c and scale s of each neuron, and the squared norm of (a - c) / s."""
    n = m.count
    if not (settings.center or settings.standardize):  # the plain sums were not even kept
        return torch.zeros_like(m.sumsq), torch.ones_like(m.sumsq), m.sumsq
    mean = m.sum / n
    shift = mean if settings.center else torch.zeros_like(mean)
    centred_sq = m.sumsq - 2 * shift * m.sum + n * shift**2
    scale = torch.ones_like(mean)
    if settings.standardize:
        var = (m.sumsq / n - mean**2).clamp_min(0)
        scale = var.sqrt().clamp_min(1e-12)
    return shift, scale, centred_sq / scale**2


def activation_cost(stats: PairStats, settings: CostSettings, signed: bool = False):
    """Cost matrix (n_a, n_b) of the configured metric over the transformed activations (with
    ``signed``: and the signs, ``_metric``)."""
    ca, sa, norm_a = _affine(stats.a, settings)
    cb, sb, norm_b = _affine(stats.b, settings)
    n = stats.a.count
    dot = stats.cross.clone()  # float32, like the GEMMs that summed it: float64 here would add no precision
    if settings.center:
        dot = dot - ca[:, None] * stats.b.sum[None, :] - stats.a.sum[:, None] * cb[None, :] + n * ca[:, None] * cb[None, :]
    if settings.standardize:
        dot = dot / (sa[:, None] * sb[None, :])
    return _metric(dot, norm_a, norm_b, settings, signed)


def weight_cost(rows_a: torch.Tensor, rows_b: torch.Tensor, settings: CostSettings, signed: bool = False):
    """Cost between weight rows (already aligned on their input side)."""
    a, b = rows_a.double(), rows_b.double()
    if settings.center:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    if settings.standardize:
        a = a / a.std(1, keepdim=True).clamp_min(1e-12)
        b = b / b.std(1, keepdim=True).clamp_min(1e-12)
    return _metric(a @ b.T, (a * a).sum(1), (b * b).sum(1), settings, signed)


def _metric(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor, settings: CostSettings, signed: bool = False):
    """Distances from dot products and squared norms (``dot`` is a fresh tensor: used in place).
    ``signed``: the distance of the nearer of ``a`` and ``-a`` (``|dot|`` for the dot), returned
    with the sign that chose it, ``(cost, sign)``."""
    if signed:
        sign = torch.where(dot < 0, -1.0, 1.0).to(torch.float64)
        return _metric(dot.abs_(), norm_a, norm_b, settings), sign
    if settings.unit_norm or settings.metric == "cosine":
        ra, rb = norm_a.clamp_min(1e-24).rsqrt(), norm_b.clamp_min(1e-24).rsqrt()
        dot = dot * ra[:, None] * rb[None, :]
        norm_a, norm_b = torch.ones_like(norm_a), torch.ones_like(norm_b)
    if settings.metric == "cosine":
        return 1.0 - dot
    norm_a, norm_b = norm_a.to(dot.dtype), norm_b.to(dot.dtype)
    sq = dot.mul_(-2.0).add_(norm_a[:, None]).add_(norm_b[None, :]).clamp_(min=0)
    return sq if settings.metric == "sqeuclidean" else sq.sqrt_()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: one reduction (NaN and infinities reach the sum), with the
    element-wise test only when the sum itself overflows."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def normalize(cost: torch.Tensor, how: str, space: str) -> torch.Tensor:
    """Divide by the max, median or mean (in place: costs are fresh tensors); refuse NaN or an
    all-zero cost with the space's name."""
    if not all_finite(cost):
        raise TfuseError(
            f"NaN or infinity in the transport cost of layer '{space}': the parents' activations or "
            "weights there are not finite (check the checkpoints and the calibration data)"
        )
    if how == "none":
        return cost
    scale = {"max": cost.max, "median": cost.median, "mean": cost.mean}[how]()
    return cost.div_(scale) if scale > 0 else cost
