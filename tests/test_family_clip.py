"""The hf_clip family (CLIPForImageClassification): its graph's claims (stream and head
permutations; no signs, no rotations: LayerNorms centre, ``pre_layrnorm`` sits on the stream),
recovery of a transformed copy through the CLI from checkpoint directories, headless encoders
(CLIPVisionModel, CLIPModel's vision tower) given a ridge probe and fused back to the original's
encoder and probe, and its refusals."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPForImageClassification, CLIPModel, CLIPVisionModelWithProjection

from tfuse.arch import hf_clip, load_parent
from tfuse.errors import TfuseError
from tfuse.families import family_of
from tfuse.selftest import off_init, self_test
from tfuse.symmetry import symmetric_copy
from conftest import fuse_in_process, headless_fuses_back, tfuse, tiny_vit


def clip(seed: int = 0, side: int = 28, channels: int = 1) -> CLIPForImageClassification:
    """A tiny CLIP classifier for the default experiment's MNIST digits (28x28, one channel)."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=side,
                  patch_size=side // 2, num_channels=channels)
    return off_init(CLIPForImageClassification(CLIPConfig(vision_config=vision, num_labels=10)), seed)  # gains off 1


def failed(checks) -> list[str]:
    return [c.name for c in checks if not c.passed]


def test_the_self_test_passes() -> None:
    checks = self_test(hf_clip.tiny(), hf_clip.graph)
    assert not failed(checks) and len(checks) == 4  # no rotation checks: the graph claims none


def test_a_wrong_claim_fails(monkeypatch) -> None:
    """LayerNorm centres the stream: no sign flips. And ``pre_layrnorm`` is a second norm on
    stream point 0, whose gain sits on the stream itself: no fold takes it, so no rotations."""
    true_graph = hf_clip.graph

    def signed(model):
        graph = true_graph(model)
        graph.signed |= set(graph.stream_points()) | {r.branch for r in graph.residuals}
        return graph

    assert "a copy under the graph's symmetries computes the same outputs" in failed(self_test(hf_clip.tiny(), signed))

    def rotating(model):
        graph = true_graph(model)
        graph.rotations = "centred"
        return graph

    monkeypatch.setattr(hf_clip, "graph", rotating)  # folded() reads the family's graph too
    with pytest.raises(TfuseError, match="two norms write space 'stream.0'"):
        self_test(hf_clip.tiny(), hf_clip.graph)


