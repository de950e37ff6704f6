"""The self-test every model family gets (``tfuse check-family``): a family's flow graph claims
symmetries; here they are checked on a model of the family.

1. The graph describes every parameter, and every space a parameter lives in is solved by a rule
   (an axis in a space no rule solves would never be aligned).
2. A copy under a random element of every symmetry the graph claims (``symmetry.symmetric_copy``:
   the stream, heads as wholes or in groups, dimensions inside heads, signs where the graph allows
   them) computes the same outputs.
3. Fused with that copy (exact OT), the model comes back.
4. Where the stream admits rotations: folding the norm gains keeps the outputs, a copy with its
   stream and value dimensions rotated does too, and ``fusion.maps=orthogonal`` recovers it.

Norm gains and biases are moved off 1 and 0 first (on a copy): a map that moves them wrongly
must show.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tfuse.errors import TfuseError
from tfuse.fusion.engine import check_graph, parameters
from tfuse.fusion.graph import FlowGraph
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.plan import make_plan
from tfuse.symmetry import rotated_copy, symmetric_copy

Batch = dict[str, torch.Tensor]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def example_inputs(model: nn.Module, batches: int = 4, size: int = 6, seed: int = 0) -> list[Batch]:
    """Random inputs the model takes: images of its size and channels, or token ids below its vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config  # an image model of a text-and-image family (CLIP)
    patch = getattr(model, "patch_embed", None)
    if patch is not None or hasattr(config, "image_size"):
        side = int(patch.img_size[0]) if patch is not None else int(config.image_size)
        channels = int(patch.proj.in_channels) if patch is not None else int(config.num_channels)
        return [{"pixel_values": torch.randn(size, channels, side, side, generator=gen)} for _ in range(batches)]
    if hasattr(config, "vocab_size"):
        return [{"input_ids": torch.randint(0, config.vocab_size, (size, 12), generator=gen)} for _ in range(batches)]
    raise TfuseError(f"check-family: no example inputs for a {type(model).__name__} (neither images nor token ids)")


def outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits (or an encoder's last hidden states): transformers models take keywords, timm's a tensor."""
    with torch.no_grad():
        out = model(**batch) if hasattr(model, "config") else model(*batch.values())
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


def _difference(a: nn.Module, b: nn.Module, inputs: list[Batch]) -> float:
    """The largest output difference, relative to the outputs' scale."""
    worst = 0.0
    for batch in inputs:
        want = outputs(b, batch)
        worst = max(worst, float((outputs(a, batch) - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    return worst


def _recovery(fused: nn.Module, model: nn.Module) -> float:
    mine = dict(model.named_parameters())
    return max(float((w.detach() - mine[n].detach()).abs().max() / mine[n].detach().abs().max().clamp_min(1e-12))
               for n, w in fused.named_parameters())


def off_init(model: nn.Module, seed: int) -> nn.Module:
    """A copy with every 1-D parameter (norm gains, biases) moved off its init."""
    model = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def self_test(model: nn.Module, graph_of: Callable[[nn.Module], FlowGraph], seed: int = 0,
              tolerance: float = 1e-4) -> list[Check]:
    """Every check of the module docstring on ``model`` (a copy moved off its init)."""
    from tfuse.arch import folded

    model = off_init(model.float(), seed)
    graph = graph_of(model)
    inputs = example_inputs(model, seed=seed)
    checks = []
    try:
        check_graph(model, graph, "the model")
        checks.append(Check("the graph describes every parameter", True, f"{len(graph.params)} parameters"))
    except TfuseError as err:
        return [Check("the graph describes every parameter", False, str(err))]
    settings = OTSettings(tokens="all", solver="emd", residual="global", qk="head_aware", signs=bool(graph.signed),
                          samples=sum(len(next(iter(b.values()))) for b in inputs), batch_size=len(next(iter(inputs[0].values()))))
    plan = make_plan(graph, settings)
    still = sorted(n for n, axes in graph.params.items() if any(ax is not None and ax.space not in plan.where for ax in axes))
    checks.append(Check("every space a parameter lives in is solved by a rule", not still,
                        f"no rule moves {', '.join(still)}" if still else f"{len(plan.rules)} rules"))
    twin = symmetric_copy(model, graph, seed=seed + 1, signs=bool(graph.signed))
    changed = any(not torch.equal(a, b) for a, b in zip(parameters(twin, graph).values(), parameters(model, graph).values()))
    diff = _difference(twin, model, inputs)
    checks.append(Check("a copy under the graph's symmetries computes the same outputs", changed and diff <= tolerance,
                        f"output difference {diff:.1e}" + ("" if changed else "; the graph claims no symmetry")))
    fused = ot_fuse([model, twin], graph, settings, 0, lambda: iter(inputs), lambda b: b).model
    gap = _recovery(fused, model)
    checks.append(Check("fused with that copy, the model comes back", gap <= tolerance, f"largest weight difference {gap:.1e}"))
    if graph.rotations is not None:
        fold, fold_graph = folded(model)
        diff = _difference(fold, model, inputs)
        checks.append(Check("folding the norm gains keeps the outputs", diff <= tolerance, f"output difference {diff:.1e}"))
        turned = rotated_copy(fold, fold_graph, seed=seed + 2)
        diff = _difference(turned, model, inputs)
        checks.append(Check(f"a rotated copy ({graph.rotations} stream, value dimensions) computes the same outputs",
                            diff <= 10 * tolerance, f"output difference {diff:.1e}"))
        back = ot_fuse([fold, turned], fold_graph, dataclasses.replace(settings, maps="orthogonal"), 0,
                       lambda: iter(inputs), lambda b: b).model
        gap = _recovery(back, fold)
        checks.append(Check("fusion.maps=orthogonal recovers it", gap <= 10 * tolerance,
                            f"largest weight difference {gap:.1e} (float32 rotations)"))
    return checks
