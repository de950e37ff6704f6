"""More than two parents (METHOD.md section 4): permuted-copy recovery for any N, alpha applied
the same way in every layer, anchor by index or the best on validation, iterations."""
import pytest
import torch

from tfuse.arch import hf_vit
from tfuse.errors import TfuseError
from tfuse.fusion.apply import average
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.pipeline.stages import choose_anchor
from tfuse.symmetry import permuted_copy
from conftest import batches_of, logits, tiny_vit

identity = lambda batch: batch  # noqa: E731
HARD = dict(solver="emd", residual="global", qk="head_aware", tokens="all")


def fuse(models, settings, x, anchor):
    return ot_fuse(models, hf_vit.graph(models[anchor]), settings, anchor, batches_of(x, 16), identity).model


@pytest.mark.parametrize("n,anchor,iterations", [(3, 0, 1), (4, 2, 1), (4, 3, 3), (6, 5, 1)])
def test_n_permuted_copies_fuse_back_to_the_model(n, anchor, iterations, images):
    model = tiny_vit()
    graph = hf_vit.graph(model)
    parents = [permuted_copy(model, graph, seed=s + 10) for s in range(n)]
    parents[anchor] = model
    fused = fuse(parents, OTSettings(iterations=iterations, **HARD), images, anchor)
    torch.testing.assert_close(logits(fused, images), logits(model, images), atol=1e-5, rtol=1e-5)


def test_alpha_weighs_every_layer_alike(images):
    """alpha one-hot on a non-anchor parent: hard global/head-aware maps are a permutation, so the
    fused model must compute that parent's function exactly (no layer may weigh the anchor 1/2)."""
    parents = [tiny_vit(s) for s in range(3)]
    fused = fuse(parents, OTSettings(alpha=[0.0, 0.0, 1.0], **HARD), images, anchor=0)
    torch.testing.assert_close(logits(fused, images), logits(parents[2], images), atol=1e-5, rtol=1e-5)
    fused = fuse(parents, OTSettings(alpha=[1.0, 0.0, 0.0], **HARD), images, anchor=0)
    for name, w in parameters(parents[0]).items():
        torch.testing.assert_close(parameters(fused)[name], w, msg=name)


def test_uniform_alpha_is_one_over_n_everywhere(images):
    """Three parents where two are the same model: the fused weights are (2 x aligned + other) / 3
    in every parameter, classifier and embeddings included."""
    a, b = tiny_vit(0), tiny_vit(1)
    graph = hf_vit.graph(a)
    outcome = ot_fuse([a, b, a], graph, OTSettings(**HARD), 0, batches_of(images, 16), identity)
    from tfuse.fusion.apply import align
    from tfuse.fusion.plan import make_plan

    aligned_b = align(parameters(b), graph, make_plan(graph, OTSettings(**HARD)), outcome.maps[1])
    for name, w in parameters(outcome.model).items():
        torch.testing.assert_close(w, (2 * parameters(a)[name] + aligned_b[name]) / 3, atol=1e-6, rtol=1e-5, msg=name)


def test_anchor_by_index_or_best():
    class Task:
        primary_metric, higher_is_better = "accuracy", True

        def evaluate(self, model, split):
            return {"accuracy": model}

    assert choose_anchor(2, [0.1, 0.9, 0.5], Task()) == (2, None)
    assert choose_anchor("best", [0.1, 0.9, 0.5], Task()) == (1, [0.1, 0.9, 0.5])
    with pytest.raises(TfuseError, match="3 parents"):
        choose_anchor(3, [0.1, 0.9, 0.5], Task())
    with pytest.raises(TfuseError, match="needs 3 non-negative weights"):
        OTSettings(alpha=[0.5, 0.5]).weights(3)


def test_three_timm_parents_with_the_best_anchor_end_to_end(tmp_path):
    import io
    import json
    from pathlib import Path

    import timm
    from hydra import compose, initialize_config_dir
    from rich.console import Console
    from safetensors.torch import load_file

    from tfuse.pipeline import run_fuse

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "configs"), version_base=None):
        cfg = compose("config", overrides=[
            "+experiment=vit_digits_tiny", "model=timm_vit", "model.patch_size=4", "n_parents=3", "fusion.anchor=best",
            "train.epochs=1", "finetune.steps=0", "fusion.samples=40", "device=cpu", f"cache_dir={tmp_path / 'parents'}",
        ])
    results = run_fuse(cfg, tmp_path / "run", Console(file=io.StringIO()))
    assert {"parent_0", "parent_1", "parent_2", "vanilla", "ot"} <= set(results["one_shot"])
    scores = results["anchor_val_scores"]
    assert results["anchor"] == scores.index(max(scores)) and results["alpha"] == pytest.approx([1 / 3] * 3)
    config = json.loads((tmp_path / "run" / "fused" / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["kwargs"])
    model.load_state_dict(load_file(str(tmp_path / "run" / "fused" / "model.safetensors")))
    assert model.embed_dim == 32 and len(model.blocks) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_average_weighs_each_parent_and_leaves_them_untouched(dtype):
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 3, generator=gen, dtype=dtype), "b": torch.randn(5, generator=gen, dtype=dtype)} for _ in range(3)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    weights = [0.2, 0.3, 0.5]
    out = average(states, weights)
    for name in ("w", "b"):
        expected = sum(a * s[name].double() for a, s in zip(weights, before)).to(dtype)
        assert out[name].dtype == dtype
        torch.testing.assert_close(out[name], expected)  # float64 sums either way: rounding only
    for s, b in zip(states, before):
        assert all(torch.equal(s[k], b[k]) for k in s)
