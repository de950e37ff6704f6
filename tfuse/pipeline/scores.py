"""results.json's per-class and by-shard scores, and the test predictions behind them."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tfuse.partition import own_classes
from tfuse.pipeline.state import Baseline, Fused, Setup, Tuned
from tfuse.tasks.base import Task


def tested(task: Task, models: Sequence[nn.Module], name: str, predicted: dict, weights: Sequence[float] | None = None) -> dict:
    """The test metrics of ``models`` (one, or their ensemble); where the task predicts classes,
    every example's is kept in ``predicted[name]``, from the same pass."""
    if not hasattr(task, "evaluate_with_predictions"):
        return task.evaluate_ensemble(models, weights=weights)
    metrics, predicted[name] = task.evaluate_with_predictions(models, weights=weights)
    return metrics


def class_scores(setup: Setup, baseline: Baseline, fused: Fused, tuned: Tuned) -> dict:
    """Every model's test predictions (``test_predictions``, ``test_predictions_finetuned``, with
    ``test_labels``: paired tests), its accuracy per class (``per_class``, ``per_class_finetuned``)
    and, under a non-IID partition, on each parent's own classes and on the rest (``by_shard``,
    ``by_shard_finetuned``); the predictions are those kept when the models were scored."""
    task, models = setup.task, setup.models
    predicted, tuned_predicted, labels = {**baseline.predictions, **fused.predictions}, tuned.predictions, task.labels()
    n_classes = int(labels.max()) + 1 if getattr(task, "num_classes", None) is None else task.num_classes

    def per_class(pred: torch.Tensor) -> list[float | None]:
        return [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else None for c in range(n_classes)]

    out = {
        "test_labels": labels.tolist(),
        "test_predictions": {name: p.tolist() for name, p in predicted.items()},
        "test_predictions_finetuned": {name: p.tolist() for name, p in tuned_predicted.items()},
        "per_class": {name: per_class(p) for name, p in predicted.items()},
        "per_class_finetuned": {name: per_class(p) for name, p in tuned_predicted.items()},
    }
    owned = own_classes(setup.partition, len(models)) if setup.partition else None
    if owned:
        def share(pred: torch.Tensor, classes: list[int]) -> float | None:
            keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
            return float((pred[keep] == labels[keep]).float().mean()) if classes and keep.any() else None

        rest = [[c for c in range(n_classes) if c not in own] for own in owned]
        for key, models_predicted in (("by_shard", predicted), ("by_shard_finetuned", tuned_predicted)):
            out[key] = {
                name: [{"own": share(p, own), "rest": share(p, other)} for own, other in zip(owned, rest)]
                for name, p in models_predicted.items()
            }
        out["own_classes"] = owned
    return out
