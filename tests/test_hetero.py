"""Heterogeneous fusion (METHOD.md sections 2 and 4): rectangular maps, widened-copy recovery,
different depths refused."""
import itertools

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from tfuse.arch import check_same_architecture, hf_vit, timm_vit
from tfuse.errors import TfuseError
from tfuse.fusion.apply import _in, _out, _side
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.symmetry import widened_copy
from conftest import batches_of, logits, tiny_vit

identity = lambda batch: batch  # noqa: E731


def apply_out(w: torch.Tensor, axis: int, t: torch.Tensor) -> torch.Tensor:
    """Barycentres of the rows along ``axis`` under the map ``t`` (n_a x n_b), as ``align`` applies it."""
    return _out(w, axis, _side(t, True, w.dtype))


def apply_in(w: torch.Tensor, axis: int, t: torch.Tensor) -> torch.Tensor:
    """The consumer's columns along ``axis`` re-weighted by T / mu, as ``align`` applies it."""
    return _in(w, axis, _side(t, False, w.dtype))


def vit(seed=0, hidden=32, mlp=64, head_dim=8, depth=2, heads=4):
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
        head_dim=head_dim, image_size=8, patch_size=4, num_channels=1, num_labels=10,
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms, so that duplicating gamma/beta is tested
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def fuse(models, settings, x, anchor):
    graph = hf_vit.graph(models[anchor])
    return ot_fuse(models, graph, settings, anchor, batches_of(x, 16), identity)


WIDENINGS = {
    "mlp": (dict(mlp=128), ["layers.0.mlp", "layers.1.mlp"]),
    "stream": (dict(hidden=64), ["stream"]),
    "both": (dict(hidden=64, mlp=128), ["stream", "layers.0.mlp", "layers.1.mlp"]),
}


@pytest.mark.parametrize("widening,modes", list(itertools.product(
    WIDENINGS, [("global", "head_aware"), ("mean", "separate"), ("weighted_matrix", "eq_t_map")]
)))
def test_widened_copy_fused_into_the_original_width_gives_back_the_original(widening, modes, images):
    model = vit()
    sizes, spaces = WIDENINGS[widening]
    wide = widened_copy(model, hf_vit.graph(model), vit(seed=1, **sizes), spaces)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(logits(wide, images), logits(model, images), atol=1e-5, rtol=1e-5)
    residual, qk = modes
    settings = OTSettings(solver="emd", residual=residual, qk=qk, tokens="all")
    fused = fuse([wide, model], settings, images, anchor=1).model
    torch.testing.assert_close(logits(fused, images), logits(model, images), atol=1e-5, rtol=1e-5)
    for name, w in parameters(model).items():
        torch.testing.assert_close(parameters(fused)[name], w, atol=1e-5, rtol=1e-5, msg=name)


def test_widened_timm_copy_fuses_back(images):
    torch.manual_seed(0)
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, depth=2, num_heads=4, init_values=0.5)
    small = timm_vit.create("vit_tiny_patch16_224", dict(args, embed_dim=32, mlp_ratio=2.0)).eval()
    graph = timm_vit.graph(small)
    # timm ties the head dimension to the width: widen the MLPs only
    wide = widened_copy(small, graph, timm_vit.create("vit_tiny_patch16_224", dict(args, embed_dim=32, mlp_ratio=4.0)),
                        ["blocks.0.mlp", "blocks.1.mlp"])
    with torch.no_grad():
        torch.testing.assert_close(wide.eval()(images), small(images), atol=1e-5, rtol=1e-5)
    settings = OTSettings(solver="emd", residual="global", qk="head_aware", tokens="all")
    fused = ot_fuse([wide, small], graph, settings, 1, batches_of(images, 16), identity).model
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(images), small(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver,qk,cost", [
    ("emd", "head_aware", "activations"), ("sinkhorn", "head_aware", "activations"),
    ("emd", "separate", "activations"), ("sinkhorn", "separate", "activations"), ("emd", "head_aware", "weights"),
])
def test_rectangular_maps_keep_their_marginals(solver, qk, cost, images):
    large, small = vit(0, hidden=48, mlp=96, head_dim=12), vit(1, hidden=32, mlp=64, head_dim=8)
    settings = OTSettings(solver=solver, reg=0.05, residual="mean", qk=qk, tokens="all", cost=cost)
    outcome = fuse([large, small], settings, images, anchor=1)
    maps = outcome.maps[0]
    assert any(t.shape[0] != t.shape[1] for t in maps.values())
    for space, t in maps.items():
        n_a, n_b = t.shape
        torch.testing.assert_close(t.sum(1), torch.full((n_a,), 1 / n_a, dtype=t.dtype), atol=1e-3 / n_a, rtol=0, msg=space)
        torch.testing.assert_close(t.sum(0), torch.full((n_b,), 1 / n_b, dtype=t.dtype), atol=1e-3 / n_b, rtol=0, msg=space)
    for name, w in parameters(outcome.model).items():  # the anchor's (the smaller) architecture
        assert w.shape == parameters(small)[name].shape, name
    assert torch.isfinite(logits(outcome.model, images)).all()


