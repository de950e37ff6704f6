"""fused/ and finetuned/: the configured method's models, each with its model card."""
from __future__ import annotations

import errno
import shlex
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from tfuse.arch import family_for
from tfuse.card import model_card, weights_sha256
from tfuse.errors import TfuseError
from tfuse.fusion.methods import label_of
from tfuse.io import new_directory
from tfuse.pipeline.state import Fused, Setup, Tuned


def save_models(setup: Setup, fused: Fused, tuned: Tuned, results: dict, out_dir: Path) -> None:
    """fused/ and finetuned/: the configured method's model, each with its model card and the
    parents' preprocessing file when they carried one."""
    main = setup.settings.method
    fam = family_for(setup.models[0])
    parents = [{**entry, **dict(zip(("hashed", "sha256"), weights_sha256(p.source, p.model)))}
               for entry, p in zip(results["parents"], setup.parents)]
    norm = getattr(getattr(setup.task, "data", None), "normalization", None)
    extra = [Path(norm.source)] if norm is not None else []
    command = _command_line(out_dir)
    for kind, models in (("fused", fused.models), ("finetuned", tuned.models)):
        if main in models:
            card = model_card(kind, main, label_of(main), results, parents, command)
            _save_model(fam, models[main], out_dir / kind, card, extra)


def _save_model(fam, model, path: Path, card: str, extra: list[Path]) -> None:
    """The model, its card and ``extra`` files that travel with it (the parents' preprocessing),
    written whole or not at all (a full disk is one line naming the bytes needed)."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise TfuseError(f"{path}: the disk is full: the model needs {need} bytes and {free} are free; free space "
                         "there or choose another hydra.run.dir")
    with new_directory(path) as tmp:
        try:
            fam.save(model, str(tmp))
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise TfuseError(f"{path}: the disk filled while writing the model ({need} bytes needed); free space "
                             "there and run again") from err
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for file in extra:
            if not (tmp / file.name).exists():  # timm keeps its preprocessing in config.json: the family's own
                shutil.copyfile(file, tmp / file.name)


def _command_line(out_dir: Path) -> str:
    """``tfuse fuse`` with the run's overrides (as Hydra recorded them)."""
    recorded = out_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(recorded) if recorded.exists() else []
    return " ".join(["tfuse fuse", *(shlex.quote(str(o)) for o in overrides)])
