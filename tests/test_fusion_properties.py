"""METHOD.md section 6: permutation invariance, exact recovery, self-fusion, streamed statistics."""
import itertools

import pytest
import torch

from tfuse.arch import hf_vit
from tfuse.errors import TfuseError
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods import settings_from_config
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.methods.vanilla import vanilla_fuse
from tfuse.fusion.plan import make_plan
from tfuse.fusion.statistics import collect_statistics
from tfuse.symmetry import permuted_copy
from conftest import batches_of, logits, tiny_vit

identity = lambda batch: batch  # noqa: E731


def fuse(models, settings, x, anchor=0, batch=16):
    graph = hf_vit.graph(models[anchor])
    return ot_fuse(models, graph, settings, anchor, batches_of(x, batch), identity).model


def test_permuted_copy_computes_the_same_function(images):
    model = tiny_vit()
    copy = permuted_copy(model, hf_vit.graph(model), seed=3)
    assert not torch.equal(parameters(copy)["vit.layers.0.mlp.fc1.weight"], parameters(model)["vit.layers.0.mlp.fc1.weight"])
    torch.testing.assert_close(logits(copy, images), logits(model, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual,qk", list(itertools.product(OTSettings.CHOICES["residual"], OTSettings.CHOICES["qk"])))
def test_hard_fusion_with_permuted_copy_gives_back_the_model(images, residual, qk):
    model = tiny_vit()
    copy = permuted_copy(model, hf_vit.graph(model), seed=5)
    settings = OTSettings(solver="emd", residual=residual, qk=qk, tokens="all")
    fused = fuse([copy, model], settings, images, anchor=1)
    torch.testing.assert_close(logits(fused, images), logits(model, images), atol=1e-5, rtol=1e-5)
    for name, w in parameters(model).items():
        torch.testing.assert_close(parameters(fused)[name], w, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("residual,qk", [("global", "head_aware"), ("global", "eq_t_map"), ("mean", "separate")])
def test_weight_cost_recovers_the_permutation(residual, qk, images):
    model = tiny_vit()
    copy = permuted_copy(model, hf_vit.graph(model), seed=7)
    settings = OTSettings(solver="emd", cost="weights", residual=residual, qk=qk)
    fused = ot_fuse([copy, model], hf_vit.graph(model), settings, 1, None, identity).model
    torch.testing.assert_close(logits(fused, images), logits(model, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", ["cls", "window", "random"])
def test_token_filters_keep_exact_recovery(tokens, images):
    model = tiny_vit()
    copy = permuted_copy(model, hf_vit.graph(model), seed=2)
    settings = OTSettings(solver="emd", residual="global", qk="head_aware", tokens=tokens, window=2, token_count=5)
    fused = fuse([copy, model], settings, images, anchor=1)
    torch.testing.assert_close(logits(fused, images), logits(model, images), atol=1e-5, rtol=1e-5)


def test_self_fusion_is_exact_when_hard_and_converges_as_reg_shrinks(images):
    model = tiny_vit()
    hard = fuse([model, model], OTSettings(solver="emd", tokens="all"), images)
    torch.testing.assert_close(logits(hard, images), logits(model, images), atol=1e-6, rtol=1e-6)
    errors = []
    for reg in (0.3, 0.1, 0.03, 0.01):
        soft = fuse([model, model], OTSettings(solver="sinkhorn", reg=reg, residual="global", tokens="all"), images)
        errors.append((logits(soft, images) - logits(model, images)).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 < errors[0]


def test_three_permuted_copies_fuse_back_to_the_model(images):
    model = tiny_vit()
    graph = hf_vit.graph(model)
    parents = [permuted_copy(model, graph, seed=s) for s in (1, 2)] + [model]
    for iterations in (1, 2):
        settings = OTSettings(solver="emd", residual="global", qk="head_aware", tokens="all", iterations=iterations)
        fused = fuse(parents, settings, images, anchor=2)
        torch.testing.assert_close(logits(fused, images), logits(model, images), atol=1e-5, rtol=1e-5)


def test_streamed_statistics_equal_all_at_once(images):
    a, b = tiny_vit(0), tiny_vit(1)
    graph = hf_vit.graph(b)
    settings = OTSettings(tokens="all", residual="weighted_matrix", qk="joint", center=True)  # center: sums kept
    plan = make_plan(graph, settings)
    small = collect_statistics([a], b, graph, plan, batches_of(images, 5)(), identity, settings)
    whole = collect_statistics([a], b, graph, plan, batches_of(images, len(images))(), identity, settings)
    for space, stats in whole.pairs[0].items():
        other = small.pairs[0][space]
        tokens = (b.config.image_size // b.config.patch_size) ** 2 + 1
        assert stats.a.count == other.a.count == len(images) * tokens * len(plan.segments[space][0])
        for x, y in ((stats.cross, other.cross), (stats.a.sum, other.a.sum), (stats.b.sumsq, other.b.sumsq)):
            # float32 sums in another order: equal up to rounding relative to the largest entry
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * float(x.abs().max()))
    for probe, mag in whole.magnitude[0].items():
        torch.testing.assert_close(mag, small.magnitude[0][probe], rtol=1e-6, atol=1e-8)
    soft = OTSettings(tokens="all", residual="weighted_matrix", qk="joint")
    fused_small = fuse([a, b], soft, images, anchor=1, batch=5)
    fused_whole = fuse([a, b], soft, images, anchor=1, batch=len(images))
    torch.testing.assert_close(logits(fused_small, images), logits(fused_whole, images), atol=1e-4, rtol=1e-4)


def test_vanilla_self_fusion_and_ot_differs_from_vanilla(images):
    a, b = tiny_vit(0), tiny_vit(1)
    torch.testing.assert_close(logits(vanilla_fuse([a, a], [0.5, 0.5]), images), logits(a, images))
    ot_model = fuse([a, b], OTSettings(tokens="all"), images, anchor=1)
    assert not torch.allclose(logits(ot_model, images), logits(vanilla_fuse([a, b], [0.5, 0.5]), images))


def test_unknown_option_lists_allowed_values():
    with pytest.raises(TfuseError, match="fusion.solver='lp'.*allowed: emd, sinkhorn"):
        OTSettings(solver="lp")
    with pytest.raises(TfuseError, match="unknown key .fusion.regg.; did you mean fusion.reg"):
        settings_from_config({"regg": 0.1})


def test_nan_in_cost_names_the_layer(images):
    a, b = tiny_vit(0), tiny_vit(1)
    with torch.no_grad():
        a.vit.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(TfuseError, match="layers.1.mlp"):
        fuse([a, b], OTSettings(tokens="all", residual="global"), images, anchor=1)


def test_sinkhorn_that_does_not_converge_is_an_error(images):
    a, b = tiny_vit(0), tiny_vit(1)
    settings = OTSettings(solver="sinkhorn", reg=1e-4, sinkhorn_iters=2, tokens="all")
    with pytest.raises(TfuseError, match="Sinkhorn did not converge for layer"):
        fuse([a, b], settings, images, anchor=1)
