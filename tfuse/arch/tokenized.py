"""What the text families share: the tokenizer a model carries (``model.tfuse_tokenizer``), read
from and written beside its checkpoint, and the check that a checkpoint directory holds the
family's model."""
from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tfuse.arch.base import SHARD_SIZE, checkpoint_config
from tfuse.errors import TfuseError


class SharedTokenizer:
    """Holds a model's tokenizer; deep copies of the model share it (it is never mutated)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def __deepcopy__(self, memo) -> "SharedTokenizer":
        return self


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The config keys naming a tokenizer's bos, eos and pad tokens (a recipe model's config)."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def attach_tokenizer(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> nn.Module:
    if tokenizer is not None:
        model.tfuse_tokenizer = SharedTokenizer(tokenizer)
    return model


def tokenizer_of(model: nn.Module) -> PreTrainedTokenizerBase | None:
    shared = getattr(model, "tfuse_tokenizer", None)
    return shared.tokenizer if shared is not None else None


def load_tokenizer(path: str, revision: str | None = None) -> PreTrainedTokenizerBase | None:
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError):
        return None


def save(model: nn.Module, path: str) -> None:
    model.save_pretrained(path, safe_serialization=True, max_shard_size=SHARD_SIZE)
    tokenizer = tokenizer_of(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_causal_lm(path: str, revision: str | None, dtype, family: str, cls=AutoModelForCausalLM) -> nn.Module:
    """A causal LM from a checkpoint directory (refused in one line when ``family`` does not own
    its ``model_type``) or a hub id, with the tokenizer saved beside it."""
    if Path(path).is_dir():
        checkpoint_config(path, f"checkpoint '{path}'", family)
    return attach_tokenizer(cls.from_pretrained(path, revision=revision, dtype=dtype), load_tokenizer(path, revision))
