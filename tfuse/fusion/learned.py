"""Learned alignment (``fusion.learn_steps``): the maps alignment found, refined on the task loss
of the interpolated model (generalized linear mode connectivity, 2025).

For each moved parent, the model ``(1 - lam) anchor + lam aligned(parent)``, lam drawn from
[0.4, 0.6] at every step, is trained through its maps only:

* the stream's rotation (``fusion.maps=orthogonal``) as ``R0 exp(S)``, ``S = A - A^T`` from
  A = 0 (a centred stream: ``S`` projected off the all-ones direction, which every step then
  keeps fixed, as LayerNorm needs);
* every unsigned hard permutation of a space outside attention (the stream under permutation
  maps, the MLP units) by a straight-through estimate: forward, the assignment that maximises
  learned scores (Hungarian; the scores start at the found permutation, by a margin that puts
  most of each row's Sinkhorn mass on it); backward, the gradient of their Sinkhorn relaxation.
  Signed maps keep their maps (a new pairing would need its own sign).

Heads keep their maps. Every ``learn_eval`` steps and at the end, the midpoint's (lam 0.5)
validation loss is measured with the hard maps; the best maps, the starting ones included, are
kept: learning never raises the validation loss it starts from.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from tfuse.checkpoint import aliases_of
from tfuse.errors import TfuseError
from tfuse.fusion.apply import State, align, average
from tfuse.fusion.compact import CompactMaps, HardMap
from tfuse.fusion.engine import parameters, timed, with_state
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.rules import OTRule, Plan

Batch = dict[str, torch.Tensor]
MARGIN = 5.0  # the starting permutation's score is log(n) + MARGIN: its relaxation starts with ~99% of each row
SINKHORN_STEPS = 20


@dataclass
class LearnSettings:
    """``fusion.learn_*``, for the methods whose maps learning refines (OT, weight matching)."""

    learn_steps: int = 0  # learned alignment: steps training the maps on the interpolated model's loss
    learn_lr: float = 0.01  # Adam, on the permutations' scores and the rotations' generators
    learn_eval: int = 50  # validation of the midpoint every this many steps (the best maps are kept)

    def check_learning(self, stream: bool) -> None:
        """The knobs in range; learning reads whole models (not ``fusion.stream``)."""
        if self.learn_steps < 0 or not self.learn_lr > 0:
            raise TfuseError(f"fusion.learn_steps={self.learn_steps} must be >= 0 and fusion.learn_lr={self.learn_lr} "
                             "positive")
        if self.learn_steps and (stream or self.learn_eval < 1):
            raise TfuseError(f"fusion.learn_steps={self.learn_steps} refines the maps of whole models: it needs "
                             "fusion.learn_eval >= 1, without fusion.stream")


@dataclass
class Objective:
    """What learning reads from the task: endless training batches, a model's mean loss on one,
    and a model's validation loss."""

    batches: Callable[[], Iterator[Batch]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    validate: Callable[[nn.Module], float]


@contextmanager
def _holding(model: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` itself with ``params`` standing in for its parameters (and their ties) while the
    block runs, so that the task's loss code sees the model it expects and gradients reach the maps."""
    modules = dict(model.named_modules())
    swapped = []
    for name, names in aliases_of(model).items():
        if name not in params:
            continue
        for alias in names:
            owner, _, attr = alias.rpartition(".")
            module = modules[owner]
            swapped.append((module, attr, module._parameters.pop(attr)))
            setattr(module, attr, params[name])
    try:
        yield model
    finally:
        for module, attr, original in swapped:
            delattr(module, attr)
            module._parameters[attr] = original


class _Maps:
    """A parent's maps, the learnable ones as parameters (keyed by space)."""

    def __init__(self, raw: dict, rotations: set[str], permutations: set[str], centred: bool):
        self.raw = raw
        self.generators: dict[str, nn.Parameter] = {}
        self.scores: dict[str, nn.Parameter] = {}
        self.bases: dict[str, torch.Tensor] = {}
        self.centring: dict[str, torch.Tensor] = {}
        for space in rotations:
            t = raw[space]
            n = t.shape[0]
            self.bases[space] = t.float() * n
            self.generators[space] = nn.Parameter(torch.zeros_like(self.bases[space]))
            if centred:  # I - 11^T / n
                self.centring[space] = torch.eye(n, device=t.device) - torch.full((n, n), 1.0 / n, device=t.device)
        for space in permutations:
            m: HardMap = raw[space]
            n = m.shape[1]
            start = torch.zeros(m.shape, device=m.source.device)
            start[m.source, torch.arange(n, device=m.source.device)] = math.log(n) + MARGIN
            self.scores[space] = nn.Parameter(start)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.generators.values(), *self.scores.values()]

    def current(self, hard: bool = False) -> dict:
        """The maps (dense where learned): straight-through permutations unless ``hard``."""
        out = dict(self.raw)
        for space, g in self.generators.items():
            skew = g - g.T
            if space in self.centring:
                skew = self.centring[space] @ skew @ self.centring[space]
            out[space] = self.bases[space] @ torch.linalg.matrix_exp(skew) / g.shape[0]
        for space, s in self.scores.items():
            rows, cols = linear_sum_assignment(s.detach().cpu().numpy(), maximize=True)
            p = torch.zeros_like(s)
            p[torch.as_tensor(rows, device=s.device), torch.as_tensor(cols, device=s.device)] = 1.0
            if not hard:
                soft = _sinkhorn(s)
                p = p + soft - soft.detach()
            out[space] = p / s.shape[0]
        return out


def _sinkhorn(scores: torch.Tensor) -> torch.Tensor:
    """The doubly stochastic relaxation of an assignment's scores (log domain)."""
    log = scores
    for _ in range(SINKHORN_STEPS):
        log = log - log.logsumexp(1, keepdim=True)
        log = log - log.logsumexp(0, keepdim=True)
    return log.exp()


def learnable(plan: Plan, graph: FlowGraph, maps: CompactMaps, orthogonal: bool) -> tuple[set[str], set[str]]:
    """(rotations, permutations) to learn: the stream's rotation (``orthogonal``), every hard map
    of a space solved alone (no head structure). Soft maps (Sinkhorn's) are kept as found."""
    alone = {r.name for r in plan.rules if isinstance(r, OTRule)}
    rotations = {graph.stream} & alone & set(maps.raw) if orthogonal else set()
    permutations = {s for s in alone - rotations if isinstance(maps.raw.get(s), HardMap) and maps.raw[s].sign is None}
    return rotations, permutations


def learn_maps(
    template: nn.Module, anchor: State, parent: State, graph: FlowGraph, plan: Plan, maps: CompactMaps,
    objective: Objective, steps: int, lr: float, every: int, seed: int, orthogonal: bool = False,
) -> tuple[CompactMaps, dict]:
    """``maps`` (the parent's, into the anchor's basis) refined for ``steps`` steps; the kept maps
    and what learning did (validation losses, which maps were kept, passes spent)."""
    rotations, permutations = learnable(plan, graph, maps, orthogonal)
    if not rotations | permutations:
        raise TfuseError("fusion.learn_steps refines hard maps (fusion.solver=emd) and the stream's rotation "
                         "(fusion.maps=orthogonal); these maps are soft (Sinkhorn's): set one of those")
    module = _Maps(maps.raw, rotations, permutations, graph.rotations == "centred")
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = objective.batches()
    template.eval()

    def mixed(current: dict, lam: float) -> dict[str, torch.Tensor]:
        aligned = align(parent, graph, plan, current)
        return graph.to_real({n: (1 - lam) * anchor[n] + lam * aligned[n] for n in anchor})

    def validate(current: dict) -> float:
        with torch.no_grad():
            return objective.validate(with_state(template, mixed(current, 0.5)))

    best, best_maps = validate(maps.raw), maps
    losses, evaluations = [best], 1
    for step in range(1, steps + 1):
        lam = 0.4 + 0.2 * float(torch.rand((), generator=generator))
        with _holding(template, mixed(module.current(), lam)) as model:
            loss = objective.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                hard = module.current(hard=True)
            value = validate(hard)
            losses.append(value)
            evaluations += 1
            if value < best:
                best, best_maps = value, _compact(hard)
    info = {"steps": steps, "val_loss": losses, "kept": "start" if best_maps is maps else "learned",
            "learned_spaces": sorted(rotations | permutations),
            "passes": {"forward": steps, "backward": steps, "validation": evaluations}}
    return best_maps, info


def refine(models: Sequence[nn.Module], graph: FlowGraph, plan: Plan, settings, anchor: int,
           maps: list[CompactMaps], weights: Sequence[float], objective: Objective | None, info: dict,
           timings: dict[str, float], orthogonal: bool = False) -> nn.Module:
    """``fusion.learn_steps``: every moved parent's maps refined (in place in ``maps``; what
    learning did in ``info["learned"]``); the fused model the kept maps give. ``settings``: a
    method's (``FusionSettings`` with ``LearnSettings``)."""
    if objective is None:
        raise TfuseError("fusion.learn_steps trains the maps on the task's loss, which this caller does not give")
    anchor_state = parameters(models[anchor], graph)
    info["learned"] = []
    with timed(timings, "learn", models[anchor]):
        for i in (i for i in range(len(models)) if i != anchor):
            maps[i], learned = learn_maps(models[anchor], anchor_state, parameters(models[i], graph), graph, plan, maps[i],
                                          objective, settings.learn_steps, settings.learn_lr, settings.learn_eval,
                                          settings.seed + i, orthogonal)
            info["learned"].append(learned)
    aligned = [anchor_state if i == anchor else align(parameters(m, graph), graph, plan, maps[i].raw)
               for i, m in enumerate(models)]
    return with_state(models[anchor], average(aligned, weights), graph)


def _compact(current: dict) -> CompactMaps:
    out = CompactMaps()
    for space, t in current.items():
        if isinstance(t, HardMap):
            out.raw[space] = t
        else:
            out[space] = t.double()
    return out
