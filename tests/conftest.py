"""Shared fixtures: tiny models built in the test, offline hub settings, seeded."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from threads, and lose much when cores are shared
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402


def tiny_vit(seed: int = 0, hidden: int = 32, mlp: int = 64, heads: int = 4, depth: int = 2) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
        image_size=8, patch_size=4, num_channels=1, num_labels=10,
    )
    return ViTForImageClassification(config).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def batches_of(x: torch.Tensor, size: int):
    """A calibration factory: fresh iterator of {"pixel_values": ...} batches."""
    return lambda: ({"pixel_values": x[i:i + size]} for i in range(0, len(x), size))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def tfuse(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the `tfuse` command in a fresh process, offline."""
    return subprocess.run(
        [sys.executable, "-m", "tfuse.cli", *args], cwd=cwd, env=CLI_ENV, capture_output=True, text=True, timeout=600
    )


def fuse_in_process(out: Path, *overrides: str) -> dict:
    """``tfuse fuse OVERRIDES`` without the shell: the overrides completed as the CLI completes them
    (the family read from the parents' config.json), the config composed as Hydra composes it, then
    run_fuse, which the CLI calls (its TfuseError is the CLI's one line; test_cli_errors.py checks
    that conversion from the shell). Give cache_dir and statistics_dir: the defaults are relative."""
    from rich.console import Console

    from tfuse.cli import command_overrides
    from tfuse.config_keys import _compose
    from tfuse.pipeline import run_fuse

    return run_fuse(_compose(command_overrides("fuse", list(overrides))), out, Console(quiet=True))


def headless_fuses_back(family, encoders: list, held: str, tmp_path: Path, *overrides: str) -> dict:
    """Headless image encoders (an original, then transformed copies) saved as their own
    checkpoints (``save_pretrained``, class ``held``) and fused with hard OT and no repair on
    scikit-learn's digits, the family read from their config.json: each parent got a ridge probe,
    every copy's probe is the original's transformed alike (the same logits), and the fused model
    is the original encoder with the original's probe. The results."""
    from omegaconf import OmegaConf

    from tfuse.config_keys import CONFIG_DIR
    from tfuse.tasks import build_task

    folders = [tmp_path / f"parent{i}" for i in range(len(encoders))]
    for encoder, folder in zip(encoders, folders):
        encoder.save_pretrained(folder)
    results = fuse_in_process(
        tmp_path / "run", f"parents=[{','.join(map(str, folders))}]", "data=digits", "data.max_train=300",
        "fusion.solver=emd", "fusion.repair=none", "finetune.steps=0", "fusion.samples=32", f"cache_dir={tmp_path / 'cache'}",
        f"statistics_dir={tmp_path / 'stats'}", *overrides)
    assert [p.get("head") for p in results["parents"]] == [f"headless {held}: a ridge probe on 300 training images"] * len(folders)
    task = build_task(OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "data" / "digits.yaml"), {"max_train": 300}), 256, "cpu")
    probed = [family.load(str(folder)) for folder in folders]
    for model in probed:
        assert model.tfuse_headless == held
        family.fit_head(model, task)
    x = task.data.test[0][:64]
    for model in probed[1:]:
        assert not torch.allclose(model.classifier.weight, probed[0].classifier.weight)
        torch.testing.assert_close(logits(model, x), logits(probed[0], x), atol=1e-5, rtol=1e-5)
    fused = dict(family.load(str(tmp_path / "run" / "fused")).named_parameters())
    for name, w in probed[0].named_parameters():
        torch.testing.assert_close(fused[name], w, atol=1e-5, rtol=0, msg=name)
    return results
