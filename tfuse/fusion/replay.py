"""The repair's replays: which linear layers it refits (grouped into stages, in call order), and
a model run batch by batch from a block whose input is cached, stopped as soon as what was asked
for has been seen, with modules that are already final standing in by their kept outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.recorder import call

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """Linear layers that read one tensor, in call order. ``segment``: 0 before the first block,
    ``k + 1`` inside block ``k``, ``len(blocks) + 1`` after the last one."""

    modules: tuple[str, ...]
    segment: int


class _Stop(Exception):
    """Raised by a hook once a replay has seen everything it was asked for."""


def _first(args: tuple, kwargs: dict):
    return args[0] if args else next(iter(kwargs.values()))


class _Transposed:
    """A linear module storing its weight as (in, out) (``FlowGraph.transposed``: GPT-2's
    ``Conv1D``) seen as an ``nn.Linear``: ``weight`` is a view of the stored one, so writes reach it."""

    def __init__(self, module: nn.Module):
        self.module = module

    in_features = property(lambda self: self.module.weight.shape[0])
    out_features = property(lambda self: self.module.weight.shape[1])
    weight = property(lambda self: self.module.weight.T)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def linear_layers(model: nn.Module, graph: FlowGraph) -> dict[str, nn.Linear]:
    """The model's linear modules whose weight the flow graph describes (``nn.Linear``, and the
    graph's ``transposed`` ones)."""
    described = graph.real_names()
    return {
        name: m if isinstance(m, nn.Linear) else _Transposed(m) for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) or name in graph.transposed) and f"{name}.weight" in described
    }


def find_stages(model: nn.Module, graph: FlowGraph, inputs: Batch) -> tuple[list[Stage], set[str]]:
    """The repairable layers in call order, grouped into stages, and the modules called more
    than once, read off one forward pass."""
    layers = linear_layers(model, graph)
    modules = dict(model.named_modules())
    segment = [0]
    calls: list[tuple[str, torch.Tensor, int]] = []
    count = dict.fromkeys(modules, 0)

    def enter(index: int) -> None:
        segment[0] = index + 1

    def record(name: str, x: torch.Tensor) -> None:
        if any(n == name for n, _, _ in calls):
            raise TfuseError(f"repair: layer '{name}' runs more than once per forward pass (shared weights): not supported")
        calls.append((name, x, segment[0]))

    handles = [modules[b].register_forward_pre_hook(lambda m, a, k=k: enter(k)) for k, b in enumerate(graph.blocks)]
    if graph.blocks:
        handles.append(modules[graph.blocks[-1]].register_forward_hook(lambda m, i, o: enter(len(graph.blocks))))
    handles += [
        m.register_forward_pre_hook(lambda m, a, k, n=name: record(n, _first(a, k)), with_kwargs=True)
        for name, m in layers.items()
    ]
    handles += [m.register_forward_pre_hook(lambda m, a, n=name: count.__setitem__(n, count[n] + 1))
                for name, m in modules.items()]
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return group_stages(calls), {n for n, c in count.items() if c > 1}


def group_stages(calls: list[tuple[str, torch.Tensor, int]]) -> list[Stage]:
    """Layers in call order (name, the tensor each read, its segment) grouped into stages:
    consecutive layers of one segment reading one tensor."""
    stages: list[list] = []
    for name, x, seg in calls:
        if stages and stages[-1][2] is x and stages[-1][1] == seg:
            stages[-1][0].append(name)
        else:
            stages.append([[name], seg, x])
    return [Stage(tuple(names), seg) for names, seg, _ in stages]


class Replay:
    """One model run batch by batch from block ``start``, whose input the caller keeps: the first
    block bypassed returns that input, the others pass it on (blocks before ``start`` are final)."""

    def __init__(self, model: nn.Module, blocks: Sequence[str]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.blocks = [self.modules[b] for b in blocks]
        self.block_names = list(blocks)
        self.start = 0

    def run(
        self, inputs: Batch, state: torch.Tensor | None = None, inputs_of: Sequence[str] = (),
        outputs_of: Sequence[str] = (), block_output: bool = False, reuse: Mapping[str, object] = {},
    ) -> dict:
        """Forward ``inputs`` from block ``start`` (its input ``state``; None when ``start`` is 0)
        until the inputs of ``inputs_of``, the outputs of ``outputs_of`` and (``block_output``) the
        output of block ``start`` have been seen; returns them by ``("in", name)``, ``("out",
        name)`` and ``"block"``. The modules of ``reuse`` return the given outputs, uncomputed."""
        seen: dict = {}
        want = len(inputs_of) + len(outputs_of) + int(block_output)

        def done(key, value) -> None:
            seen[key] = value
            if len(seen) == want:
                raise _Stop

        handles = [
            self.modules[n].register_forward_pre_hook(lambda m, a, k, n=n: done(("in", n), _first(a, k)), with_kwargs=True)
            for n in inputs_of
        ]
        handles += [self.modules[n].register_forward_hook(lambda m, i, o, n=n: done(("out", n), o)) for n in outputs_of]
        if block_output:
            handles.append(self.blocks[self.start].register_forward_hook(lambda m, i, o: done("block", self._tensor(o))))
        bypassed = self.blocks[: self.start]
        if bypassed:
            bypassed[0].forward = lambda *a, **k: state
            for block in bypassed[1:]:
                block.forward = lambda *a, **k: _first(a, k)
        stand_ins = [self.modules[n] for n in reuse]
        for module, out in zip(stand_ins, reuse.values()):
            module.forward = lambda *a, out=out, **k: out
        try:
            call(self.model, inputs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
            for module in (*bypassed, *stand_ins):
                vars(module).pop("forward", None)
        return seen

    def _tensor(self, out) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TfuseError(
                f"repair: block '{self.block_names[self.start]}' returns a {type(out).__name__}, not a tensor: "
                "the flow graph's blocks must each map a tensor to a tensor"
            )
        return out
