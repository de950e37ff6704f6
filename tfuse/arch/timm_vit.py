"""timm ``VisionTransformer``: pre-LN blocks, a fused ``qkv`` Linear, optional LayerScale, class
token or average pooling, optional register tokens.

The fused ``qkv`` (rows ``[q; k; v]``) is a flow-graph *view*: the engine sees three virtual
parameters ``attn.{q,k,v}.weight`` and probes the three thirds of the ``qkv`` output.

Saved as ``model.safetensors`` plus ``config.json`` (``architecture`` and the keyword arguments),
so that ``timm.create_model(architecture, pretrained=False, **kwargs)`` and
``safetensors.torch.load_file`` load it back without tfuse.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer

from tfuse.data.images import Normalization
from tfuse.errors import TfuseError
from tfuse.families import checkpoint_json
from tfuse.fusion.graph import FlowGraph, GraphBuilder, Linear, Out, Probe, TokenLayout

# model-config keys passed to timm.create_model when set (null: the architecture's default)
OVERRIDES = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_classes", "mlp_ratio",
    "init_values", "class_token", "global_pool", "reg_tokens", "no_embed_class", "qkv_bias", "fc_norm",
    "drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate",
)
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def create(architecture: str, kwargs: dict) -> VisionTransformer:
    if not architecture.startswith("vit_"):
        raise TfuseError(f"model.arch={architecture!r}: the timm_vit family takes timm's vit_* architectures")
    try:
        model = timm.create_model(architecture, pretrained=False, **kwargs)
    except (RuntimeError, KeyError) as err:  # unknown model names
        raise TfuseError(f"model.arch={architecture!r}: timm cannot build it ({err})") from err
    if not isinstance(model, VisionTransformer):
        raise TfuseError(f"model.arch={architecture!r} is a {type(model).__name__}, not timm's VisionTransformer")
    model.tfuse_timm = {"architecture": architecture, "kwargs": dict(kwargs)}
    return model


def build(cfg, task) -> VisionTransformer:
    """A fresh timm ViT from the ``model`` config group; image size, channels and classes default
    to the task's data. The generic size keys an experiment may set for any ViT family
    (``hidden_size``, ``heads``, ``mlp_size``) stand in for timm's own when those are null."""
    data = task.data
    kwargs = {k: _plain(cfg.get(k)) for k in OVERRIDES if cfg.get(k) is not None}
    for generic, own in (("hidden_size", "embed_dim"), ("heads", "num_heads")):
        if cfg.get(generic) is not None:
            kwargs.setdefault(own, cfg.get(generic))
    if cfg.get("mlp_size") is not None and "mlp_ratio" not in kwargs:
        width = kwargs.get("embed_dim") or timm.create_model(cfg.arch, pretrained=False, num_classes=0).embed_dim
        kwargs["mlp_ratio"] = cfg.mlp_size / width
    kwargs.setdefault("img_size", data.image_size)
    kwargs.setdefault("in_chans", data.channels)
    kwargs.setdefault("num_classes", data.num_classes)
    return create(cfg.arch, kwargs)


def _plain(value):
    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return tuple(value) if isinstance(value, list) else value


def graph(model: VisionTransformer) -> FlowGraph:
    blocks = list(model.blocks)
    if getattr(model, "attn_pool", None) is not None:
        raise TfuseError("timm ViT with global_pool='map' (attention pooling) is not supported; use token or avg")
    unsupported = [n for n, _ in model.named_parameters() if any(
        s in n for s in (".q_norm.", ".k_norm.", ".attn.norm.", ".mlp.norm.", "patch_embed.norm.")
    )]
    if unsupported:
        raise TfuseError(f"timm ViT with qk_norm or extra norms is not supported (e.g. '{unsupported[0]}')")
    g = GraphBuilder()
    s0 = g.point(0)
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(model, name, None) is not None:
            g.param(name, None, None, Out(s0))
    g.param("patch_embed.proj.weight", Out(s0), None, None, None)
    if model.patch_embed.proj.bias is not None:
        g.param("patch_embed.proj.bias", Out(s0))
    if any(True for _ in model.norm_pre.parameters()):
        g.norm("norm_pre", s0, bias=model.norm_pre.bias is not None)
    g.probe(s0, "norm_pre")
    for layer, block in enumerate(blocks):
        pre, name = f"blocks.{layer}", f"blocks.{layer}"
        g.graph.blocks.append(pre)
        before, middle, after = g.point(2 * layer), g.point(2 * layer + 1), g.point(2 * layer + 2)
        g.norm(f"{pre}.norm1", before, bias=block.norm1.bias is not None)
        q, k, v = g.attention(f"{name}.attn", block.attn.num_heads)
        has_bias = block.attn.qkv.bias is not None
        source = Probe(f"{pre}.attn.qkv", "input")
        for i, (space, part) in enumerate(((q, "q"), (k, "k"), (v, "v"))):
            g.linear(f"{pre}.attn.{part}", space, before, bias=has_bias)
            bias = f"{pre}.attn.{part}.bias" if has_bias else None
            g.probe(space, f"{pre}.attn.qkv", part=(i, 3), linear=Linear(source, f"{pre}.attn.{part}.weight", bias))
        g.fused(f"{pre}.attn.qkv.weight", 0, *(f"{pre}.attn.{p}.weight" for p in "qkv"))
        if has_bias:
            g.fused(f"{pre}.attn.qkv.bias", 0, *(f"{pre}.attn.{p}.bias" for p in "qkv"))
        attn_out = f"{name}.attn_out"
        g.linear(f"{pre}.attn.proj", attn_out, v, bias=block.attn.proj.bias is not None)
        if isinstance(block.ls1, LayerScale):
            g.param(f"{pre}.ls1.gamma", Out(attn_out))
        g.probe(attn_out, f"{pre}.ls1")
        g.residual(middle, before, attn_out)
        g.probe(middle, f"{pre}.norm2", "input")
        g.norm(f"{pre}.norm2", middle, bias=block.norm2.bias is not None)
        biases = (block.mlp.fc1.bias is not None, block.mlp.fc2.bias is not None)
        mlp_out = g.mlp_block(name, middle, f"{pre}.mlp.fc1", f"{pre}.mlp.act", f"{pre}.mlp.fc2", f"{pre}.ls2", biases)
        if isinstance(block.ls2, LayerScale):
            g.param(f"{pre}.ls2.gamma", Out(mlp_out))
        g.residual(after, middle, mlp_out)
        g.probe(after, pre)
    last = g.point(2 * len(blocks))
    for norm in ("norm", "fc_norm"):
        module = getattr(model, norm)
        if any(True for _ in module.parameters()):
            g.norm(norm, last, bias=module.bias is not None)
    if any(True for _ in model.head.parameters()):
        g.linear("head", None, last, bias=model.head.bias is not None)
    grid = tuple(model.patch_embed.grid_size)
    cls = 0 if getattr(model, "cls_token", None) is not None else None
    g.graph.tokens = TokenLayout(cls=cls, grid=grid, prefix=model.num_prefix_tokens)
    return g.graph


