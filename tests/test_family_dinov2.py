"""The hf_dinov2 family (Dinov2ForImageClassification, GELU or SwiGLU MLP): its graph's claims
(stream and head permutations, LayerScale gains in their branch, SwiGLU's signed up/down pairs;
no rotations), recovery of a transformed copy through the CLI from checkpoint directories, a
headless Dinov2Model given a ridge probe and fused back to the original's encoder and probe, and
its refusals."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Dinov2Config, Dinov2ForImageClassification

from tfuse.arch import hf_dinov2
from tfuse.arch.lazy import lazy_parent
from tfuse.errors import TfuseError
from tfuse.families import family_of
from tfuse.fusion.graph import Out
from tfuse.selftest import off_init, self_test
from tfuse.symmetry import symmetric_copy
from conftest import headless_fuses_back, tfuse, tiny_vit


def dinov2(swiglu: bool, seed: int = 0, side: int = 28, channels: int = 1) -> Dinov2ForImageClassification:
    """A tiny DINOv2 classifier for the default experiment's MNIST digits (28x28, one channel)."""
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, use_swiglu_ffn=swiglu,
                          image_size=side, patch_size=side // 2, num_channels=channels, num_labels=10)
    return off_init(Dinov2ForImageClassification(config), seed)  # LayerScale gains and shifts off their init


def failed(checks) -> list[str]:
    return [c.name for c in checks if not c.passed]


@pytest.mark.parametrize("swiglu", [False, True])
def test_the_self_test_passes_for_either_mlp(swiglu: bool) -> None:
    model = hf_dinov2.tiny(swiglu)
    assert hasattr(model.dinov2.encoder.layer[0].mlp, "gate_proj") == swiglu
    checks = self_test(model, hf_dinov2.graph)
    assert not failed(checks) and len(checks) == 4  # no rotation checks: the graph claims none
    assert bool(hf_dinov2.graph(model).signed) == swiglu  # SwiGLU's hidden units flip sign (and the self-test flips them)


@pytest.mark.parametrize("claim", ["gelu_signs", "gate_signs", "rotations"])
def test_a_wrong_claim_fails(claim: str, monkeypatch) -> None:
    """GELU is not odd (its units keep their sign), nor is SiLU (the gate row keeps its sign), and
    LayerScale's per-channel gain on each branch does not commute with a rotation of the stream."""
    true_graph = hf_dinov2.graph

    def wrong(model):
        graph = true_graph(model)
        if claim == "gelu_signs":
            graph.signed |= {f"layers.{i}.mlp" for i in range(2)}
        elif claim == "gate_signs":
            for name, axes in graph.params.items():
                if ".gate_proj." in name:
                    graph.params[name] = tuple(Out(a.space) if isinstance(a, Out) else a for a in axes)
        else:
            graph.rotations = "centred"
        return graph

    monkeypatch.setattr(hf_dinov2, "graph", wrong)  # folded() reads the family's graph too
    names = failed(self_test(hf_dinov2.tiny(swiglu=claim == "gate_signs"), hf_dinov2.graph))
    expected = "a rotated copy" if claim == "rotations" else "a copy under the graph's symmetries"
    assert any(name.startswith(expected) for name in names), names


