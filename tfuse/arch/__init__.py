"""Model families: how to build, save, load and describe (flow graph) each one.

A family is a module that satisfies ``Family`` (``tfuse.arch.base``); a text family satisfies
``TextFamily`` too. Adding an architecture means adding one such module to ``FAMILIES``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from tfuse.arch import hf_bert, hf_clip, hf_dinov2, hf_gemma, hf_gpt2, hf_gptneox, hf_llama, hf_phi3, hf_vit
from tfuse.arch.base import CausalLMFamily, Family, TextFamily, TokenizedFamily
from tfuse.arch.tokenized import tokenizer_of
from tfuse.checkpoint import check_loaded
from tfuse.errors import TfuseError
from tfuse.families import is_local
from tfuse.fusion.fold import fold_gains
from tfuse.fusion.graph import FlowGraph

FAMILIES: dict[str, Family] = {
    "hf_vit": hf_vit, "hf_clip": hf_clip, "hf_dinov2": hf_dinov2, "hf_bert": hf_bert,
    "hf_gpt2": hf_gpt2, "hf_llama": hf_llama, "hf_phi3": hf_phi3, "hf_gemma": hf_gemma, "hf_gptneox": hf_gptneox,
}
TEXT_FAMILY = "hf_bert"  # the family whose checkpoints text data reads its tokenizer from
# ``model.dtype``: "auto" keeps what a checkpoint stores (from_pretrained's own "auto")
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise TfuseError(f"model.family={name!r} is not known; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_dtype(model_cfg) -> torch.dtype | str:
    """``model.dtype`` as the families' ``load`` takes it: "auto" or a torch dtype."""
    name = model_cfg.get("dtype", "auto")
    if not isinstance(name, str) or name not in DTYPES:
        raise TfuseError(f"model.dtype={name!r} is not known; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def family_for(model: nn.Module) -> Family:
    """The family that owns ``model``."""
    for fam in FAMILIES.values():
        if fam.owns(model):
            return fam
    raise TfuseError(f"no model family owns a {type(model).__name__}; tfuse knows the families {', '.join(FAMILIES)}")


def folded(model: nn.Module) -> tuple[nn.Module, FlowGraph]:
    """A copy of ``model`` computing the same function with its norm gains folded into the layers
    reading them (``fusion.maps=orthogonal``), and its graph. An output embedding tied to the
    input one is untied first: the head takes the final norm's gain, the table does not."""
    model = copy.deepcopy(model)
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(config, "tie_word_embeddings", False):
        head.weight = nn.Parameter(head.weight.detach().clone())
        config.tie_word_embeddings = False
    return model, fold_gains(model, family_for(model).graph(model))


def is_causal(name: str) -> bool:
    """Whether ``model.family=name`` is a decoder-only causal LM."""
    return isinstance(family(name), CausalLMFamily)


def tokenized_family(name: str) -> TokenizedFamily:
    """A family whose checkpoints carry a tokenizer (BERT, GPT-2, LLaMA)."""
    fam = family(name)
    if not isinstance(fam, TokenizedFamily):
        raise TfuseError(f"model.family={name!r} carries no tokenizer; text data needs a text family")
    return fam


def text_family(name: str = TEXT_FAMILY) -> TextFamily:
    return _as_text(family(name), f"model.family={name!r} is not a text family")


def text_family_for(model: nn.Module, need: str) -> TextFamily:
    """The text family that owns ``model``; ``need`` names what asks for one (for the error)."""
    return _as_text(family_for(model), f"{need} takes text models; got a {type(model).__name__}")


def _as_text(fam: Family, problem: str) -> TextFamily:
    if not isinstance(fam, TextFamily):
        texts = [name for name, f in FAMILIES.items() if isinstance(f, TextFamily)]
        raise TfuseError(f"{problem}; use a text family: {', '.join(texts)}")
    return fam


def hub_revision(source: str) -> tuple[str, str | None]:
    """``org/name@revision`` -> (``org/name``, revision); a local path or a bare id stays as it is."""
    if is_local(source.partition("@")[0]) or "@" not in source:
        return source, None
    repo, _, revision = source.partition("@")
    return repo, revision or None


def load_parent(source: str, family_name: str, label: str, dtype: torch.dtype | str = "auto") -> nn.Module:
    """A parent from a local directory, or a hub id (``org/name`` or ``org/name@revision``; from
    the local cache when offline), in ``dtype`` (``model_dtype``), with a clear error if missing."""
    source, revision = hub_revision(source)
    path = Path(source).expanduser()
    looks_local = is_local(source)
    if looks_local and not path.is_dir():
        raise TfuseError(
            f"{label}: checkpoint directory '{source}' does not exist; give a directory written by "
            "`tfuse train` (or save_pretrained), or a hub id such as org/name[@revision]"
        )
    try:
        fam = family(family_name)
        if revision is not None:
            return fam.load(source, revision=revision, dtype=dtype)
        model = fam.load(str(path) if looks_local else source, dtype=dtype)
        if looks_local and not getattr(model, "tfuse_headless", None):  # a headless one: checked as its own class
            check_loaded(model, str(path), label)
        return model
    except OSError as err:
        raise TfuseError(f"{label}: could not load a {family_name} checkpoint from '{source}': {err}") from err
    except SafetensorError as err:
        files = sorted(path.glob("*.safetensors")) if looks_local else []
        where = ", ".join(f"'{f}'" for f in files) or f"the weights of '{source}'"
        raise TfuseError(
            f"{label}: {where} is truncated or corrupt ({err}); copy, download or save the checkpoint again"
        ) from err


def parents_preprocessing(sources: list[str], family_name: str):
    """The image preprocessing the parents' checkpoints carry (a family's optional
    ``preprocessing(source)``), checked to be one and the same; None when they carry none."""
    read = getattr(family(family_name), "preprocessing", None)
    if read is None:
        return None
    found = [read(*hub_revision(str(source))) for source in sources]
    if all(norm is None for norm in found):
        return None
    missing = [i for i, norm in enumerate(found) if norm is None]
    if missing:
        have = next(norm for norm in found if norm is not None)
        raise TfuseError(
            f"parents[{missing[0]}] ('{sources[missing[0]]}') carries no preprocessing but {have.source} does; "
            "give every parent its preprocessor config, or none"
        )
    first = found[0]
    for i, norm in enumerate(found[1:], start=1):
        if (norm.mean, norm.std, norm.scale, norm.size) != (first.mean, first.std, first.scale, first.size):
            raise TfuseError(
                f"{first.source} and {norm.source} preprocess images differently (mean {first.mean} vs {norm.mean}, "
                f"std {first.std} vs {norm.std}, size {first.size} vs {norm.size}); fuse parents trained on the same inputs"
            )
    return first


def shared_tokenizer(sources: list[str], family_name: str = TEXT_FAMILY):
    """The one tokenizer all parent checkpoints of ``model.family`` carry (clear errors when
    missing or different)."""
    fam = tokenized_family(family_name)
    tokenizers = []
    for i, source in enumerate(sources):
        name, revision = hub_revision(str(source))
        label, path = f"parents[{i}]", Path(name).expanduser()
        if path.is_dir():
            fam.check_directory(str(path), label)
        tok = fam.load_tokenizer(str(path) if path.is_dir() else name, revision)
        if tok is None:
            raise TfuseError(f"{label}: '{source}' carries no tokenizer; save it beside the weights (save_pretrained)")
        tokenizers.append(tok)
    first = tokenizers[0]
    for i, tok in enumerate(tokenizers[1:], start=1):
        if len(tok) != len(first) or tok.get_vocab() != first.get_vocab():
            raise TfuseError(
                f"parents[0] and parents[{i}] have different tokenizers (vocabularies of {len(first)} and "
                f"{len(tok)} tokens{'' if len(tok) != len(first) else ', same size but different tokens'}); "
                "token ids must mean the same in every parent: fuse models that share one tokenizer"
            )
    return first


# config facts that parents must share: what their weights mean depends on them
SHARED_CONFIG = {
    "vocab_size": "vocabularies", "num_hidden_layers": "depths", "n_layer": "depths",
    "rope_parameters": "RoPE settings (rope_theta, rope_scaling)", "rope_theta": "RoPE bases (rope_theta)",
    "rope_scaling": "RoPE scalings (rope_scaling)", "position_embedding_type": "position embeddings",
    "query_pre_attn_scalar": "attention scales", "attn_logit_softcapping": "attention logit caps",
    "final_logit_softcapping": "final logit caps",
    "use_parallel_residual": "block forms (parallel or serial residual)",
}


def check_same_architecture(models: list[nn.Module], allow_widths: bool) -> None:
    """Parents must share a family, the config facts their weights depend on (vocabulary and
    tokenizer, depth, RoPE and, under RoPE, the head dimension: it keeps Q/K pairs in place) and
    parameter names; shapes too unless ``allow_widths``."""
    first = dict(models[0].named_parameters())
    for i, model in enumerate(models[1:], start=1):
        if type(model) is not type(models[0]):
            raise TfuseError(
                f"parents 0 and {i} are different architectures ({type(models[0]).__name__} vs "
                f"{type(model).__name__}); fuse models of one family"
            )
        _check_config(models[0], model, i)
        other = dict(model.named_parameters())
        for name in list(first) + [n for n in other if n not in first]:
            if name not in first or name not in other:
                where = "parent 0" if name in first else f"parent {i}"
                raise TfuseError(
                    f"parents 0 and {i} differ in architecture: parameter '{name}' exists only in "
                    f"{where} (different depths or layer types?)"
                )
            if first[name].shape != other[name].shape and not allow_widths:
                raise TfuseError(
                    f"parents 0 and {i} differ in architecture: parameter '{name}' has shape "
                    f"{tuple(first[name].shape)} vs {tuple(other[name].shape)}"
                )


def _check_config(first: nn.Module, other: nn.Module, i: int) -> None:
    a, b = getattr(first, "config", None), getattr(other, "config", None)
    if a is None or b is None:
        return
    rope = any(getattr(a, k, None) for k in ("rope_parameters", "rope_theta", "rope_scaling"))
    for key, what in {**SHARED_CONFIG, **({"head_dim": "head dimensions under RoPE"} if rope else {})}.items():
        mine, theirs = getattr(a, key, None), getattr(b, key, None)
        if mine != theirs:
            raise TfuseError(f"parents 0 and {i} have different {what} ({key} {mine!r} vs {theirs!r}): their weights "
                             "mean different things and cannot be fused; give parents trained alike")
    tokens = [tokenizer_of(m) for m in (first, other)]
    if None not in tokens and tokens[0].get_vocab() != tokens[1].get_vocab():
        raise TfuseError(f"parents 0 and {i} have different tokenizers (their vocabularies differ): token ids mean "
                         "different things; give parents trained with one tokenizer")


def check_heads(models: list[nn.Module], anchor: int = 0) -> None:
    """Every parent's attention blocks have the anchor's head layout (query heads, key/value
    groups): maps move whole heads, so a different count has nothing to map onto."""
    layouts = [[(att.name, att.heads, att.kv_heads or att.heads) for att in family_for(m).graph(m).attention]
               for m in models]
    for i, layout in enumerate(layouts):
        for (name, heads, kv), (_, a_heads, a_kv) in zip(layout, layouts[anchor]):
            if (heads, kv) != (a_heads, a_kv):
                raise TfuseError(
                    f"parents {i} and {anchor} differ in attention '{name}' ({heads} vs {a_heads} query heads, {kv} vs "
                    f"{a_kv} key/value heads): the anchor cannot map them; fuse parents with one head layout"
                )


from tfuse.arch import timm_vit  # noqa: E402  (timm imports torchvision: registered last)

FAMILIES["timm_vit"] = timm_vit