def test_output_side_averages_and_input_side_keeps_the_total():
    n_a, n_b = 6, 4
    t = torch.rand(n_a, n_b, dtype=torch.float64)
    for _ in range(200):  # a coupling with uniform marginals
        t *= (1 / n_a) / t.sum(1, keepdim=True)
        t *= (1 / n_b) / t.sum(0, keepdim=True)
    rows = torch.full((n_a, 3), 2.5, dtype=torch.float64)
    torch.testing.assert_close(apply_out(rows, 0, t), torch.full((n_b, 3), 2.5, dtype=torch.float64))  # barycentres
    consumer = torch.randn(5, n_a, dtype=torch.float64)
    signal = torch.full((n_a,), 1.7, dtype=torch.float64)
    moved = apply_out(signal, 0, t)
    torch.testing.assert_close(apply_in(consumer, 1, t) @ moved, consumer @ signal)  # same total read


def test_different_depths_are_a_clear_error(images):
    with pytest.raises(TfuseError, match="different depths"):
        check_same_architecture([tiny_vit(depth=2), tiny_vit(depth=3)], allow_widths=True)
    with pytest.raises(TfuseError, match="flow graph does not describe"):
        fuse([tiny_vit(depth=3), tiny_vit(depth=2)], OTSettings(tokens="all"), images, anchor=1)
    check_same_architecture([vit(hidden=32), vit(hidden=48, head_dim=12)], allow_widths=True)
    with pytest.raises(TfuseError, match="shape"):
        check_same_architecture([vit(hidden=32), vit(hidden=48, head_dim=12)], allow_widths=False)


def test_parents_may_differ_in_widths_only(images):
    torch.manual_seed(0)
    other = ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
        patch_size=2, num_channels=1, num_labels=10,
    )).eval()
    with pytest.raises(TfuseError, match="not a hidden width"):
        fuse([other, vit()], OTSettings(tokens="all"), images, anchor=1)


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(str(root), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


TINY = ["data=digits", "model.hidden_size=32", "model.mlp_size=64", "model.patch_size=4", "train.epochs=2",
        "finetune.steps=3", "fusion.samples=40", "device=cpu"]


def test_vit_hetero_experiment_end_to_end(tmp_path):
    import io

    from rich.console import Console

    from tfuse.pipeline import run_fuse

    cfg = compose("+experiment=vit_hetero", *TINY, "parent_models=[{},{hidden_size:16,mlp_size:32}]",
                  f"cache_dir={tmp_path / 'parents'}")
    console = Console(file=io.StringIO(), width=200)
    results = run_fuse(cfg, tmp_path / "run", console)
    assert set(results["one_shot"]) == {"parent_0", "parent_1", "ensemble", "ot"}
    assert set(results["finetuned"]) == {"ot", "parent_0", "parent_1"}  # the small parent (and the large), same budget
    assert results["not_applicable"] == {"vanilla": "widths differ"} and results["anchor"] == 1
    assert "n/a" in console.file.getvalue()
    fused = hf_vit.load(str(tmp_path / "run" / "fused"))
    assert fused.config.hidden_size == 16 and fused.config.intermediate_size == 32
    assert len(list((tmp_path / "parents").iterdir())) == 2


def test_parent_models_needs_one_entry_per_parent(tmp_path):
    from tfuse.parents import parent_configs

    with pytest.raises(TfuseError, match="parent_models has 2 entries but n_parents=3"):
        parent_configs(compose("+experiment=vit_hetero", "n_parents=3"))
    small = parent_configs(compose("+experiment=vit_hetero"))[1]
    assert small.model.hidden_size == 64 and small.model.depth == 4