def widened(model: torch.nn.Module, units: int) -> torch.nn.Module:
    raise TfuseError("fusion.width: a timm ViT's MLP width follows its mlp_ratio, which tfuse does not rebuild; "
                     "use fusion.width=1, or an HF ViT (model=hf_vit)")


def tiny() -> VisionTransformer:
    """A small random model of the family (``tfuse check-family``)."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=1.5, num_classes=3)


def owns(model) -> bool:
    return isinstance(model, VisionTransformer)


def _kwargs_of(model: VisionTransformer) -> tuple[str, dict]:
    """The architecture name and keyword arguments that rebuild ``model``."""
    known = getattr(model, "tfuse_timm", None)
    if known is not None:
        return known["architecture"], dict(known["kwargs"])
    block = model.blocks[0]
    kwargs = {
        "img_size": tuple(model.patch_embed.img_size), "patch_size": tuple(model.patch_embed.patch_size),
        "in_chans": model.patch_embed.proj.in_channels, "embed_dim": model.embed_dim, "depth": len(model.blocks),
        "num_heads": block.attn.num_heads, "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "num_classes": model.num_classes, "global_pool": model.global_pool,
        "class_token": model.cls_token is not None, "reg_tokens": model.num_reg_tokens,
        "no_embed_class": model.no_embed_class, "qkv_bias": block.attn.qkv.bias is not None,
    }
    if isinstance(block.ls1, LayerScale):
        kwargs["init_values"] = 1e-5  # any value: the saved gammas replace it
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "vit_base_patch16_224")
    return architecture, kwargs


def save(model: VisionTransformer, path: str) -> None:
    architecture, kwargs = _kwargs_of(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    config = {"family": "timm_vit", "architecture": architecture, "kwargs": kwargs}
    (folder / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def load(path: str, revision: str | None = None, dtype: torch.dtype | str = "auto") -> VisionTransformer:
    """A checkpoint written by tfuse, by timm (``save_for_hf``: ``model_args`` and
    ``pretrained_cfg``), or a timm hub id (``timm/NAME``; from the hub cache when offline), in
    ``dtype`` ("auto": as stored; a hub id's as timm builds it, float32)."""
    folder = Path(path)
    if not folder.is_dir():
        if revision is not None:
            raise TfuseError(f"'{path}@{revision}': timm hub ids load their main revision here; drop @{revision}")
        model = _checked(timm.create_model(f"hf-hub:{path}", pretrained=True), path)
        return model if dtype == "auto" else model.to(dtype)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise OSError(f"expected {CONFIG} and {WEIGHTS} (written by tfuse's timm_vit family or timm) in {folder}")
    if dtype == "auto":
        dtype = _stored_dtype(folder / WEIGHTS)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if "kwargs" not in config:  # timm's own format
        return _checked(timm.create_model(f"local-dir:{folder}", pretrained=True), str(folder)).to(dtype)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config["kwargs"].items()}
    model = create(config["architecture"], kwargs).to(dtype)
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model


def _stored_dtype(file: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor in a safetensors file (timm builds its modules
    in float32 and would cast the weights into them)."""
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32


def _checked(model, source: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise TfuseError(f"'{source}' holds a {type(model).__name__}, not timm's VisionTransformer (model.family=timm_vit)")
    return model


def preprocessing(source: str, revision: str | None = None) -> Normalization | None:
    """A timm checkpoint's ``pretrained_cfg`` (mean, std, input size; inputs in [0, 1]) as a
    ``Normalization``; None for tfuse's own checkpoints, trained on the data's statistics."""
    found = checkpoint_json(source, CONFIG, revision)
    if found is None:
        return None
    file, config = found
    pretrained = config.get("pretrained_cfg")
    if "kwargs" in config or not pretrained or "mean" not in pretrained:
        return None
    size = pretrained.get("input_size")
    return Normalization(tuple(pretrained["mean"]), tuple(pretrained["std"]), 1.0,
                         tuple(size[1:]) if size else None, str(file))
