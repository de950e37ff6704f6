"""Hugging Face ``Dinov2ForImageClassification``: DINOv2's image encoder (``Dinov2Model``) with a
linear classifier. A headless checkpoint (a ``Dinov2Model``) loads as one whose classifier
``fit_head`` fits on the task, a ridge probe fitted alike for every parent (``tfuse.arch.vision``).

``x0 = [cls_token; patch projection(pixels)] + position_embeddings`` (the mask token replaces
masked patches when pretraining asks), pre-LN blocks whose two branches are each scaled per
channel by a LayerScale (``layer_scale1/2.lambda1``), a GELU MLP (``fc1``/``fc2``) or a SwiGLU one
(``use_swiglu_ffn``: ``down_proj(SiLU(gate_proj x) * up_proj x)``; transformers splits the
original fused ``weights_in`` into ``gate_proj``/``up_proj`` when loading), and a final
``layernorm``. The classifier reads ``[class token; mean of the patch tokens]`` of the normalised
last stream point: its weight's two column halves are two views that both read that point.

Symmetries the graph claims:

* the residual stream: one permutation for every point (the embeddings, the class, mask and
  position tokens write point 0). Every LayerNorm centres, so no sign flips. A LayerScale gain
  lives in its branch's space and is moved with the rows that write it; no rotations
  (``rotations``: None), since a per-channel gain on the branch does not commute with them;
* attention: heads move as wholes, the Q/K dimensions inside a head together, the value
  dimensions with the output projection's columns;
* the MLP's hidden units permute; in the SwiGLU variant they may also flip sign with their
  ``up_proj`` row and ``down_proj`` column, the ``gate_proj`` row keeping its sign (SiLU is not odd).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

from tfuse.arch.base import widened_hf
from tfuse.arch.hf_llama import gated_mlp_graph
from tfuse.arch.hf_vit import preprocessing, save
from tfuse.arch.vision import Headless, encoder_sizes, fc_mlp, fit_head, load_classifier, prenorm_block
from tfuse.errors import TfuseError
from tfuse.fusion.graph import FlowGraph, GraphBuilder, In, Out, TokenLayout

__all__ = ["fit_head", "preprocessing", "save"]  # as hf_vit's save and preprocessing; the image families' probe

def mlp_units(hidden: int, ratio: int, swiglu: bool) -> int:
    """The MLP's hidden units under an (integer) ``mlp_ratio``, as transformers sizes them: SwiGLU
    keeps two thirds, rounded up to a multiple of 8."""
    units = int(hidden * ratio)
    return (int(units * 2 / 3) + 7) // 8 * 8 if swiglu else units


def mlp_ratio(hidden: int, units: int, swiglu: bool) -> int:
    """The ``mlp_ratio`` that gives ``units`` MLP hidden units (one line when none does)."""
    ratio = next(r for r in range(1, units + 2) if mlp_units(hidden, r, swiglu) >= units)
    if mlp_units(hidden, ratio, swiglu) != units:
        near = sorted({mlp_units(hidden, r, swiglu) for r in (max(ratio - 1, 1), ratio)})
        raise TfuseError(f"a DINOv2 of width {hidden} cannot have {units} MLP units: its config sets them by an integer "
                         f"mlp_ratio (nearest: {' or '.join(map(str, near))}); use fusion.width that gives one of those")
    return ratio


def build(cfg, task) -> Dinov2ForImageClassification:
    """A fresh DINOv2 image classifier from the ``model`` config group, sized for an image task's data;
    ``mlp_size`` is ``hidden_size * mlp_ratio``, of which SwiGLU (``swiglu``) keeps two thirds."""
    if cfg.mlp_size % cfg.hidden_size:
        raise TfuseError(f"model.mlp_size={cfg.mlp_size}: a DINOv2's MLP is an integer multiple (mlp_ratio) of its width "
                         f"model.hidden_size={cfg.hidden_size}")
    return Dinov2ForImageClassification(Dinov2Config(
        **encoder_sizes(cfg, task), mlp_ratio=cfg.mlp_size // cfg.hidden_size, use_swiglu_ffn=bool(cfg.get("swiglu", False)),
        layerscale_value=cfg.get("layerscale", 1.0), hidden_dropout_prob=cfg.get("dropout", 0.0),
        attention_probs_dropout_prob=cfg.get("dropout", 0.0), num_labels=task.data.num_classes,
    ))


def graph(model: Dinov2ForImageClassification) -> FlowGraph:
    cfg = model.config
    if not cfg.qkv_bias:
        raise TfuseError("a DINOv2 without query/key/value biases (qkv_bias=false) is not supported by hf_dinov2")
    base = "dinov2."
    g = GraphBuilder()
    s0 = g.point(0)
    emb = f"{base}embeddings"
    g.param(f"{emb}.cls_token", None, None, Out(s0))
    if cfg.use_mask_token:
        g.param(f"{emb}.mask_token", None, Out(s0))
    g.param(f"{emb}.position_embeddings", None, None, Out(s0))
    g.param(f"{emb}.patch_embeddings.projection.weight", Out(s0), None, None, None)
    g.param(f"{emb}.patch_embeddings.projection.bias", Out(s0))
    g.probe(s0, emb)

    def swiglu(name: str, reads: str, mlp: str) -> str:
        hidden, out = gated_mlp_graph(g, mlp, name, reads, {f"{mlp}.up_proj.bias"})  # out: re-probed after LayerScale
        g.graph.signed.add(hidden)
        return out

    for layer in range(cfg.num_hidden_layers):
        block = f"{base}encoder.layer.{layer}"
        mlp = partial(swiglu, mlp=f"{block}.mlp") if cfg.use_swiglu_ffn else fc_mlp(g, f"{block}.mlp")
        prenorm_block(g, layer, block, cfg.num_attention_heads, (f"{block}.norm1", f"{block}.norm2"),
                      tuple(f"{block}.attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")), mlp,
                      (f"{block}.layer_scale1", f"{block}.layer_scale2"))
    last = g.point(2 * cfg.num_hidden_layers)
    g.norm(f"{base}layernorm", last)
    halves = ("classifier.cls.weight", "classifier.patches.weight")  # columns: the class token's, the patches' mean
    g.fused("classifier.weight", 1, *halves)
    for half in halves:
        g.param(half, None, In(last))
    g.param("classifier.bias", None)
    grid = cfg.image_size // cfg.patch_size
    g.graph.tokens = TokenLayout(cls=0, grid=(grid, grid), prefix=1)
    return g.graph


def widened(model: nn.Module, units: int) -> nn.Module:
    cfg = model.config
    return widened_hf(model, "mlp_ratio", mlp_ratio(cfg.hidden_size, units, cfg.use_swiglu_ffn))


def tiny(swiglu: bool = False) -> Dinov2ForImageClassification:
    """A small random model of the family (``tfuse check-family``); ``swiglu``: the SwiGLU variant."""
    torch.manual_seed(0)
    return Dinov2ForImageClassification(Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        use_swiglu_ffn=swiglu, image_size=8, patch_size=4, num_channels=3, num_labels=3,
    ))


def owns(model) -> bool:
    return isinstance(model, Dinov2ForImageClassification)


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> Dinov2ForImageClassification:
    return load_classifier(Dinov2ForImageClassification, "hf_dinov2", path, revision, dtype, "dinov2",
                           {"Dinov2Model": Headless(Dinov2Model)})
