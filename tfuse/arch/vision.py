"""What the Hugging Face image-encoder families (``hf_clip``, ``hf_dinov2``) share: their sizes
from the ``model`` config group and the image task, a pre-LN block as a flow graph, loading a
classifier or a headless encoder checkpoint, and a headless parent's linear probe (``fit_head``).

The image task scores class logits, and a head drawn at random would differ in every parent. So a
headless encoder is loaded into the family's classification class and its classifier fitted in
closed form on the task, identically for every parent: ridge regression of the centred one-hot
labels on the features the classifier reads, on a fixed seeded set of training images, in
float64. The fit is equivariant to orthogonal maps of those features (the ridge is a multiple of
their mean variance, invariant too), so a transformed copy of an encoder gets the transformed
probe, and fusing it with its original gives the original encoder and probe back."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tfuse.arch.base import checkpoint_config
from tfuse.checkpoint import check_loaded, empty
from tfuse.errors import TfuseError
from tfuse.families import checkpoint_json
from tfuse.fusion.graph import GraphBuilder, Out


def encoder_sizes(cfg, task) -> dict:
    """Transformers config keywords of an encoder sized by the ``model`` config group for the
    image task's data (its side, channels)."""
    data = task.data
    return dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                image_size=data.image_size, patch_size=cfg.patch_size, num_channels=data.channels)


def prenorm_block(g: GraphBuilder, layer: int, block: str, heads: int, norms: tuple[str, str],
                  projections: tuple[str, str, str, str], mlp: Callable[[str, str], str],
                  scales: tuple[str, str] | None = None) -> None:
    """Block ``layer`` at module path ``block``: ``x + attn(norms[0](x))``, then ``+ mlp(norms[1](.))``,
    from stream point ``2 * layer`` to ``2 * layer + 2``. ``mlp(name, reads)`` describes the MLP and
    returns its branch space. ``scales``: the LayerScale modules whose ``lambda1`` multiplies each
    branch's output per channel: a gain in the branch space, written with it (and probed after it)."""
    name = f"layers.{layer}"
    g.graph.blocks.append(block)
    before, middle, after = g.point(2 * layer), g.point(2 * layer + 1), g.point(2 * layer + 2)
    g.norm(norms[0], before)
    attn_out = g.attention_block(name, heads, before, projections)
    g.probe(middle, norms[1], "input")
    g.norm(norms[1], middle)
    mlp_out = mlp(name, middle)
    for scale, branch in zip(scales or (), (attn_out, mlp_out)):
        g.param(f"{scale}.lambda1", Out(branch))
        g.probe(branch, scale)
    g.residual(middle, before, attn_out)
    g.residual(after, middle, mlp_out)
    g.probe(after, block)


def fc_mlp(g: GraphBuilder, module: str) -> Callable[[str, str], str]:
    """``prenorm_block``'s ``mlp`` for transformers' ``fc1``, ``activation_fn``, ``fc2`` MLP at ``module``."""
    return lambda name, reads: g.mlp_block(name, reads, f"{module}.fc1", f"{module}.activation_fn", f"{module}.fc2")


@dataclass(frozen=True)
class Headless:
    """A headless checkpoint class a family's classifier loads: ``model`` reads it, ``encoder`` is
    where the encoder sits in it ("": the whole model; the rest, a text tower and its projections,
    goes unused), ``config`` gives the classifier's config from the checkpoint's."""

    model: type
    encoder: str = ""
    config: Callable = copy.deepcopy


def load_classifier(cls: type, family: str, path: str, revision: str | None, dtype: torch.dtype | str, encoder: str,
                    headless: dict[str, Headless]) -> nn.Module:
    """``cls.from_pretrained`` for a checkpoint of ``family`` (``families.OWNERS``); a ``headless``
    one (by its config's ``architectures``) is read as its own class, every tensor checked
    (``check_loaded``), its encoder put at ``encoder`` in a ``cls`` whose classifier is a placeholder
    until ``fit_head`` fits it; the model is marked ``tfuse_headless`` (the class held) until then."""
    if Path(path).is_dir():
        config = checkpoint_config(path, f"checkpoint '{path}'", family)
    else:
        config = (checkpoint_json(path, "config.json", revision) or (None, {}))[1]
    held = (config.get("architectures") or [cls.__name__])[0]
    if held == cls.__name__:
        return cls.from_pretrained(path, revision=revision, dtype=dtype, use_safetensors=True)
    if held not in headless:
        raise TfuseError(f"checkpoint '{path}' holds a {held}, neither a {cls.__name__} nor a headless "
                         f"{' or '.join(headless)}; give one of those")
    kind = headless[held]
    bare = kind.model.from_pretrained(path, revision=revision, dtype=dtype, use_safetensors=True)
    check_loaded(bare, path, f"headless {held}")  # the encoder whole, and no tensor it leaves unused
    part = bare.get_submodule(kind.encoder)
    first = next(part.parameters())
    model = empty(lambda: cls(kind.config(bare.config)), first.dtype)
    model.get_submodule(encoder).load_state_dict(part.state_dict(), strict=True, assign=True)
    shape = model.classifier.weight.shape  # a seeded random head until fit_head: outputs that read the encoder
    model.classifier = linear(torch.randn(shape, generator=torch.Generator().manual_seed(0)) / shape[1] ** 0.5,
                              torch.zeros(shape[0]), first)
    model.tfuse_headless = held
    return model.eval()


def linear(weight: torch.Tensor, bias: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias``, in ``like``'s dtype and device."""
    out = nn.Linear(weight.shape[1], weight.shape[0], dtype=like.dtype, device=like.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


PROBE_IMAGES = 4096  # training images a headless parent's probe is fitted on (all, where the split has fewer)
PROBE_RIDGE = 1e-3  # the ridge, times the mean variance of the features


@torch.no_grad()
def fit_head(model: nn.Module, task) -> str:
    """``model.classifier`` (a headless parent's) fitted on the image ``task``: ridge regression of
    the centred one-hot labels of the first ``PROBE_IMAGES`` training images of a seeded order (the
    same for every parent) on the features the classifier reads (its input), all in float64. The
    features come from a float64 copy of the model: float32 rounding depends on the summation
    order, which a permutation changes, and the ridge system would amplify the difference between
    a transformed copy's probe and the original's. What was fitted, in words."""
    exact = copy.deepcopy(model).to(torch.float64).eval()
    reads, labels = [], []
    exact.classifier.register_forward_pre_hook(lambda _, args: reads.append(args[0].cpu()))
    for batch in task.calibration_batches(PROBE_IMAGES, task.eval_batch_size, seed=0):
        exact(pixel_values=task.model_inputs(batch)["pixel_values"].to(torch.float64))
        labels.append(batch["labels"])
    del exact
    x, y = torch.cat(reads), F.one_hot(torch.cat(labels), task.num_classes).double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    x, y = x - x_mean, y - y_mean
    gram = x.T @ x
    gram.diagonal().add_(PROBE_RIDGE * gram.diagonal().mean())
    weight = torch.linalg.solve(gram, x.T @ y).T
    model.classifier = linear(weight, y_mean - weight @ x_mean, model.classifier.weight)
    model.config.num_labels = task.num_classes
    del model.tfuse_headless
    return f"a ridge probe on {len(x)} training images"
