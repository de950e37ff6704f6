"""Distillation from the parents: a task whose training loss mixes cross-entropy with the
divergence from the parents' averaged predictions (``finetune.teacher=ensemble``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.errors import TfuseError
from tfuse.tasks.base import Batch

TEACHERS = ("none", "ensemble")


def distillation_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor, temperature: float, weight: float
) -> torch.Tensor:
    """``(1 - weight) CE(logits, targets) + weight T^2 KL(teacher || softmax(logits / T))``; with a
    one-hot teacher at T = 1 this is the cross-entropy itself."""
    ce = F.cross_entropy(logits, targets)
    student = F.log_softmax(logits / temperature, dim=-1)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student).sum(-1).mean()
    return (1 - weight) * ce + weight * temperature**2 * kl


class Distilled:
    """``task`` with its loss distilled from the averaged softened predictions of ``teachers``."""

    def __init__(self, task, teachers: Sequence[nn.Module], temperature: float, weight: float):
        if not temperature > 0 or not 0 <= weight <= 1:
            raise TfuseError(
                f"finetune.temperature={temperature} must be positive and finetune.kd_weight={weight} within [0, 1]"
            )
        if not hasattr(task, "predict"):
            raise TfuseError(f"finetune.teacher=ensemble: the {task.name} task has no predictions to distil")
        self.task, self.teachers, self.temperature, self.weight = task, list(teachers), temperature, weight

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, targets = self.task.predict(model, batch)
        with torch.no_grad():
            log_probs = []
            for teacher in self.teachers:
                mode = teacher.training
                teacher.eval()
                log_probs.append(F.log_softmax(self.task.predict(teacher, batch)[0].float() / self.temperature, dim=-1))
                teacher.train(mode)
            teacher_probs = (torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(log_probs))).exp()
        return distillation_loss(logits, targets, teacher_probs, self.temperature, self.weight)