def test_the_cli_recovers_a_transformed_copy_from_checkpoint_directories(tmp_path: Path) -> None:
    model = clip()
    twin = symmetric_copy(model, hf_clip.graph(model), seed=3)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(twin.classifier.weight, model.classifier.weight)  # the classifier reads the permuted stream
        torch.testing.assert_close(twin(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    hf_clip.save(model, str(a))
    hf_clip.save(twin, str(b))
    proc = tfuse("fuse", f"parents=[{a},{b}]", "fusion.solver=emd", "fusion.repair=none", "finetune.steps=0",
                 "data.max_train=64", "fusion.samples=32", f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}",
                 f"statistics_dir={tmp_path / 'stats'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(hf_clip, read from their config.json)" in proc.stderr  # no model=: the family came from config.json
    fused = hf_clip.load(str(out / "fused")).eval()
    for name, w in fused.named_parameters():
        torch.testing.assert_close(w, dict(model.named_parameters())[name], atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_checkpoints_are_detected_and_foreign_ones_refused(tmp_path: Path) -> None:
    hf_clip.save(clip(side=8, channels=3), str(tmp_path / "clip"))
    assert family_of(json.loads((tmp_path / "clip" / "config.json").read_text()), "clip") == "hf_clip"
    tiny_vit().save_pretrained(tmp_path / "vit")
    with pytest.raises(TfuseError, match=r"holds a ViTForImageClassification \('vit'\) checkpoint, which "
                                         r"model.family=hf_clip does not own") as err:
        hf_clip.load(str(tmp_path / "vit"))
    assert "\n" not in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPSomething"]}))
    with pytest.raises(TfuseError, match=r"holds a CLIPSomething, neither a CLIPForImageClassification nor a headless "
                                         r"CLIPVisionModel or CLIPModel") as err:
        hf_clip.load(str(tmp_path / "other"))
    assert "\n" not in str(err.value)


def test_a_headless_encoder_and_its_copy_fuse_back_to_it_and_its_ridge_probe(tmp_path: Path) -> None:
    """A CLIPVisionModel has no classifier: each parent gets a ridge probe fitted alike on the task,
    the copy's the original's permuted, so the fused model is the original encoder and probe."""
    model = clip(side=8)
    twin = symmetric_copy(model, hf_clip.graph(model), seed=3)
    results = headless_fuses_back(hf_clip, [model.vision_model, twin.vision_model], "CLIPVisionModel", tmp_path)
    card = (tmp_path / "run" / "fused" / "README.md").read_text()
    assert "- parent 1: headless CLIPVisionModel: a ridge probe on 300 training images" in card
    one_shot = results["one_shot"]
    assert one_shot["parent_0"]["accuracy"] > 0.5  # a random encoder's probe, well above chance (0.1) on the digits
    assert one_shot["ot"]["accuracy"] == one_shot["parent_0"]["accuracy"]


def tower_loads(checkpoint, model, folder: Path, held: str):
    """``checkpoint`` carrying ``model``'s vision tower, saved and loaded by the family: marked
    headless as its class, the tower's weights exactly ``model``'s."""
    checkpoint.vision_model.load_state_dict(model.vision_model.state_dict())
    checkpoint.save_pretrained(folder)
    loaded = hf_clip.load(str(folder))
    assert loaded.tfuse_headless == held
    for name, w in model.vision_model.named_parameters():
        torch.testing.assert_close(loaded.vision_model.get_parameter(name), w, atol=0, rtol=0)
    return loaded


def test_a_clip_models_vision_tower_loads_with_its_text_tower_unused(tmp_path: Path) -> None:
    model = clip(side=8)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=40,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    pair = CLIPModel(CLIPConfig(vision_config=model.config.vision_config.to_dict(), text_config=text, projection_dim=8))
    loaded = tower_loads(pair, model, tmp_path / "pair", "CLIPModel")
    assert not hasattr(loaded, "text_model")
    assert not failed(self_test(loaded, hf_clip.graph))  # check-family on it: its placeholder head reads the encoder


def test_a_vision_model_with_projection_loads_its_tower_with_the_projection_unused(tmp_path: Path) -> None:
    model = clip(side=8)
    tower = CLIPVisionModelWithProjection(model.config.vision_config)
    loaded = tower_loads(tower, model, tmp_path / "tower", "CLIPVisionModelWithProjection")
    assert not hasattr(loaded, "visual_projection")


def test_a_headless_parent_is_not_streamed(tmp_path: Path) -> None:
    clip(side=8).vision_model.save_pretrained(tmp_path / "a")
    with pytest.raises(TfuseError, match=r"parents\[0\] is a headless encoder whose head was fitted in memory, but "
                                         r"fusion.stream reads weights as stored; .*\(fusion.stream=false\)") as err:
        fuse_in_process(tmp_path / "run", f"parents=[{tmp_path / 'a'},{tmp_path / 'a'}]", "data=digits", "data.max_train=50",
                        "fusion.stream=true", f"cache_dir={tmp_path / 'cache'}", f"statistics_dir={tmp_path / 'stats'}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flaw", ["extra", "missing"])
def test_a_headless_encoder_with_an_unknown_or_a_missing_weight_is_refused(flaw: str, tmp_path: Path) -> None:
    clip(side=8).vision_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    if flaw == "extra":
        weights["encoder.layers.0.extra.weight"] = torch.zeros(2)
    else:
        del weights["encoder.layers.1.mlp.fc2.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    name = "encoder.layers.0.extra.weight" if flaw == "extra" else "encoder.layers.1.mlp.fc2.bias"
    with pytest.raises(TfuseError, match=rf"headless CLIPVisionModel: tensor '{re.escape(name)}' ") as err:
        load_parent(str(tmp_path), "hf_clip", "parents[0]")
    assert "\n" not in str(err.value)


def test_widened_sets_the_mlp_width_of_the_vision_config() -> None:
    wide = hf_clip.widened(hf_clip.tiny(), 80)
    assert all(layer.mlp.fc1.out_features == 80 for layer in wide.vision_model.encoder.layers)
    assert wide.config.vision_config.intermediate_size == 80 and hf_clip.tiny().config.vision_config.intermediate_size == 48
