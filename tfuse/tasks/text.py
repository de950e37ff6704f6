"""What the text tasks (masked LM, sequence classification) share: their data, batches of token
sequences, the model's inputs and a cross-entropy loss."""
from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.data.text import Sequences, TextData
from tfuse.tasks.base import Batch


def batches(seq: Sequences, order: torch.Tensor, size: int) -> Iterator[Batch]:
    for start in range(0, len(order), size):
        yield seq.batch(order[start:start + size])


def model_inputs_of(batch: Batch, device: torch.device) -> Batch:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if k in batch}


class TextTask(ABC):
    """A task on ``TextData``; subclasses give ``predict`` and ``evaluate_ensemble``."""

    def __init__(self, data: TextData, eval_batch_size: int, device: str | torch.device):
        self.data = data
        self.tokenizer = data.tokenizer
        self.max_length = data.max_length
        self.eval_batch_size = eval_batch_size
        self.device = torch.device(device)

    @property
    def train_size(self) -> int:
        return len(self.data.train)

    @property
    def train_labels(self) -> torch.Tensor | None:
        """The training split's classes (None without labels): what a partition deals."""
        return self.data.train.labels

    @property
    def num_classes(self) -> int | None:
        return len(self.data.label_names) or None

    def restricted(self, index: torch.Tensor) -> "TextTask":
        """The same task trained (and calibrated) on the training sequences ``index`` only."""
        task = copy.copy(self)
        task.data = dataclasses.replace(self.data, train=self.data.train.subset(index))
        return task

    def scored(self, batch: Batch) -> Batch:
        """A calibration batch as it is scored (MLM masks it, with a fixed seed)."""
        return batch

    @torch.no_grad()
    def competence(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: the model's probability of the true class and its top probability, each
        averaged over the sequence's scored items (MLM: its masked positions)."""
        scored = self.scored(batch)
        logits, labels = self.predict(model, scored)
        probs = F.softmax(logits.float(), dim=-1)
        owner = self.owners(scored).to(probs.device)
        size = len(batch["input_ids"])
        count = torch.zeros(size, device=probs.device).index_add_(0, owner, torch.ones_like(owner, dtype=probs.dtype))
        mean = lambda v: torch.zeros(size, device=probs.device).index_add_(0, owner, v) / count.clamp_min(1)  # noqa: E731
        return mean(probs.gather(1, labels[:, None])[:, 0]), mean(probs.max(-1).values)

    def owners(self, batch: Batch) -> torch.Tensor:
        """The sequence each of ``predict``'s rows belongs to."""
        return torch.arange(len(batch["input_ids"]))

    def training_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        """What a training batch becomes before the model sees it (MLM masks it afresh)."""
        return batch

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self.data.train), generator=generator)
            for batch in batches(self.data.train, order, batch_size):
                yield self.training_batch(batch, generator)

    def calibration_batches(self, samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """Training sequences as they are (unmasked: what the encoder sees at its best), a seeded subset."""
        order = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(seed))[:samples]
        yield from batches(self.data.train, order, batch_size)

    def model_inputs(self, batch: Batch) -> Batch:
        return model_inputs_of(batch, self.device)

    @abstractmethod
    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (one row per scored item) and the class indices they are scored against."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(*self.predict(model, batch))

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        return self.evaluate_ensemble([model], split)

    @abstractmethod
    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Metrics of the prediction ensemble of ``models`` (``weights``: weighted) on a split."""
