"""`tfuse fuse fusion.stream=true`: the same table as the whole-model run (repaired alike, the
vanilla control streamed too), from recipe parents and from checkpoint directories; the VF
control can be switched off; what streaming does not do is refused in one line."""
import json
from pathlib import Path

import pytest

from conftest import fuse_in_process
from tfuse.errors import TfuseError

RUN = ("+experiment=llama_pydoc_tiny", "fusion.repair=lstsq", "fusion.repair_samples=64", "finetune.steps=0")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stream_cli")


def run(workdir: Path, name: str, *overrides: str) -> dict:
    fuse_in_process(workdir / name, *RUN, *overrides, f"cache_dir={workdir / 'parents'}",
                    f"statistics_dir={workdir / 'stats'}")
    return json.loads((workdir / name / "results.json").read_text())


@pytest.fixture(scope="module")
def whole(workdir: Path) -> dict:
    return run(workdir, "whole")


def test_a_streamed_run_scores_as_the_whole_model_run(workdir: Path, whole: dict):
    streamed = run(workdir, "streamed", "fusion.stream=true", "fusion.memory_gb=0")
    for name in ("parent_0", "parent_1", "ensemble", "vanilla", "ot"):
        assert streamed["one_shot"][name]["loss"] == pytest.approx(whole["one_shot"][name]["loss"], abs=1e-4), name
    assert set(streamed["repair"]) == {"vanilla", "ot"}
    assert streamed["repair"]["ot"]["mean_error_after"] == pytest.approx(whole["repair"]["ot"]["mean_error_after"], rel=1e-3)
    assert streamed["methods"]["ot"]["boundary_cache"]["budget_bytes"] == 0  # every boundary state went to disk
    assert (workdir / "streamed" / "fused" / "model.safetensors").exists()


def test_streamed_checkpoint_directories_without_the_control(workdir: Path, whole: dict):
    a, b = sorted((workdir / "parents").glob("hf_llama-*"))
    given = run(workdir, "given", f"parents=[{a},{b}]", "fusion.stream=true", "fusion.control=false")
    assert "vanilla" not in given["one_shot"]
    assert given["one_shot"]["ot"]["loss"] == pytest.approx(whole["one_shot"]["ot"]["loss"], abs=1e-4)


@pytest.mark.parametrize("bad, says", [
    ("fusion.method=weight_matching", "fusion.stream fuses with fusion.method=ot"),
    ("fusion.iterations=2", "fusion.iterations=2 must be 1"),
])
def test_what_streaming_does_not_do_is_one_line(workdir: Path, whole: dict, bad: str, says: str):
    with pytest.raises(TfuseError, match=says):
        run(workdir, "bad", "fusion.stream=true", bad)
