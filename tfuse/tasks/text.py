"""What the text tasks (masked LM, sequence classification) share: their data, batches of token
sequences, the model's inputs and a cross-entropy loss."""
from __future__ import annotations

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
    def evaluate_ensemble(self, models: Sequence[nn.Module], split: str = "test") -> dict[str, float]:
        """Metrics of the prediction ensemble of ``models`` on a split."""
