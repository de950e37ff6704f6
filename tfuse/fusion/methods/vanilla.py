"""Vanilla fusion (VF): the parents' weights averaged as they are, without alignment."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from tfuse.fusion.apply import average
from tfuse.fusion.engine import FusionOutcome, parameters, repair_fused, with_state
from tfuse.fusion.methods import METHODS, Method


def vanilla_fuse(models: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """Plain weighted average of the parameters (no alignment)."""
    return with_state(models[0], average([parameters(m) for m in models], weights))


@METHODS.register("vanilla")
class Vanilla(Method):
    """The control of every alignment method: repaired alike, it measures alignment's share."""

    label = "VF"

    def fuse(self, models, graph, anchor, calibration, settings):
        weights = settings.weights(len(models))
        model = vanilla_fuse(models, weights)
        timings: dict[str, float] = {}
        info: dict = {}
        fits = repair_fused(  # the parents are their own aligned selves
            model, lambda: models, weights, graph, settings, calibration.repair_batches(), calibration.model_inputs,
            timings, info, calibration.cache, calibration.competence,
        )
        return FusionOutcome(model, [{} for _ in models], timings, fits, info, lambda: list(models))
