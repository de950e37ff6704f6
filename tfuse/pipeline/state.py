"""What each stage of a fusion run hands to the next."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from tfuse.fusion.engine import FusionOutcome
from tfuse.fusion.settings import FusionSettings
from tfuse.tasks.base import Task


@dataclass
class Setup:
    """Stage 1: the resolved settings, the task and the parents."""

    cfg: DictConfig
    settings: FusionSettings
    device: str
    task: Task
    parents: list
    models: list[torch.nn.Module]
    widths_differ: bool
    partition: dict | None = None  # results.json ``partition``: the shards of recipe parents
    lazy: list | None = None  # fusion.stream: the parents as ``LazyModel`` skeletons, read whole when called

    def whole(self, i: int) -> torch.nn.Module:
        """Parent ``i`` with every weight in memory (a streamed parent is read now)."""
        if self.lazy is not None:
            self.lazy[i].load(self.lazy[i].names())
            self.lazy[i].load_buffers()
        return self.models[i]

    def release(self) -> None:
        """Streamed parents back to skeletons (a no-op for parents held whole)."""
        for parent in self.lazy or []:
            parent.release_all()


@dataclass
class Baseline:
    """Stage 2: the parents and their ensemble scored, the anchor chosen and the weights resolved."""

    one_shot: dict[str, dict]
    one_shot_val: dict[str, dict]
    anchor: int
    anchor_val_scores: list[float] | None
    weights: list[float]
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # each model's test classes, where the task gives them


@dataclass
class Fused:
    """Stage 3: every method's fused model (the vanilla control where widths agree), scored."""

    models: dict[str, torch.nn.Module]
    outcomes: dict[str, FusionOutcome]
    one_shot: dict[str, dict]  # test metrics of each fused model
    one_shot_val: dict[str, dict]
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # each one's test classes, where the task gives them


@dataclass
class Tuned:
    """Stage 4: the fused models and the controls finetuned alike, with their curves."""

    finetuned: dict[str, dict] = field(default_factory=dict)
    finetuned_val: dict[str, dict] = field(default_factory=dict)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)  # the fused ones
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # every model's test classes, where the task gives them
    curves: dict[str, list] = field(default_factory=dict)
    continuations: dict[str, str] = field(default_factory=dict)  # a causal LM's greedy text, per model
