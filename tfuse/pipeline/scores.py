"""results.json's per-class and by-shard scores, and the test predictions behind them."""
from __future__ import annotations

import torch

from tfuse.partition import own_classes
from tfuse.pipeline.state import Baseline, Fused, Setup, Tuned


def class_scores(setup: Setup, baseline: Baseline, fused: Fused, tuned: Tuned) -> dict:
    """Every model's test predictions (``test_predictions``, ``test_predictions_finetuned``, with
    ``test_labels``: paired tests), its accuracy per class (``per_class``, ``per_class_finetuned``)
    and, under a non-IID partition, on each parent's own classes and on the rest (``by_shard``,
    ``by_shard_finetuned``)."""
    task, models = setup.task, setup.models
    weighted = {"ensemble": None, "ensemble_weighted": baseline.weights}
    predicted = {}
    for name in baseline.one_shot:
        if name in weighted:
            predicted[name], labels = task.predictions(models, weights=weighted[name])
        else:
            predicted[name], labels = task.predictions([models[int(name.split("_")[1])]])
    for name, model in fused.models.items():
        predicted[name], labels = task.predictions([model])
    tuned_predicted = tuned.predictions
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
