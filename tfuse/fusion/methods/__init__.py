"""Fusion methods, found by name (``fusion.method``): one module each.

A method is a class registered in ``METHODS``: its settings dataclass (``FusionSettings`` or a
subclass adding its knobs), whether it fuses parents of different widths, and
``fuse(models, graph, anchor, calibration, settings) -> FusionOutcome``. Adding one is a module
here with one ``@METHODS.register("name")`` class (every module here is imported) and its config
file under ``configs/fusion/``.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import nn

from tfuse.fusion.cache import StatisticsCache
from tfuse.fusion.engine import FusionOutcome
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.learned import Objective
from tfuse.fusion.registry import Registry
from tfuse.fusion.settings import FusionSettings

Batch = dict[str, torch.Tensor]


@dataclass
class Calibration:
    """The data a method may read: a fresh pass over the statistics' batches, the repair's
    batches (default: the same), how a batch becomes model inputs, the batches in a pass, the
    statistics cache, how a model scores each calibration example (per-sample repair targets),
    and the task's objective (learned alignment)."""

    batches: Callable[[], Iterable[Batch]] | None
    model_inputs: Callable[[Batch], Batch]
    total: int | None = None
    repair: Callable[[], Iterable[Batch]] | None = None
    cache: StatisticsCache | None = None  # where statistics of identical passes are kept
    competence: Callable[[nn.Module, Batch], tuple[torch.Tensor | None, torch.Tensor]] | None = None  # per example: p(label) (None unlabelled), top p
    objective: Objective | None = None  # the task's loss, training and validation data (learned alignment)

    def repair_batches(self) -> Callable[[], Iterable[Batch]] | None:
        return self.repair or self.batches


class Method(ABC):
    """A way to fuse parents into the anchor's architecture."""

    name: str  # set by the registry
    label: ClassVar[str]  # how tables show its model
    settings_class: ClassVar[type[FusionSettings]] = FusionSettings
    allows_widths: ClassVar[bool] = False  # parents of different hidden widths

    @abstractmethod
    def fuse(
        self, models: Sequence[nn.Module], graph: FlowGraph, anchor: int, calibration: Calibration,
        settings: FusionSettings,
    ) -> FusionOutcome:
        """The fused model (in the anchor's architecture), its maps, timings and repair fits."""


METHODS: Registry[Method] = Registry("method")


def settings_from_config(data: dict[str, Any]) -> FusionSettings:
    """The settings of the configured method (``fusion.method``); knobs of the other methods,
    which share the config group, are ignored, and keys no method knows are refused."""
    method = METHODS[data.get("method", FusionSettings.method)]
    others = set().union(*(METHODS[name].settings_class.known() for name in METHODS))
    return method.settings_class.from_config(data, ignore=others)


def label_of(name: str) -> str:
    """How a results key is shown: a method's label (VF, OT, ...), else ``parent 0``, ..."""
    return METHODS[name].label if name in METHODS else name.replace("_", " ")


for _module in pkgutil.iter_modules(__path__):  # every module here registers its method on import
    importlib.import_module(f"{__name__}.{_module.name}")
