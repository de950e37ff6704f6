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
    evaluate: Callable[[], float] | None = None,
    eval_every: int = 0,
    start: float | None = None,
) -> dict:
    """Train ``model`` on ``task`` for ``steps`` steps; returns steps, final_loss, seconds and, with
    ``evaluate`` and ``eval_every``, ``curve``: ``[step, evaluate()]`` before the first step
    (``start`` instead when the caller has that score already) and every ``eval_every`` steps
    before the last (evaluation time is not counted in ``seconds``). The trained model is the
    caller's to score: it ends the curve with that score.

    ``warmup`` is a fraction of ``steps`` when below 1, else a number of steps. ``final_loss`` is
    the mean loss over the last 10% of steps (None when ``steps`` is 0). The gradients are freed
    when training ends, and the optimizer's state with it.
    """
    factor = lr_factor(schedule, steps, warmup)
    if steps == 0:
        return {"steps": 0, "final_loss": None, "seconds": 0.0}
    curve: list[list[float]] = []

    def probe(step: int) -> float:
        """Evaluate (timed apart) at ``step``; returns the seconds it took."""
        if evaluate is None or eval_every <= 0 or step % eval_every or step == steps:
            return 0.0
        if step == 0 and start is not None:
            curve.append([0, start])
            return 0.0
        began = time.perf_counter()
        curve.append([step, evaluate()])
        model.train()
        return time.perf_counter() - began

    torch.manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    was_training = model.training
    model.train()
    began = time.perf_counter()
    losses, evaluating = _loop(model, task, optimizer, scheduler, steps, batch_size, seed, grad_clip, description, probe)
    optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    tail = losses[-max(1, math.ceil(0.1 * steps)) :]
    out = {"steps": steps, "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - began - evaluating}
    if curve:
        out["curve"] = curve
    return out


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


def _loop(model, task, optimizer, scheduler, steps, batch_size, seed, grad_clip, description, probe) -> tuple[list[float], float]:
    """The optimisation loop under a progress bar; returns the loss of every step and the seconds
    spent in ``probe(step)`` (called before step 1 and after every step)."""
    losses: list[float] = []
    running = None
    batches = task.train_batches(batch_size, seed)
    evaluating = probe(0)
    with make_progress() as progress:
        bar = progress.add_task(description, total=steps, info="loss -")
        for step in range(1, steps + 1):
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
            evaluating += probe(step)
    return losses, evaluating
