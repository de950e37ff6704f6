"""What every stage shares: the device, the seeds and the clock."""
from __future__ import annotations

import random
import re
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from tfuse.errors import TfuseError


def resolve_device(name: str) -> str:
    """The device every stage runs on (parents, task batches, fusion, finetuning): ``auto`` is
    cuda when a GPU is visible; a named GPU must exist."""
    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise TfuseError(f"device={name!r} is not known; allowed: auto, cpu, cuda, cuda:N")
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise TfuseError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if name.startswith("cuda:") and int(name[5:]) >= count:
        raise TfuseError(f"device={name} but {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Stopwatch:
    """Seconds spent in each named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
