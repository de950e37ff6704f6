"""What the Hugging Face image-encoder families (``hf_clip``, ``hf_dinov2``) share: their sizes
from the ``model`` config group and the image task, a pre-LN block as a flow graph, and loading
only checkpoints that carry a classification head (the image task scores class logits)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tfuse.arch.base import checkpoint_config
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


def load_classifier(cls: type, family: str, path: str, revision: str | None, dtype: torch.dtype | str) -> nn.Module:
    """``cls.from_pretrained`` for a checkpoint of ``family`` (``families.OWNERS``); a checkpoint of
    another class (a headless encoder, CLIP's text and image pair) is refused in one line: the
    head it would get is random, different in every parent."""
    if Path(path).is_dir():
        config = checkpoint_config(path, f"checkpoint '{path}'", family)
    else:
        config = (checkpoint_json(path, "config.json", revision) or (None, {}))[1]
    held = (config.get("architectures") or [cls.__name__])[0]
    if held != cls.__name__:
        raise TfuseError(
            f"checkpoint '{path}' holds a {held}, not a {cls.__name__}: the image task scores class logits and "
            f"tfuse does not train heads; load it with {cls.__name__}.from_pretrained(..., num_labels=N), train "
            "its classifier the same way for every parent (a linear probe), save that, and fuse those checkpoints"
        )
    return cls.from_pretrained(path, revision=revision, dtype=dtype, use_safetensors=True)
