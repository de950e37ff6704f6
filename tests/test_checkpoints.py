"""Checkpoints as users have them: their own image preprocessing, hub ids with a revision."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import ViTImageProcessor

from tfuse.arch import hf_vit, hub_revision, load_parent
from tfuse.data.images import Normalization, load_images
from tfuse.errors import TfuseError
from tfuse.tasks import build_task
from conftest import tiny_vit

DIGITS = OmegaConf.create({"kind": "images", "name": "digits", "path": None, "val_fraction": 0.1,
                           "test_fraction": 0.2, "seed": 0, "max_train": None})


def checkpoint(folder: Path, seed: int = 0, **processor) -> str:
    """A saved tiny ViT for 8x8 one-channel images with a preprocessor config (unless ``None``)."""
    hf_vit.save(tiny_vit(seed), str(folder))
    if processor.get("size") is not None:
        ViTImageProcessor(**processor).save_pretrained(str(folder))
    return str(folder)


PROCESSOR = dict(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.25], do_rescale=True, rescale_factor=1 / 255)


def test_images_are_normalised_as_the_checkpoints_preprocessor_says(tmp_path: Path) -> None:
    parents = [checkpoint(tmp_path / "a", 0, **PROCESSOR), checkpoint(tmp_path / "b", 1, **PROCESSOR)]
    task = build_task(DIGITS, 64, "cpu", parents, "hf_vit")
    raw = load_images("digits", normalization=Normalization((0.0,), (1.0,), 1.0, (8, 8), "raw"))  # pixels in [0, 1]
    for split in ("train", "val", "test"):
        torch.testing.assert_close(getattr(task.data, split)[0], (getattr(raw, split)[0] - 0.5) / 0.25)
    own = build_task(DIGITS, 64, "cpu", [checkpoint(tmp_path / "c"), checkpoint(tmp_path / "d", 1)], "hf_vit")
    assert abs(float(own.data.train[0].mean())) < 1e-4  # no preprocessor: the training split's statistics


def test_parents_that_preprocess_differently_are_refused(tmp_path: Path) -> None:
    a = checkpoint(tmp_path / "a", **PROCESSOR)
    b = checkpoint(tmp_path / "b", 1, **{**PROCESSOR, "image_std": [0.3]})
    with pytest.raises(TfuseError, match=r"a/preprocessor_config.json and .*b/preprocessor_config.json preprocess images differently"):
        build_task(DIGITS, 64, "cpu", [a, b], "hf_vit")
    with pytest.raises(TfuseError, match=r"parents\[1\] .* carries no preprocessing but .*a/preprocessor_config.json does"):
        build_task(DIGITS, 64, "cpu", [a, checkpoint(tmp_path / "c", 2)], "hf_vit")


def test_data_of_another_size_than_the_preprocessor_is_refused(tmp_path: Path) -> None:
    big = {**PROCESSOR, "size": {"height": 224, "width": 224}}
    parents = [checkpoint(tmp_path / "a", **big), checkpoint(tmp_path / "b", 1, **big)]
    with pytest.raises(TfuseError, match=r"the parents expect 224x224 images but data.name=digits has 8x8"):
        build_task(DIGITS, 64, "cpu", parents, "hf_vit")


@pytest.mark.parametrize(("source", "expected"), [
    ("org/vit@v1.0", ("org/vit", "v1.0")),
    ("org/vit", ("org/vit", None)),
    ("/data/run@3", ("/data/run@3", None)),
    ("./ckpt@x", ("./ckpt@x", None)),
])
def test_hub_ids_take_a_revision(source: str, expected: tuple) -> None:
    assert hub_revision(source) == expected


def test_a_revision_reaches_the_family_loader(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(hf_vit, "load", lambda path, revision=None, dtype="auto": seen.update(path=path, revision=revision) or tiny_vit())
    load_parent("org/vit@abc123", "hf_vit", "parents[0]")
    assert seen == {"path": "org/vit", "revision": "abc123"}


def test_a_run_on_such_checkpoints_passes_their_preprocessing_on(tmp_path: Path) -> None:
    """In-process (the config as Hydra composes it, then run_fuse): the shell adds nothing here."""
    from conftest import fuse_in_process

    parents = [checkpoint(tmp_path / "a", 0, **PROCESSOR), checkpoint(tmp_path / "b", 1, **PROCESSOR)]
    out = tmp_path / "run"
    fuse_in_process(out, "+experiment=vit_digits_tiny", f"parents=[{parents[0]},{parents[1]}]", "finetune.steps=0",
                    f"statistics_dir={tmp_path / 'stats'}")
    copied = ViTImageProcessor.from_pretrained(str(out / "fused"))
    assert list(copied.image_mean) == [0.5] and list(copied.image_std) == [0.25]
    assert hf_vit.load(str(out / "fused")) is not None


def timm_checkpoint(folder: Path, seed: int) -> str:
    """A tiny timm ViT saved by timm itself (``save_for_hf``: model_args and pretrained_cfg)."""
    from timm.models import save_for_hf

    from test_timm import tiny_timm

    save_for_hf(tiny_timm(seed), str(folder), safe_serialization=True)
    return str(folder)


def test_timm_checkpoints_load_with_their_pretrained_cfg(tmp_path: Path) -> None:
    from tfuse.arch import timm_vit

    from test_timm import tiny_timm

    parents = [timm_checkpoint(tmp_path / "a", 0), timm_checkpoint(tmp_path / "b", 1)]
    loaded = load_parent(parents[0], "timm_vit", "parents[0]")
    for name, w in tiny_timm(0).state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], w, msg=name)
    norm = timm_vit.preprocessing(parents[0])
    assert (norm.mean, norm.std, norm.scale, norm.size) == ((0.5,), (0.5,), 1.0, (8, 8))
    task = build_task(DIGITS, 64, "cpu", parents, "timm_vit")
    raw = load_images("digits", normalization=Normalization((0.0,), (1.0,), 1.0, (8, 8), "raw"))
    torch.testing.assert_close(task.data.test[0], (raw.test[0] - 0.5) / 0.5)
    own = tmp_path / "own"
    timm_vit.save(loaded, str(own))  # tfuse's format: trained on the data's own statistics
    assert timm_vit.preprocessing(str(own)) is None
    assert isinstance(timm_vit.load(str(own)), type(loaded))


def test_loading_checks_the_model_type_and_every_tensor(tmp_path) -> None:
    """A foreign checkpoint, a missing tensor or an unused one ends in one line: a parent is never
    silently random."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=8, patch_size=4)).save_pretrained(tmp_path / "clip")
    with pytest.raises(TfuseError, match="holds a CLIPVisionModel .* which model.family=hf_vit does not own"):
        load_parent(str(tmp_path / "clip"), "hf_vit", "parents[0]")
    tiny_vit().save_pretrained(tmp_path / "vit")
    weights = load_file(tmp_path / "vit" / "model.safetensors")
    dropped = next(k for k in weights if k.endswith("key.weight"))
    for name, tensors in (("missing", {k: v for k, v in weights.items() if k != dropped}),
                          ("extra", {**weights, "vit.encoder.layer.0.adapter.weight": torch.zeros(2)})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "vit" / "config.json").read_text())
        save_file(tensors, tmp_path / name / "model.safetensors")
    with pytest.raises(TfuseError, match=r"tensor 'vit\.layers\.0\.attention\.k_proj\.weight' of the model is missing"):
        load_parent(str(tmp_path / "missing"), "hf_vit", "parents[0]")
    with pytest.raises(TfuseError, match=r"tensor 'vit\.encoder\.layer\.0\.adapter\.weight' of the checkpoint .* is not a parameter"):
        load_parent(str(tmp_path / "extra"), "hf_vit", "parents[0]")
