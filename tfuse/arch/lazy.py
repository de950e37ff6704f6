"""Parents read lazily: a family's model built on the meta device from a checkpoint directory's
config.json, its weights read part by part from the directory's safetensors (``tfuse.checkpoint``)."""
from __future__ import annotations

from pathlib import Path

import torch

from tfuse.arch import family
from tfuse.arch.base import TokenizedFamily
from tfuse.checkpoint import Checkpoint, LazyModel, empty, renamed_keys
from tfuse.errors import TfuseError


def lazy_parent(source: str, family_name: str, label: str, dtype: torch.dtype | None = None,
                device: str = "cpu") -> LazyModel:
    """Parent ``source`` (a local checkpoint directory) as a skeleton of ``family_name``'s model,
    its weights in ``dtype`` (None: as stored) read on ``device`` when a part is loaded."""
    import transformers

    path = Path(source).expanduser()
    if not path.is_dir():
        raise TfuseError(f"{label}: fusion.stream reads parents from local checkpoint directories; '{source}' is not "
                         "one (download it first, e.g. with `hf download`)")
    fam = family(family_name)
    if isinstance(fam, TokenizedFamily):
        fam.check_directory(str(path), label)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise TfuseError(f"{label}: '{path}/config.json' is not a readable model config ({err})") from err
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise TfuseError(f"{label}: config.json names the architecture {arch or 'none'!r}, which transformers does "
                         "not know; give a checkpoint written by save_pretrained")
    checkpoint = Checkpoint(path, label)
    dtype = dtype or checkpoint.stored_dtype()
    model = empty(lambda: cls(config), dtype).eval()
    if not fam.owns(model):
        raise TfuseError(f"{label}: '{path}' holds a {arch}, which model.family={family_name} does not own; choose "
                         "the family of that architecture")
    if isinstance(fam, TokenizedFamily):
        fam.attach_tokenizer(model, fam.load_tokenizer(str(path)))
    return LazyModel(model, checkpoint, dtype, device, renamed_keys(model, checkpoint, label))
