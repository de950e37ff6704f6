"""Image classification task for Hugging Face style classifiers and timm models."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.data.images import ImageData, Split
from tfuse.errors import TfuseError
from tfuse.tasks.base import Batch, evaluating, mixed_log_probs

SPLITS = ("train", "val", "test")


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class logits of ``model`` on images ``x`` (given in the model's dtype), in float32 for the
    softmax and losses: HF models (``.logits``) and plain-tensor models (timm)."""
    first = next(model.parameters(), None)  # None while learned alignment holds stand-ins for them: x as given
    if first is not None:
        x = x.to(first.dtype)
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.name == "pixel_values" or p.kind is p.VAR_KEYWORD for p in parameters):
        out = model(pixel_values=x)
    else:
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out).float()


class ImageClassificationTask:
    """Classify images: batches carry ``pixel_values`` and ``labels``; scored by accuracy."""

    name = "image_classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, data: ImageData, eval_batch_size: int = 256, device: str | torch.device = "cpu"):
        self.data = data
        self.eval_batch_size = eval_batch_size
        self.device = torch.device(device)

    @property
    def train_size(self) -> int:
        return len(self.data.train[1])

    @property
    def train_labels(self) -> torch.Tensor:
        """The training split's classes (what a partition deals)."""
        return self.data.train[1]

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def restricted(self, index: torch.Tensor) -> "ImageClassificationTask":
        """The same task trained (and calibrated) on the training examples ``index`` only."""
        images, labels = self.data.train
        data = dataclasses.replace(self.data, train=(images[index], labels[index]))
        return type(self)(data, self.eval_batch_size, self.device)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless batches of the training split, reshuffled each epoch."""
        generator = torch.Generator().manual_seed(seed)
        n = len(self.data.train[1])
        while True:
            order = torch.randperm(n, generator=generator)
            yield from _batches(self.data.train, order, batch_size)

    def calibration_batches(self, samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """The first ``samples`` training images of a seeded permutation."""
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.data.train[1]), generator=generator)[:samples]
        yield from _batches(self.data.train, order, batch_size)

    def model_inputs(self, batch: Batch) -> Batch:
        """The model's keyword inputs, on the task's device."""
        return {"pixel_values": batch["pixel_values"].to(self.device)}

    def predict(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits of ``model`` on ``batch`` and the labels they are scored against."""
        return logits(model, self.model_inputs(batch)["pixel_values"]), batch["labels"].to(self.device)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of ``model`` on ``batch``."""
        return F.cross_entropy(*self.predict(model, batch))

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Accuracy and mean cross-entropy of one model on ``split``."""
        return self.evaluate_ensemble([model], split)

    def evaluate_ensemble(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Accuracy and NLL of the averaged (``weights``: weighted) softmax probabilities of
        ``models`` on ``split``."""
        return self.evaluate_with_predictions(models, split, weights)[0]

    def evaluate_with_predictions(
        self, models: Sequence[nn.Module], split: str = "test", weights: Sequence[float] | None = None,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """``evaluate_ensemble``'s metrics and the ensemble's predicted class of every example of
        ``split`` (one model: its own), from the same pass: per-class scores and paired tests are
        read off them."""
        predicted, labels, nll = self._score(models, self._split(split), weights)
        n = len(labels)
        return {"accuracy": int((predicted == labels).sum()) / n, "loss": nll / n}, predicted

    def labels(self, split: str = "test") -> torch.Tensor:
        """The classes of ``split``'s examples."""
        return self._split(split)[1].cpu()

    @torch.no_grad()
    def competence(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per example of ``batch``: the model's probability of the true label (None for an
        unlabelled batch), and its top probability."""
        probs = F.softmax(logits(model, self.model_inputs(batch)["pixel_values"]), dim=-1)
        if "labels" not in batch:
            return None, probs.max(-1).values
        labels = batch["labels"].to(probs.device)
        return probs.gather(1, labels[:, None])[:, 0], probs.max(-1).values

    @torch.no_grad()
    def _score(self, models: Sequence[nn.Module], data: Split, weights: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Predicted classes, labels and summed NLL of the ensemble's (weighted) mean probabilities."""
        predicted, nll = [], 0.0
        with evaluating(models):
            for batch in _batches(data, torch.arange(len(data[1])), self.eval_batch_size):
                x, y = batch["pixel_values"].to(self.device), batch["labels"].to(self.device)
                mean_log_probs = mixed_log_probs((F.log_softmax(logits(m, x), dim=-1) for m in models), weights)
                predicted.append(mean_log_probs.argmax(dim=-1).cpu())
                nll += float(F.nll_loss(mean_log_probs, y, reduction="sum"))
        return torch.cat(predicted), data[1].cpu(), nll

    def _split(self, split: str) -> Split:
        """The (images, labels) of a split by name."""
        if split not in SPLITS:
            raise TfuseError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")
        data = getattr(self.data, split)
        if len(data[1]) == 0:
            raise TfuseError(f"The {split} split is empty; raise data.val_fraction / data.test_fraction above 0.")
        return data


def _batches(data: Split, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
    """Batches of ``data`` in ``order`` (the last one may be smaller)."""
    images, labels = data
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield {"pixel_values": images[index], "labels": labels[index]}
