"""What a model family provides: the pipeline's part (``Family``) and, for text models, the
tokenizer and heads the text tasks and the downstream stage need (``TextFamily``).

A family is a module whose functions satisfy one of these protocols (``CausalLMFamily``:
decoder-only language models) (modules match protocols
structurally: nothing is subclassed)."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from tfuse.errors import TfuseError
from tfuse.families import OWNERS
from tfuse.fusion.graph import FlowGraph


SHARD_SIZE = "2GB"  # saved models come in safetensors shards of this size at most, with their index


@runtime_checkable
class Family(Protocol):
    def build(self, cfg, task) -> nn.Module:
        """A fresh model sized by the ``model`` config group for ``task``'s data."""

    def graph(self, model: nn.Module) -> FlowGraph:
        """The flow graph that describes ``model`` to the fusion engine."""

    def load(self, path: str, dtype: torch.dtype | str = "auto") -> nn.Module:
        """A model from a checkpoint directory (``OSError`` when it holds none) in ``dtype`` ("auto":
        as stored); a hub family also takes a hub id and ``revision=``."""

    def save(self, model: nn.Module, path: str) -> None:
        """Write ``model`` (and what travels with it) to the directory ``path``."""

    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` is one of this family's."""

    def tiny(self) -> nn.Module:
        """A small seeded random model of the family (``tfuse check-family`` without parents)."""

    def widened(self, model: nn.Module, units: int) -> nn.Module:
        """A model like ``model`` whose MLPs have ``units`` hidden units (weights to be filled:
        ``fusion.width``). A family whose head width is free of the stream's sets
        ``widens_heads = True`` and takes ``heads=(query heads, key/value heads)`` too, ``units``
        None keeping the MLPs (``fusion.widen=[heads]``)."""


@runtime_checkable
class TokenizedFamily(Family, Protocol):
    def tokenizer_of(self, model: nn.Module):
        """The tokenizer ``model`` carries, or None."""

    def attach_tokenizer(self, model: nn.Module, tokenizer) -> nn.Module:
        """``model`` carrying ``tokenizer`` (kept as it is when ``tokenizer`` is None)."""

    def load_tokenizer(self, path: str):
        """The tokenizer saved in a checkpoint directory (or of a hub id), or None."""

    def check_directory(self, path: str, label: str) -> dict:
        """The checkpoint's config, after checking that it holds this family's model."""


@runtime_checkable
class CausalLMFamily(TokenizedFamily, Protocol):
    """A decoder-only language model: ``model(**inputs).logits`` predicts each next token."""

    causal_lm: bool


@runtime_checkable
class TextFamily(TokenizedFamily, Protocol):
    def has_head(self, model: nn.Module) -> bool:
        """Whether ``model`` has a head (a bare encoder has none)."""

    def masked_logits(self, model: nn.Module, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
        """The masked-LM head's logits at the ``keep`` positions (rows in ``hidden[keep]`` order)."""

    def to_classifier(self, model: nn.Module, num_labels: int, seed: int) -> nn.Module:
        """A sequence classifier around ``model``'s encoder; the new layers from ``seed``."""


def checkpoint_config(path: str, label: str, family: str) -> dict:
    """The directory's config.json, after checking that its ``model_type`` is one of the family's
    (``families.OWNERS``; one line naming the model class otherwise)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise TfuseError(f"{label}: '{path}' has no config.json; give a directory written by save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TfuseError(f"{config_file}: not readable JSON ({err}); fix or remove it") from err
    kind = config.get("model_type")
    owner = OWNERS[family]
    if kind not in owner.model_types:
        cls = (config.get("architectures") or [kind])[0]
        raise TfuseError(
            f"{label}: '{path}' holds a {cls} ({kind!r}) checkpoint, which model.family={family} does not own "
            f"({owner.what}); give parents of one family, or set model.family to the family that owns {cls}"
        )
    return config


def variant(cfg, variants: dict, default: str):
    """The (config class, model class) that ``model.variant`` names for recipe parents."""
    name = cfg.get("variant", default)
    if name not in variants:
        raise TfuseError(f"model.variant={name!r} is not known; allowed: {', '.join(sorted(variants))}")
    return variants[name]


def widened_hf(model: nn.Module, key: str, units: int | float | None, heads: tuple[int, int] | None = None
               ) -> nn.Module:
    """``widened`` for a transformers model whose config names its MLP width ``key`` (dotted: in a
    sub-config, e.g. ``vision_config.intermediate_size``): the same class and config, that width
    set (None: kept) and with ``heads``, ``num_attention_heads`` and ``num_key_value_heads``, in the
    model's dtype and device, with its tokenizer."""
    config = copy.deepcopy(model.config)
    if units is not None:
        *path, last = key.split(".")
        setattr(functools.reduce(getattr, path, config), last, units)
    if heads is not None:
        config.num_attention_heads, config.num_key_value_heads = heads
        try:
            config.validate()
        except StrictDataclassError as err:
            reason = str(err).strip().splitlines()[-1].strip()
            raise TfuseError(f"fusion.widen=[...heads]: {heads[0]} query heads make no valid {type(config).__name__} "
                             f"({reason}); choose a fusion.width whose head count divides hidden_size "
                             f"{config.hidden_size}, or widen the MLPs only (fusion.widen=[mlp])") from err
    first = next(model.parameters())
    wide = type(model)(config).to(device=first.device, dtype=first.dtype).eval()
    if hasattr(model, "tfuse_tokenizer"):
        wide.tfuse_tokenizer = model.tfuse_tokenizer
    return wide


def rotary_dims(config, head_dim: int) -> int:
    """The Q/K dimensions at the start of each head that RoPE rotates (partial RoPE:
    ``partial_rotary_factor`` of them; the rest move freely, jointly in Q and K)."""
    return int(head_dim * ((getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)))
