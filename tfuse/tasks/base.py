"""What the pipeline needs from a task: batches to train and calibrate on, a loss, metrics."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Scoring:
    """How a language model is scored (config.yaml's ``eval``): the full-vocabulary log-probabilities
    of ``chunk_tokens`` positions at a time, and only the first ``max_tokens`` scored tokens of a
    split (None: all)."""

    chunk_tokens: int = 2048
    max_tokens: int | None = None

    @classmethod
    def from_config(cls, cfg) -> "Scoring":
        """The ``eval`` block's values (None: the defaults), each checked."""
        cfg = {} if cfg is None else cfg
        chunk, limit = cfg.get("chunk_tokens", cls.chunk_tokens), cfg.get("max_tokens", cls.max_tokens)
        if not _positive(chunk):
            raise TfuseError(f"eval.chunk_tokens={chunk!r} must be a positive number of positions")
        if limit is not None and not _positive(limit):
            raise TfuseError(f"eval.max_tokens={limit!r} must be a positive number of tokens or null (all)")
        return cls(chunk, limit)


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def mixed_log_probs(log_probs: Iterable[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """The log of the ensemble's probabilities from its members' log-probabilities: their mean, or
    their ``weights``-weighted mean. Folded in one member at a time, so that only the running
    mixture and one member's are held."""
    log_w = None if weights is None else (
        torch.tensor([math.log(w) if w > 0 else -math.inf for w in weights]) - math.log(sum(weights)))
    mixed, count = None, 0
    for i, member in enumerate(log_probs):
        if log_w is not None:
            member = member + log_w[i].to(member.device)
        mixed = member if mixed is None else torch.logsumexp(torch.stack([mixed, member]), dim=0)
        count += 1
    return mixed if log_w is not None else mixed - math.log(count)


@contextmanager
def evaluating(models: Sequence[nn.Module]) -> Iterator[None]:
    """``models`` in eval mode for the duration, then in the mode each had."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


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
