"""Which checkpoints each model family owns, and the experiment whose data and settings fit them
when none is named: read from a checkpoint's ``config.json`` before anything heavy is imported
(``tfuse fuse parents=[...]`` without ``model=``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from tfuse.errors import TfuseError

GUIDE = "docs/adding-a-family.md"


class Owner(NamedTuple):
    model_types: tuple[str, ...]  # config.json ``model_type`` values the family loads
    experiment: str  # the preset checkpoints of this family are fused with by default
    what: str  # how messages name the family's models


OWNERS: dict[str, Owner] = {
    "hf_vit": Owner(("vit",), "vit_mnist", "ViT image classifiers"),
    "hf_bert": Owner(("bert", "roberta", "xlm-roberta"), "bert_mlm", "BERT, RoBERTa and XLM-R encoders"),
    "hf_gpt2": Owner(("gpt2",), "gpt_plays", "GPT-2 causal LMs"),
    "hf_llama": Owner(("llama", "mistral", "qwen2", "qwen3"), "llama_plays", "LLaMA, Mistral, Qwen2 and Qwen3 causal LMs"),
    "hf_gemma": Owner(("gemma", "gemma2", "gemma3_text"), "gemma_plays", "Gemma, Gemma 2 and Gemma 3 (text) causal LMs"),
    "hf_gptneox": Owner(("gpt_neox",), "neox_plays", "GPT-NeoX causal LMs (Pythia)"),
    "hf_clip": Owner(("clip", "clip_vision_model"), "vit_mnist", "CLIP image classifiers and vision encoders"),
    "hf_dinov2": Owner(("dinov2",), "vit_mnist", "DINOv2 image classifiers and encoders"),
    "hf_phi3": Owner(("phi3",), "phi3_plays", "Phi-3 causal LMs (Phi3ForCausalLM)"),
    "timm_vit": Owner((), "vit_mnist", "timm ViTs (config.json with 'architecture')"),
}


def is_local(source: str) -> bool:
    """Whether a parent's source names a local path (else a hub id ``org/name``)."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") != 1


def checkpoint_json(source: str, name: str, revision: str | None = None) -> tuple[Path, dict] | None:
    """A JSON file of a checkpoint (a local directory, or a hub id's, downloaded or from the hub
    cache) and its content; None when it has none or cannot be reached (loading the weights then
    says why)."""
    if is_local(source):
        file = Path(source).expanduser() / name
        if not file.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(source, name, revision=revision))
        except Exception:  # huggingface_hub raises several kinds: absent, offline, gated
            return None
    try:
        return file, json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TfuseError(f"{file}: not readable JSON ({err}); fix or remove it") from err


def family_of(config: dict, label: str) -> str:
    """The family that owns a checkpoint with this ``config.json``; one line naming its class and
    the families otherwise."""
    kind = config.get("model_type")
    for name, owner in OWNERS.items():
        if kind in owner.model_types:
            return name
    if kind is None and "architecture" in config:  # timm's save_for_hf
        return "timm_vit"
    cls = (config.get("architectures") or [kind or "model"])[0]
    known = "; ".join(f"{name}: {owner.what}" for name, owner in OWNERS.items())
    raise TfuseError(f"{label} holds a {cls} (model_type {kind!r}), which no tfuse family owns ({known}); "
                     f"a new family is one module in tfuse/arch/ ({GUIDE})")