def test_the_cli_recovers_a_signed_copy_of_a_swiglu_dinov2_from_checkpoint_directories(tmp_path: Path) -> None:
    model = dinov2(swiglu=True)
    twin = symmetric_copy(model, hf_dinov2.graph(model), seed=3, signs=True)
    mine, theirs = model.dinov2.encoder.layer[0].mlp.up_proj.bias, twin.dinov2.encoder.layer[0].mlp.up_proj.bias
    assert (theirs[:, None] == -mine[None]).any(1).sum() > 0  # some up units flipped sign
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(twin(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    hf_dinov2.save(model, str(a))
    hf_dinov2.save(twin, str(b))
    proc = tfuse("fuse", f"parents=[{a},{b}]", "fusion.solver=emd", "fusion.repair=none", "fusion.signs=true",
                 "finetune.steps=0", "data.max_train=64", "fusion.samples=32", f"hydra.run.dir={out}",
                 f"cache_dir={tmp_path / 'cache'}", f"statistics_dir={tmp_path / 'stats'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(hf_dinov2, read from their config.json)" in proc.stderr  # no model=: the family came from config.json
    fused = hf_dinov2.load(str(out / "fused")).eval()
    for name, w in fused.named_parameters():
        torch.testing.assert_close(w, dict(model.named_parameters())[name], atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_checkpoints_are_detected_and_foreign_ones_refused(tmp_path: Path) -> None:
    hf_dinov2.save(dinov2(swiglu=True, side=8, channels=3), str(tmp_path / "dinov2"))
    assert family_of(json.loads((tmp_path / "dinov2" / "config.json").read_text()), "dinov2") == "hf_dinov2"
    # saved as the original layout: SwiGLU's gate and up rows in one ``weights_in``, which only a whole load splits
    with pytest.raises(TfuseError, match=r"mlp.weights_in.* fuse these parents whole \(fusion.stream=false\)"):
        lazy_parent(str(tmp_path / "dinov2"), "hf_dinov2", "parents[0]")
    tiny_vit().save_pretrained(tmp_path / "vit")
    with pytest.raises(TfuseError, match=r"holds a ViTForImageClassification \('vit'\) checkpoint, which "
                                         r"model.family=hf_dinov2 does not own") as err:
        hf_dinov2.load(str(tmp_path / "vit"))
    assert "\n" not in str(err.value)



def test_a_headless_swiglu_encoder_and_its_signed_copy_fuse_back_to_it_and_its_ridge_probe(tmp_path: Path) -> None:
    """A Dinov2Model has no classifier: each parent gets a ridge probe fitted alike on what the
    classifier reads (class token and patch mean, both permuted alike), as hf_clip's do."""
    model = dinov2(swiglu=True, side=8)
    twin = symmetric_copy(model, hf_dinov2.graph(model), seed=3, signs=True)
    results = headless_fuses_back(hf_dinov2, [model.dinov2, twin.dinov2], "Dinov2Model", tmp_path, "fusion.signs=true")
    one_shot = results["one_shot"]
    assert one_shot["parent_0"]["accuracy"] > 0.5  # a random encoder's probe, well above chance (0.1) on the digits
    assert one_shot["ot"]["accuracy"] == one_shot["parent_0"]["accuracy"]


@pytest.mark.parametrize(("swiglu", "units", "allowed"), [(False, 96, True), (False, 80, False),
                                                          (True, 88, True), (True, 72, False)])
def test_widened_takes_the_widths_an_integer_mlp_ratio_gives(swiglu: bool, units: int, allowed: bool) -> None:
    model = hf_dinov2.tiny(swiglu)
    if not allowed:
        with pytest.raises(TfuseError, match=rf"cannot have {units} MLP units: .*integer mlp_ratio \(nearest: "):
            hf_dinov2.widened(model, units)
        return
    wide = hf_dinov2.widened(model, units)
    layer = wide.dinov2.encoder.layer[1].mlp
    assert (layer.up_proj if swiglu else layer.fc1).out_features == units


def test_build_sizes_the_model_for_the_task_and_refuses_a_fractional_mlp_ratio() -> None:
    data = OmegaConf.create({"image_size": 8, "channels": 1, "num_classes": 10})
    task = OmegaConf.create({"data": data})
    cfg = OmegaConf.create({"hidden_size": 32, "depth": 2, "heads": 4, "mlp_size": 64, "patch_size": 4, "swiglu": True})
    model = hf_dinov2.build(cfg, task)
    assert model.dinov2.encoder.layer[0].mlp.up_proj.out_features == 48  # two thirds of 64, rounded up to 8
    assert model(pixel_values=torch.randn(2, 1, 8, 8)).logits.shape == (2, 10)
    with pytest.raises(TfuseError, match=r"model.mlp_size=48: a DINOv2's MLP is an integer multiple"):
        hf_dinov2.build(OmegaConf.merge(cfg, {"mlp_size": 48}), task)
