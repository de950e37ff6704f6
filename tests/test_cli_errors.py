"""The command line's answers to bad input, and `tfuse train`. One bad run goes through the shell
(exit status 2, one line, no traceback: the CLI's conversion of a TfuseError); the others call
the run in-process (the config composed as Hydra composes it, then run_fuse, which the CLI calls)
and check the TfuseError's message. Unknown keys are caught before anything runs: from the shell."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import ViTForImageClassification

from conftest import fuse_in_process, tfuse, tiny_vit
from tfuse.errors import TfuseError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Tiny untrained parents of the digits experiment's shape, and broken ones."""
    root = tmp_path_factory.mktemp("cli_errors")
    tiny_vit(seed=0).save_pretrained(root / "ok_a")
    tiny_vit(seed=1).save_pretrained(root / "ok_b")
    tiny_vit(depth=3).save_pretrained(root / "depth3")
    shutil.copytree(root / "ok_a", root / "broken")
    weights = root / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    model = tiny_vit()
    with torch.no_grad():
        model.vit.layers[1].mlp.fc1.weight.fill_(float("nan"))
    model.save_pretrained(root / "nan_a")
    return root


def run_in_process(workdir: Path, out: Path, *overrides: str) -> dict:
    """``tfuse fuse +experiment=vit_digits_tiny finetune.steps=0 OVERRIDES``, without the shell."""
    return fuse_in_process(out, "+experiment=vit_digits_tiny", "finetune.steps=0", f"cache_dir={workdir / 'parents'}",
                           f"statistics_dir={workdir / 'stats'}", *overrides)


def test_a_missing_checkpoint_from_the_shell_is_one_line_and_exit_2(workdir: Path):
    out = workdir / "bad_missing"
    proc = tfuse("fuse", "+experiment=vit_digits_tiny", "finetune.steps=0", f"parents=[{workdir / 'nope_a'},{workdir / 'nope_b'}]",
                 f"hydra.run.dir={out}", cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "nope_a" in proc.stderr and "does not exist" in proc.stderr
    assert not (out / "results.json").exists()


@pytest.mark.parametrize(("overrides", "says"), [
    pytest.param(["parents=[{d}/broken,{d}/ok_b]"], ["parents[0]: '{d}/broken/model.safetensors' is truncated or corrupt",
                                                     "save the checkpoint again"], id="truncated_weights"),
    pytest.param(["parents=[{d}/ok_a,{d}/depth3]"], ["different depths", "num_hidden_layers 2 vs 3"], id="different_depths"),
    pytest.param(["parents=[{d}/nan_a,{d}/ok_b]"], ["layers.1.mlp", "NaN"], id="nan_weights"),
    pytest.param(["fusion.residual=sum"], ["fusion.residual='sum'", "weighted_matrix"], id="unknown_option"),
    pytest.param(["fusion.repair=refit"], ["fusion.repair='refit'", "lstsq"], id="unknown_repair"),
    pytest.param(["data=cifar10", "data.path={d}/no_cifar"], ["no_cifar", "data.path"], id="missing_data_path"),
    pytest.param(["parents=[{d}/ok_a,{d}/ok_b]", "finetune.steps=2", "finetune.teacher=oracle"], ["finetune.teacher='oracle'", "ensemble"],
                 id="unknown_teacher"),
])
def test_bad_input_is_a_clear_error(workdir: Path, tmp_path: Path, overrides: list[str], says: list[str]):
    """Each names the file, layer or key and what to give instead; the run writes no results."""
    out = tmp_path / "run"
    with pytest.raises(TfuseError) as raised:
        run_in_process(workdir, out, *(o.format(d=workdir) for o in overrides))
    for part in says:
        assert part.format(d=workdir) in str(raised.value)
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("given", [["fusion.regg=0.1"], ["+fusion.regg=0.1"], ["-m", "fusion.regg=0.1,0.2"]])
def test_an_unknown_key_is_one_line_naming_the_closest(workdir: Path, given: list[str]):
    """Caught before anything runs (given, appended or swept), in one line and exit status 2."""
    proc = tfuse("fuse", *given, "+experiment=vit_digits_tiny", f"hydra.run.dir={workdir / 'unknown'}", cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unknown key 'fusion.regg'; did you mean fusion.reg?" in proc.stderr
    assert not (workdir / "unknown").exists()


def test_an_unknown_group_option_names_the_closest(workdir: Path):
    proc = tfuse("fuse", "+experiment=vit_digits_tiy", cwd=workdir)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unknown experiment 'vit_digits_tiy'; did you mean vit_digits_tiny?" in proc.stderr


def test_an_unknown_fusion_setting_reaching_the_pipeline_names_the_closest():
    from tfuse.config_keys import fusion_file_keys, known_fusion_settings
    from tfuse.errors import check_fusion_keys
    from tfuse.fusion.methods import settings_from_config

    assert fusion_file_keys() == known_fusion_settings()  # what the command line checks, without torch
    with pytest.raises(TfuseError, match=r"unknown key 'fusion.regg'; did you mean fusion.reg\?"):
        check_fusion_keys({"method": "ot", "regg": 0.1}, known_fusion_settings())
    with pytest.raises(TfuseError, match=r"unknown key 'fusion.regg'; did you mean fusion.reg\?"):
        settings_from_config({"method": "ot", "regg": 0.1})  # the settings' own check, the same line


def test_train_one_parent(workdir: Path):
    out = workdir / "train"
    proc = tfuse("train", "+experiment=vit_digits_tiny", "seed=3", "train.epochs=1", f"hydra.run.dir={out}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["seed"] == 3 and 0 <= metrics["test"]["accuracy"] <= 1
    assert ViTForImageClassification.from_pretrained(out / "model").config.hidden_size == 32
