"""What the text tasks (causal and masked LM, sequence classification) share: their data, batches
of token sequences, the model's inputs and a cross-entropy loss; and what the language models
share: scoring token by token, a chunk of positions at a time."""
from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.data.text import Sequences, TextData
from tfuse.errors import TfuseError
from tfuse.tasks.base import Batch, Scoring, evaluating


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


def head_inputs(model: nn.Module, inputs: Batch) -> torch.Tensor:
    """What ``model``'s output embeddings read, its last hidden states ``(sequences, positions,
    width)``. The model's own forward runs (what runs on ``model(**inputs)`` runs: a streamed parent
    is read whole), but its head is handed no positions: the vocabulary-wide projection is left to
    the caller, a chunk of positions at a time."""
    seen = []

    def capture(module: nn.Module, args: tuple) -> tuple:
        seen.append(args[0])
        return (args[0][..., :0, :],)

    head = model.get_output_embeddings()
    if head is None:
        raise TfuseError(f"{type(model).__name__} has no language-model head, so a language-modelling task cannot score "
                         "it; fuse a sequence classifier on a classification task (data=plays "
                         "data.kind=text_classification: a passage's genre, 3 labels)")
    handle = head.register_forward_pre_hook(capture)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise TfuseError(f"{type(model).__name__}: its output embeddings ran {len(seen)} times in one forward pass; "
                         "tfuse scores language models whose logits are their output embeddings of the last hidden states")
    return seen[0]


class TokenTask(TextTask):
    """A language model's task, scored token by token (causal LM: every next token; MLM: the masked
    ones): full-vocabulary log-probabilities in float32 for ``scoring.chunk_tokens`` positions at a
    time, the first ``scoring.max_tokens`` scored tokens of a split (default all)."""

    accuracy_name = "accuracy"  # the key of the top-1 accuracy in evaluate()'s dict

    def __init__(self, data: TextData, eval_batch_size: int, device: str | torch.device, scoring: Scoring = Scoring()):
        super().__init__(data, eval_batch_size, device)
        self.scoring = scoring

    @abstractmethod
    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Which positions' hidden states are scored (a ``(sequences, positions)`` mask), and the
        tokens they must predict, in the mask's row-major order."""

    def capped(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
        """Each batch with its scored positions and their tokens, up to ``scoring.max_tokens`` in all:
        the first ones (the batch that reaches the cap is cut after the last sequence it needs, the
        later ones are never read)."""
        left = self.scoring.max_tokens
        for batch in batches:
            keep, target = self.targets(batch)
            if left is not None and len(target) >= left:
                keep = keep & (keep.flatten().cumsum(0).view_as(keep) <= left)
                rows = int(keep.any(1).nonzero().max()) + 1
                yield {k: v[:rows] for k, v in batch.items()}, keep[:rows], target[:left]
                return
            left = None if left is None else left - len(target)
            yield batch, keep, target

    @torch.no_grad()
    def token_metrics(
        self, models: Sequence[nn.Module], batches: Iterable[Batch], mix: Callable[[Iterator[torch.Tensor]], torch.Tensor],
    ) -> dict[str, float]:
        """Loss (mean NLL), perplexity and top-1 accuracy of the scored tokens of ``batches``. Per
        chunk of positions, ``mix`` turns the members' float32 logits (given one at a time) into the
        scored log-probabilities: held at once are the members' last hidden states at the scored
        positions of one batch, and a chunk's logits."""
        nll, correct, count = 0.0, 0, 0
        size = self.scoring.chunk_tokens
        with evaluating(models):
            for batch, keep, target in self.capped(batches):
                inputs, keep, target = self.model_inputs(batch), keep.to(self.device), target.to(self.device)
                hidden = [head_inputs(m, inputs)[keep] for m in models]
                for start in range(0, len(target), size):
                    part = slice(start, start + size)
                    log_probs = mix(m.get_output_embeddings()(h[part]).float() for m, h in zip(models, hidden))
                    nll += float(F.nll_loss(log_probs, target[part], reduction="sum"))
                    correct += int((log_probs.argmax(-1) == target[part]).sum())
                count += len(target)
        loss = nll / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), self.accuracy_name: correct / max(count, 1)}
