"""What the pipeline needs from a task: batches to train and calibrate on, a loss, metrics."""
from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def mixed_log_probs(log_probs: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """The log of the ensemble's probabilities from its members' (stacked on the first axis):
    their mean, or their ``weights``-weighted mean."""
    if weights is None:
        return torch.logsumexp(log_probs, dim=0) - math.log(len(log_probs))
    log_w = torch.tensor([math.log(w) if w > 0 else -math.inf for w in weights]) - math.log(sum(weights))
    return torch.logsumexp(log_probs + log_w.to(log_probs.device).view(-1, *[1] * (log_probs.dim() - 1)), dim=0)


class Task(Protocol):
    """A dataset with its splits plus the way a model is trained and scored on it.

    Batches are dicts: the model's keyword inputs (``pixel_values``; ``input_ids`` and
    ``attention_mask``) plus ``labels``. ``model_inputs(batch)`` drops what the model must not see.
    """

    name: str
    primary_metric: str  # key of evaluate()'s dict used to rank models ("accuracy", ...)
    higher_is_better: bool
    train_size: int  # examples in the training split

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless shuffled batches of the training split (reshuffled each epoch, seeded)."""

    def calibration_batches(self, samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """The first ``samples`` examples of a seeded permutation of the training split."""

    def model_inputs(self, batch: Batch) -> Batch:
        """The keyword arguments for ``model(**inputs)``."""

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (one row per scored item) and the class indices they are scored against."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Training loss of ``model`` on ``batch`` (mean over examples)."""

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Metrics of one model on a split ("val" or "test")."""

    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Metrics of the prediction ensemble (averaged, or ``weights``-weighted, probabilities)."""
