"""Reading a model's activations: ``call`` runs a model on a batch, ``kept_rows`` turns a token
mask into the flat rows kept as samples, and a ``Recorder`` keeps (or hands on) the kept rows of
each probe as it fires."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from tfuse.fusion.graph import Probe

Batch = dict[str, torch.Tensor]


class _Done(Exception):
    """Raised by a recorder once every probe of a run has fired."""


class Recorder:
    """Forward hooks that keep the selected tokens of every probe for the current batch, or hand
    them to a ``sink`` as each probe fires."""

    def __init__(self, model: nn.Module, probes: dict[str, Probe], names: Sequence[str]):
        self.model = model
        self.targets = {name: probes[name] for name in names}
        self.mask: Callable[[int, torch.device], torch.Tensor | None] | None = None
        self.sink: Callable[[str, torch.Tensor], None] | None = None
        self.acts: dict[str, torch.Tensor] = {}
        self.only: set[str] | None = None
        self.fired: set[str] = set()
        self.stop = False

    def _store(self, name: str, value: torch.Tensor | tuple) -> None:
        if self.mask is None or (self.only is not None and name not in self.only):  # another recorder's module, or a stand-in
            return
        x = value[0] if isinstance(value, (tuple, list)) else value
        x = self.targets[name].select(x)
        if x.dim() == 2:  # one vector per example (a pooled output): each example is one sample
            x = x.detach().float()
        else:
            rows = self.mask(x.shape[1], x.device)
            flat = x.detach().reshape(-1, x.shape[-1])
            x = (flat if rows is None else flat.index_select(0, rows)).float()
        if self.sink is None:
            self.acts[name] = x
        else:
            self.sink(name, x)
        self.fired.add(name)
        if self.stop and len(self.fired) == len(self.targets):
            raise _Done  # every probe seen: the rest of the model (a vocabulary's logits) is not computed

    @contextmanager
    def attached(self) -> Iterator["Recorder"]:
        modules = dict(self.model.named_modules())
        handles = []
        for name, probe in self.targets.items():
            module = modules[probe.module]
            if probe.where == "input":
                hook = lambda m, args, kwargs, n=name: self._store(n, args[0] if args else next(iter(kwargs.values())))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(lambda m, i, o, n=name: self._store(n, o)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def run(
        self,
        inputs: Batch,
        mask: Callable[[int, torch.device], torch.Tensor | None],
        sink: Callable[[str, torch.Tensor], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward ``inputs`` until every probe has fired; ``mask(tokens, device)`` gives the flat rows
        kept as samples (None: all). Returns the probes' samples, or passes each to ``sink`` as it
        fires (and keeps none)."""
        with self.recording(mask, sink) as acts:
            self.stop = True
            try:
                call(self.model, inputs)
            except _Done:
                pass
            finally:
                self.stop = False
        return acts

    @contextmanager
    def recording(
        self, mask: Callable[[int, torch.device], torch.Tensor | None], sink: Callable[[str, torch.Tensor], None] | None = None,
        only: set[str] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Record what runs inside the block (any part of the model: a streamed block), as ``run``
        does; ``only``: these probes alone (modules standing in for others fire hooks too)."""
        self.mask, self.sink, self.acts, self.only, self.fired = mask, sink, {}, only, set()
        try:
            yield self.acts
        finally:
            self.mask, self.sink, self.only = None, None, None


def call(model: nn.Module, inputs: Batch):
    """``model(**inputs)``, or positionally for models whose ``forward`` does not take those
    keywords (timm's ``forward(x)`` given ``pixel_values``), without a KV cache; floating inputs (pixels) in the model's
    dtype, which its first layer does not cast to."""
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:  # the engine's passes never decode: no KV cache
        inputs = {**inputs, "use_cache": False}
    takes = all(k in params for k in inputs) or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return model(**inputs) if takes else model(*inputs.values())


def kept_rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Flat indices of the kept (example, token) pairs; None when every token is kept."""
    return None if bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1).to(device)
