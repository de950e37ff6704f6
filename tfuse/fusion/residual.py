"""Residual policies (``fusion.residual``): how the map of a stream point ``skip + branch``
follows from the maps of its two inputs, or whether the stream gets one map of its own."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.registry import Registry
from tfuse.fusion.rules import CombineRule, PlanBuilder


class ResidualPolicy(ABC):
    """How the stream's maps are planned."""

    name: str  # set by the registry
    needs_magnitudes = False  # whether the policy weighs the stream's inputs by mean |activation|

    @abstractmethod
    def plan(self, plan: PlanBuilder, graph: FlowGraph) -> None:
        """Add the stream's rules to ``plan``."""


class Combining(ResidualPolicy):
    """Combines the skip's and the branch's maps at every stream point that sums them."""

    def plan(self, plan, graph):
        """A map per point that is no sum, a combination per sum."""
        residual_of = {r.out: r for r in graph.residuals}
        for space in graph.stream_points():
            res = residual_of.get(space)
            if res is None:
                plan.ot(space, ((space,),), space)
            else:
                plan.combine(space, res, self.name, self.needs_magnitudes)

    @abstractmethod
    def combine(self, rule: CombineRule, skip: torch.Tensor, branch: torch.Tensor,
                magnitude: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The sum's map from the skip's and the branch's."""


RESIDUALS: Registry[ResidualPolicy] = Registry("residual")


@RESIDUALS.register("no_resid")
class _Branch(Combining):
    def combine(self, rule, skip, branch, magnitude):
        return branch


@RESIDUALS.register("only_resid")
class _Skip(Combining):
    def combine(self, rule, skip, branch, magnitude):
        return skip


@RESIDUALS.register("mean")
class _Mean(Combining):
    def combine(self, rule, skip, branch, magnitude):
        return 0.5 * (skip + branch)


@RESIDUALS.register("weighted_scalar")
class _WeightedScalar(Combining):
    """Skip and branch weighted by their mean |activation| over all neurons."""

    needs_magnitudes = True

    def weights(self, magnitude: dict[str, torch.Tensor], rule: CombineRule) -> tuple[torch.Tensor, torch.Tensor]:
        return magnitude[rule.skip_probe].double().mean(), magnitude[rule.branch_probe].double().mean()

    def combine(self, rule, skip, branch, magnitude):
        w_skip, w_branch = self.weights(magnitude, rule)
        return (w_skip * skip + w_branch * branch) / (w_skip + w_branch).clamp_min(1e-30)


@RESIDUALS.register("weighted_matrix")
class _WeightedMatrix(_WeightedScalar):
    """Per neuron of the parent (rows keep their mass)."""

    def weights(self, magnitude, rule):
        return magnitude[rule.skip_probe].double()[:, None], magnitude[rule.branch_probe].double()[:, None]


@RESIDUALS.register("global")
class _Global(ResidualPolicy):
    """One map for every stream point and branch: the stream is one space (exact symmetry)."""

    def plan(self, plan, graph):
        points = graph.stream_points()
        plan.ot(graph.stream, (tuple(points),))
        for space in points + sorted({r.branch for r in graph.residuals}):
            plan.where[space] = (graph.stream, 0)
