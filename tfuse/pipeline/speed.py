"""What a model costs at inference: its parameters and the wall-clock time of a forward pass per
1,000 tokens (text) or examples (images), so that a fused model, a wider partial fusion and the
ensemble (every member run) can be placed on one curve of quality against cost."""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn

from tfuse.tasks.base import evaluating

REPEATS = 5  # timed passes of each entry after a warm-up; the median is kept (machines are noisy)


def inference_cost(task, models: dict[str, Sequence[nn.Module]], batch_size: int, seed: int) -> dict:
    """Per named entry (one model, or an ensemble's members, each run): parameters and the median
    milliseconds of its forward passes (``task.predict``, else the model on the batch's inputs)
    over one training batch (labelled, as ``predict`` needs), per 1,000 tokens or examples."""
    batch = next(iter(task.train_batches(batch_size, seed)))
    inputs = task.model_inputs(batch)
    if "input_ids" in inputs:
        mask = inputs.get("attention_mask")
        unit, count = "tokens", int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    else:
        unit, count = "examples", next(iter(inputs.values())).shape[0]
    forward = task.predict if hasattr(task, "predict") else lambda m, b: m(**task.model_inputs(b))  # bare encoders
    everyone = list({id(m): m for members in models.values() for m in members}.values())
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad(), evaluating(everyone):
        for m in everyone:  # warm-up: first calls pay for allocation and kernel choice
            forward(m, batch)
        for _ in range(REPEATS):  # round-robin: a burst of noise hits every entry alike
            for name, members in models.items():
                seconds[name].append(_seconds(forward, members, batch))
    return {name: {"parameters": sum(p.numel() for m in members for p in m.parameters()),
                   f"ms_per_1k_{unit}": 1000 * 1000 * statistics.median(seconds[name]) / count}
            for name, members in models.items()}


def _seconds(forward, members: Sequence[nn.Module], batch: dict) -> float:
    """Wall-clock seconds of one forward pass of every member (device work included)."""
    device = next(members[0].parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for m in members:
        forward(m, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
