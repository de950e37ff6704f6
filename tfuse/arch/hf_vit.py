"""Hugging Face ``ViTForImageClassification`` (transformers 5.x module names): pre-LN blocks."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from tfuse.arch.base import SHARD_SIZE, checkpoint_config, widened_hf
from tfuse.data.images import Normalization
from tfuse.families import checkpoint_json
from tfuse.fusion.graph import FlowGraph, GraphBuilder, Out, TokenLayout


def build(cfg, task) -> ViTForImageClassification:
    """A fresh ViT from the ``model`` config group, sized for an image task's data."""
    data = task.data
    config = ViTConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_size,
        image_size=data.image_size,
        patch_size=cfg.patch_size,
        num_channels=data.channels,
        num_labels=data.num_classes,
        hidden_dropout_prob=cfg.get("dropout", 0.0),
        attention_probs_dropout_prob=cfg.get("dropout", 0.0),
    )
    return ViTForImageClassification(config)


def graph(model: ViTForImageClassification) -> FlowGraph:
    cfg = model.config
    g = GraphBuilder()
    s0 = g.point(0)
    emb = "vit.embeddings"
    g.param(f"{emb}.cls_token", None, None, Out(s0))
    g.param(f"{emb}.position_embeddings", None, None, Out(s0))
    if getattr(model.vit.embeddings, "mask_token", None) is not None:
        g.param(f"{emb}.mask_token", None, None, Out(s0))
    g.param(f"{emb}.patch_embeddings.projection.weight", Out(s0), None, None, None)
    g.param(f"{emb}.patch_embeddings.projection.bias", Out(s0))
    g.probe(s0, emb)
    for layer in range(cfg.num_hidden_layers):
        block, name = f"vit.layers.{layer}", f"layers.{layer}"
        g.graph.blocks.append(block)
        before, middle, after = g.point(2 * layer), g.point(2 * layer + 1), g.point(2 * layer + 2)
        g.norm(f"{block}.layernorm_before", before)
        projections = tuple(f"{block}.attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        attn_out = g.attention_block(name, cfg.num_attention_heads, before, projections)
        g.residual(middle, before, attn_out)
        g.probe(middle, f"{block}.layernorm_after", "input")
        g.norm(f"{block}.layernorm_after", middle)
        mlp_out = g.mlp_block(name, middle, f"{block}.mlp.fc1", f"{block}.mlp.activation_fn", f"{block}.mlp.fc2")
        g.residual(after, middle, mlp_out)
        g.probe(after, block)
    last = g.point(2 * cfg.num_hidden_layers)
    g.norm("vit.layernorm", last)
    g.linear("classifier", None, last)
    grid = cfg.image_size // cfg.patch_size
    g.graph.rotations = "centred"  # pre-LN: every LayerNorm reads the stream and feeds only its branch
    g.graph.tokens = TokenLayout(cls=0, grid=(grid, grid), prefix=1)
    return g.graph


def widened(model: torch.nn.Module, units: int) -> torch.nn.Module:
    return widened_hf(model, "intermediate_size", units)


def tiny() -> ViTForImageClassification:
    """A small random model of the family (``tfuse check-family``)."""
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=48, image_size=8, patch_size=4, num_channels=3,
                                               num_labels=3))


def owns(model) -> bool:
    return isinstance(model, ViTForImageClassification)


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> ViTForImageClassification:
    if Path(path).is_dir():
        checkpoint_config(path, f"checkpoint '{path}'", "hf_vit")
    return ViTForImageClassification.from_pretrained(path, revision=revision, dtype=dtype, use_safetensors=True)


def save(model: ViTForImageClassification, path: str) -> None:
    model.save_pretrained(path, safe_serialization=True, max_shard_size=SHARD_SIZE)


PREPROCESSOR = "preprocessor_config.json"


def preprocessing(source: str, revision: str | None = None) -> Normalization | None:
    """The checkpoint's ``preprocessor_config.json`` as a ``Normalization`` (None without one): a
    local directory, or a hub id (its cached copy when offline)."""
    found = checkpoint_json(source, PREPROCESSOR, revision)
    if found is None:
        return None
    file, config = found
    return _normalization(config, str(file))


def _normalization(config: dict, source: str) -> Normalization:
    def channels(key: str, neutral: float) -> tuple[float, ...]:
        value = config.get(key, neutral) if config.get("do_normalize", True) else neutral
        return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))

    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    size = config.get("size") if config.get("do_resize", True) else None
    if isinstance(size, dict):
        size = (size["height"], size["width"]) if "height" in size else None  # shortest_edge: no fixed size
    elif isinstance(size, int):
        size = (size, size)
    return Normalization(channels("image_mean", 0.0), channels("image_std", 1.0), rescale * 255.0,
                         tuple(size) if size else None, source)
