"""Hugging Face ``CLIPForImageClassification``: CLIP's image encoder (``CLIPVisionModel``) with a
linear classifier. A headless checkpoint (a ``CLIPVisionModel``, or a ``CLIPModel`` whose text
tower and projections go unused) loads as one whose classifier ``fit_head`` fits on the task, a
ridge probe fitted alike for every parent (``tfuse.arch.vision``).

``x0 = [class_embedding; patch_embedding(pixels)] + position_embedding``, then ``pre_layrnorm`` on
the stream itself, pre-LN blocks (``layer_norm1``/``layer_norm2``, Q/K/V/out projections with
biases, ``fc1``/quick-GELU/``fc2``), and ``post_layernorm`` on the class token (the encoder's
pooled output, which the classifier does not use). The classifier reads the mean of the patch tokens of the last stream
point as they are, without a norm.

Symmetries the graph claims:

* the residual stream: one permutation for every point. ``pre_layrnorm``'s gain and shift write
  stream point 0 (its probe is its output, what the first block reads), as BERT's embedding norm
  does; the class embedding, the patch convolution's output channels and the position table's
  columns write it too. Every LayerNorm centres, so no sign flips; and because
  ``pre_layrnorm``'s gain sits on the stream, not in a branch, no rotations (``rotations``: None);
* attention: heads move as wholes, the Q/K dimensions inside a head together, the value
  dimensions with the output projection's columns;
* the MLP's hidden units permute (quick-GELU is not odd: no signs).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPConfig, CLIPForImageClassification, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection,
)

from tfuse.arch.base import widened_hf
from tfuse.arch.hf_vit import preprocessing, save
from tfuse.arch.vision import Headless, encoder_sizes, fc_mlp, fit_head, load_classifier, prenorm_block
from tfuse.fusion.graph import FlowGraph, GraphBuilder, Out, TokenLayout

__all__ = ["fit_head", "preprocessing", "save"]  # as hf_vit's save and preprocessing; the image families' probe


def build(cfg, task) -> CLIPForImageClassification:
    """A fresh CLIP image classifier from the ``model`` config group, sized for an image task's data."""
    vision = CLIPVisionConfig(**encoder_sizes(cfg, task), intermediate_size=cfg.mlp_size,
                              attention_dropout=cfg.get("dropout", 0.0))
    return CLIPForImageClassification(CLIPConfig(vision_config=vision.to_dict(), num_labels=task.data.num_classes))


def graph(model: CLIPForImageClassification) -> FlowGraph:
    cfg, base = model.config.vision_config, "vision_model."
    g = GraphBuilder()
    s0 = g.point(0)
    emb = f"{base}embeddings"
    g.param(f"{emb}.class_embedding", Out(s0))
    g.param(f"{emb}.patch_embedding.weight", Out(s0), None, None, None)
    g.param(f"{emb}.position_embedding.weight", None, Out(s0))
    g.norm(f"{base}pre_layrnorm", s0)  # on the stream: what the first block reads
    g.probe(s0, f"{base}pre_layrnorm")
    for layer in range(cfg.num_hidden_layers):
        block = f"{base}encoder.layers.{layer}"
        prenorm_block(g, layer, block, cfg.num_attention_heads, (f"{block}.layer_norm1", f"{block}.layer_norm2"),
                      tuple(f"{block}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
                      fc_mlp(g, f"{block}.mlp"))
    last = g.point(2 * cfg.num_hidden_layers)
    g.norm(f"{base}post_layernorm", last)  # the class token's, for the encoder's pooled output
    g.linear("classifier", None, last)  # reads the patch tokens' mean, without a norm
    grid = cfg.image_size // cfg.patch_size
    g.graph.tokens = TokenLayout(cls=0, grid=(grid, grid), prefix=1)
    return g.graph


def widened(model: nn.Module, units: int) -> nn.Module:
    return widened_hf(model, "vision_config.intermediate_size", units)


def tiny() -> CLIPForImageClassification:
    """A small random model of the family (``tfuse check-family``)."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
                  patch_size=4, num_channels=3)
    return CLIPForImageClassification(CLIPConfig(vision_config=vision, num_labels=3))


def owns(model) -> bool:
    return isinstance(model, CLIPForImageClassification)


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> CLIPForImageClassification:
    return load_classifier(CLIPForImageClassification, "hf_clip", path, revision, dtype, "vision_model", HEADLESS)


HEADLESS = {  # the headless checkpoints a classifier loads: where their image encoder is
    "CLIPVisionModel": Headless(CLIPVisionModel, config=lambda vision: CLIPConfig(vision_config=vision.to_dict())),
    "CLIPModel": Headless(CLIPModel, "vision_model"),
    "CLIPVisionModelWithProjection": Headless(  # its visual_projection goes unused, as CLIPModel's
        CLIPVisionModelWithProjection, "vision_model", lambda vision: CLIPConfig(vision_config=vision.to_dict())),
}
