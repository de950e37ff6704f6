"""Train a model on a task: AdamW, linear warmup, cosine or constant schedule, rich progress bar."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.progress import make_progress
from tfuse.tasks.base import Task

SCHEDULES = ("cosine", "constant")


def epochs_to_steps(epochs: float, n_train: int, batch_size: int) -> int:
    """Optimiser steps for ``epochs`` passes over ``n_train`` examples (last batch may be partial)."""
    return math.ceil(epochs * math.ceil(n_train / batch_size))


def train(
    model: nn.Module,
    task: Task,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: float = 0.1,
    schedule: str = "cosine",
    weight_decay: float = 0.05,
    grad_clip: float = 1.0,
    device: str | torch.device = "cpu",
    description: str = "training",
) -> dict:
    """Train ``model`` on ``task`` for ``steps`` steps; returns steps, final_loss and seconds.

    ``warmup`` is a fraction of ``steps`` when below 1, else a number of steps. ``final_loss`` is
    the mean loss over the last 10% of steps (None when ``steps`` is 0).
    """
    factor = lr_factor(schedule, steps, warmup)
    if steps == 0:
        return {"steps": 0, "final_loss": None, "seconds": 0.0}
    torch.manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    losses = _loop(model, task, optimizer, scheduler, steps, batch_size, seed, grad_clip, description)
    model.train(was_training)
    tail = losses[-max(1, math.ceil(0.1 * steps)) :]
    return {"steps": steps, "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


def lr_factor(schedule: str, steps: int, warmup: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step: linear warmup, then cosine to 0 or constant."""
    if schedule not in SCHEDULES:
        raise TfuseError(f"training.schedule={schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}.")
    warmup_steps = round(warmup * steps) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and other vectors are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _loop(model, task, optimizer, scheduler, steps, batch_size, seed, grad_clip, description) -> list[float]:
    """The optimisation loop under a progress bar; returns the loss of every step."""
    losses: list[float] = []
    running = None
    batches = task.train_batches(batch_size, seed)
    with make_progress() as progress:
        bar = progress.add_task(description, total=steps, info="loss -")
        for _ in range(steps):
            loss = task.loss(model, next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
            progress.update(bar, advance=1, info=f"loss {running:.4f}")
    return losses
