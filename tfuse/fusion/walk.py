"""A model walked over calibration batches part by part (``stream.py``): its hidden states at the
current block boundary in a ``BoundaryCache`` and the arguments the model gives each block."""
from __future__ import annotations

from typing import Sequence

import torch

from tfuse.checkpoint import LazyModel
from tfuse.errors import TfuseError
from tfuse.fusion.boundary import BoundaryCache
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.recorder import call
from tfuse.fusion.replay import Replay

Batch = dict[str, torch.Tensor]
OUTER = 0  # the parameters outside every block: read for the part before the blocks and the part after


class _Stop(Exception):
    """Raised once a run has reached what it was asked for."""


def part_of(name: str, blocks: Sequence[str]) -> int:
    """``k + 1`` for a parameter or module inside block ``k``, ``OUTER`` otherwise."""
    for k, block in enumerate(blocks):
        if name == block or name.startswith(block + "."):
            return k + 1
    return OUTER


class Walk:
    """One model walked over the calibration batches: its hidden states at the current block
    boundary (``cache``, keyed ``(index, batch)``) and the arguments each block gets per batch."""

    def __init__(self, lazy: LazyModel, graph: FlowGraph, cache: BoundaryCache, index: int | str):
        self.lazy, self.graph, self.cache, self.index = lazy, graph, cache, index
        self.model = lazy.model
        self.modules = dict(self.model.named_modules())
        self.blocks = [self.modules[b] for b in graph.blocks]
        self.arguments: list[list[tuple[tuple, dict]]] = []  # per batch, per block: (args after the first, kwargs)

    def before(self, b: int, inputs: Batch) -> None:
        """The part before the first block on batch ``b``: block 0's input cached, every block's
        other arguments recorded (the blocks themselves stand in and are not run)."""
        got: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def stand_in(k: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop(next(iter(kwargs)))
                got.append((args[1:], kwargs))
                if k == 0:
                    first.append(hidden)
                if k == len(self.blocks) - 1:
                    raise _Stop
                return hidden
            return forward

        for k, block in enumerate(self.blocks):
            block.forward = stand_in(k)
        try:
            call(self.model, inputs)
            raise TfuseError(f"streamed fusion: the forward pass never reached block '{self.graph.blocks[-1]}'")
        except _Stop:
            pass
        finally:
            for block in self.blocks:
                vars(block).pop("forward", None)
        self.cache.put((self.index, b), first[0])
        self.arguments[b:b + 1] = [got]

    def block(self, k: int, b: int) -> None:
        """Block ``k`` on batch ``b``'s cached input; its output becomes the cached state."""
        args, kwargs = self.arguments[b][k]
        out = self.blocks[k](self.cache.get((self.index, b)), *args, **kwargs)
        self._check(k, out)
        self.cache.put((self.index, b), out)

    def input_of(self, k: int, b: int, module: str) -> torch.Tensor:
        """The input of ``module`` (inside block ``k``) on batch ``b``, from the block's cached input;
        the block stops there."""
        args, kwargs = self.arguments[b][k]
        return self._until(module, lambda: self.blocks[k](self.cache.get((self.index, b)), *args, **kwargs))

    def input_after(self, b: int, inputs: Batch, module: str) -> torch.Tensor:
        """The input of ``module`` (after the last block) on batch ``b``, from the cached state."""
        return self._until(module, lambda: self.after(b, inputs, {}))

    def _until(self, module: str, run) -> torch.Tensor:
        seen = []

        def stop(m, args, kwargs):
            seen.append(args[0] if args else next(iter(kwargs.values())))
            raise _Stop

        handle = self.modules[module].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            run()
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise TfuseError(f"streamed repair: layer '{module}' did not run")
        return seen[0]

    def _check(self, k: int, out) -> None:
        if not isinstance(out, torch.Tensor):
            raise TfuseError(f"streamed fusion: block '{self.graph.blocks[k]}' returns a {type(out).__name__}, not a "
                             "tensor: the flow graph's blocks must each map a tensor to a tensor")

    def after(self, b: int, inputs: Batch, modules: dict[str, str]) -> None:
        """The part after the last block on batch ``b``, from the cached state, until the
        ``modules`` (name -> ``input`` or ``output``) have run."""
        replay = Replay(self.model, self.graph.blocks)
        replay.start = len(self.blocks)
        replay.run(inputs, self.cache.get((self.index, b)),
                   inputs_of=[m for m, w in modules.items() if w == "input"],
                   outputs_of=[m for m, w in modules.items() if w == "output"])


