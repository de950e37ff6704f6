"""Checkpoints read tensor by tensor, and checked: a model's skeleton on the meta device whose parameters are
read from its safetensors files (one file, or shards with ``model.safetensors.index.json``) part
by part, and released again, so that only the parts in use are resident.

Loading checks what it loads: every parameter of the model is in the checkpoint (tied ones once)
and every tensor of the checkpoint is a parameter or buffer of the model; otherwise one line
names the tensor.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tfuse.errors import TfuseError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, each read on demand."""

    def __init__(self, folder: str | Path, label: str):
        self.folder, self.label = Path(folder), label
        index = self.folder / INDEX
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {name: self.folder / file for name, file in weight_map.items()}
            elif (self.folder / SINGLE).is_file():
                with safe_open(self.folder / SINGLE, "pt") as f:
                    self.files = dict.fromkeys(f.keys(), self.folder / SINGLE)
            else:
                raise TfuseError(
                    f"{label}: '{folder}' has neither {SINGLE} nor {INDEX}; streamed fusion reads safetensors "
                    "checkpoints (write them with save_pretrained)"
                )
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as err:
            raise TfuseError(f"{label}: cannot read the checkpoint index of '{folder}' ({err}); save it again") from err
        missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
        if missing:
            raise TfuseError(f"{label}: the index names the shard '{missing[0]}', which does not exist; copy it too")

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` (in ``dtype``; None: as stored)."""
        return self.read_many([name], dtype)[name]

    def read_many(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors ``names``, each file opened once and closed after: its pages are not kept
        mapped (they would count as resident memory for the rest of the run)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            try:
                with safe_open(file, "pt") as handle:
                    for name in group:
                        out[name] = handle.get_tensor(name)
            except SafetensorError as err:
                raise TfuseError(f"{self.label}: '{file}' is truncated or corrupt ({err}); copy or save it again") from err
        if dtype is not None:
            out = {n: t.to(dtype) if t.is_floating_point() else t for n, t in out.items()}
        return out

    def stored_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating-point tensor."""
        for name in sorted(self.files):
            with safe_open(self.files[name], "pt") as f:
                dtype = f.get_slice(name).get_dtype()
            if dtype in _FLOATS:
                return _FLOATS[dtype]
        return torch.float32


_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def empty(build: Callable[[], nn.Module], dtype: torch.dtype = torch.float32) -> nn.Module:
    """``build()`` with every parameter on the meta device (no memory) and real buffers (RoPE's
    frequencies are computed, not stored), built in ``dtype`` as ``from_pretrained`` would."""
    from accelerate import init_empty_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            model = build()
    finally:
        torch.set_default_dtype(default)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def check_tensors(model: nn.Module, aliases: dict[str, list[str]], key_of: dict[str, str], checkpoint: Checkpoint) -> None:
    """Every parameter of ``model`` (``aliases``: each one's names, tied ones together) is in the
    checkpoint (``key_of``: the model's name -> the checkpoint's key), and every tensor of the
    checkpoint is a parameter or buffer of the model; one line naming the first that is not."""
    stored = set(key_of)
    for name, names in aliases.items():
        if not any(a in stored for a in names):
            raise TfuseError(
                f"{checkpoint.label}: tensor '{name}' of the model is missing from the checkpoint in "
                f"'{checkpoint.folder}'; is it the architecture its config.json says, saved whole?"
            )
    known = {a for names in aliases.values() for a in names} | {n for n, _ in model.named_buffers()}
    unused = sorted(key_of[n] for n in stored - known)
    if unused:
        raise TfuseError(
            f"{checkpoint.label}: tensor '{unused[0]}' of the checkpoint in '{checkpoint.folder}' is not a parameter "
            f"of the {type(model).__name__} its config.json describes (and {len(unused) - 1} more); give a "
            "checkpoint of this family's architecture"
        )


def aliases_of(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's names (tied parameters share one entry, under their first name)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for prefix, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                name = f"{prefix}.{attr}" if prefix else attr
                out.setdefault(first.setdefault(id(p), name), []).append(name)
    return out


class LazyModel:
    """A model skeleton whose parameters are read from ``checkpoint`` when ``load``-ed and put
    back on the meta device when ``release``-d (tied parameters move together). ``renamed``: a
    checkpoint key -> the model's name for it, where they differ."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype | None = None, device: str = "cpu",
                 renamed: dict[str, str] | None = None):
        self.model, self.checkpoint, self.device = model, checkpoint, device
        self.dtype = dtype or checkpoint.stored_dtype()
        self.key_of = {(renamed or {}).get(key, key): key for key in checkpoint.names}  # model name -> checkpoint key
        for module in model.modules():  # the buffers are real (RoPE's frequencies, position ids): on the device now
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        self._index()
        self._check()

    def _index(self) -> None:
        self.aliases = aliases_of(self.model)
        modules = dict(self.model.named_modules())
        self.owners: dict[str, list[tuple[nn.Module, str]]] = {  # a parameter's name -> every (module, attr) holding it
            name: [(modules[a.rpartition(".")[0]], a.rpartition(".")[2]) for a in names]
            for name, names in self.aliases.items()
        }

    def _check(self) -> None:
        check_tensors(self.model, self.aliases, self.key_of, self.checkpoint)

    def names(self) -> list[str]:
        """Every parameter (tied ones once), in the model's order."""
        return list(self.owners)

    def stored_name(self, name: str) -> str:
        return self.key_of[next(a for a in self.aliases[name] if a in self.key_of)]

    def load(self, names: Iterable[str]) -> None:
        """Read parameters ``names`` from the checkpoint (those already loaded stay)."""
        wanted = [n for n in names if getattr(*self.owners[n][0]).is_meta]
        read = self.checkpoint.read_many([self.stored_name(n) for n in wanted], self.dtype)
        for name in wanted:
            self.set(name, read.pop(self.stored_name(name)).to(self.device))

    def tensor(self, name: str) -> torch.Tensor:
        module, attr = self.owners[name][0]
        return getattr(module, attr).detach()

    def set(self, name: str, value: torch.Tensor) -> None:
        """Parameter ``name`` (and its ties) holds ``value``."""
        param = nn.Parameter(value, requires_grad=value.is_floating_point())
        for module, attr in self.owners[name]:
            module._parameters[attr] = param

    def release(self, names: Iterable[str]) -> None:
        """Parameters ``names`` back on the meta device (their memory freed)."""
        for name in names:
            module, attr = self.owners[name][0]
            p = getattr(module, attr)
            if not p.is_meta:
                self.set(name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def load_buffers(self) -> None:
        """Buffers the checkpoint stores, read into the skeleton's real ones."""
        buffers = dict(self.model.named_buffers())
        for name in sorted(set(self.key_of) & set(buffers)):
            buffers[name].copy_(self.checkpoint.read(self.key_of[name]))

    def loaded(self) -> bool:
        return all(not getattr(*owners[0]).is_meta for owners in self.owners.values())

    def load_on_call(self) -> None:
        """Read the whole model the first time it is called (until released): code written for
        whole models (evaluation, finetuning) runs on it unchanged."""
        def whole(module, args):
            if not self.loaded():
                self.load(self.names())
                self.load_buffers()

        self.hook = self.model.register_forward_pre_hook(whole)

    def release_all(self) -> None:
        self.release(self.names())

    def twin(self) -> "LazyModel":
        """A second skeleton over the same checkpoint, never read whole on call (its parameters
        released first, so that the copy holds none)."""
        self.release_all()
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        if getattr(self, "hook", None) is not None:
            other.model._forward_pre_hooks.pop(self.hook.id, None)
            other.hook = None
        other._index()
        return other


def check_loaded(model, folder: str, label: str) -> None:
    """A model loaded whole from the safetensors in ``folder`` used every tensor there and left no
    parameter at its random init (transformers only warns of either)."""
    from transformers import PreTrainedModel

    if not any(Path(folder).glob("*.safetensors")):
        return
    checkpoint = Checkpoint(folder, label)
    renamed = renamed_keys(model, checkpoint, label, whole=True) if isinstance(model, PreTrainedModel) else {}
    names = {k: renamed.get(k, k) for k in checkpoint.names}
    key_of = {name: k for k, got in names.items() for name in ((got,) if isinstance(got, str) else got)}
    check_tensors(model, aliases_of(model), key_of, checkpoint)


def renamed_keys(model, checkpoint: Checkpoint, label: str, whole: bool = False) -> dict[str, str | tuple[str, ...]]:
    """Checkpoint key -> the model's parameter name, by transformers' own renamings (a ViT saved as
    ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj`` in the model);
    a tensor that transformers converts (splits, merges) cannot be read part by part. ``whole``:
    the model was loaded whole, so a tensor split on loading (DINOv2's SwiGLU ``weights_in``) maps
    to the names of its parts."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    names = dict.fromkeys(model.state_dict())
    out = {}
    for key in sorted(checkpoint.names):
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if renamed not in names and key in names:
            renamed, converted = key, None
        if converted is None:
            out[key] = renamed
            continue
        targets = next(c.target_patterns for c in converters if converted in c.source_patterns)
        if not whole:
            raise TfuseError(f"{label}: tensor '{key}' is converted by transformers when loaded ({converted}); "
                             "fusion.stream reads tensors as stored: fuse these parents whole (fusion.stream=false)")
        if targets[0] not in renamed:
            raise TfuseError(f"{label}: tensor '{key}' is converted by transformers when loaded ({converted}) into "
                             "names tfuse cannot trace; save the model with this transformers version and fuse that copy")
        out[key] = tuple(renamed.replace(targets[0], target, 1) for target in targets)
    return out
