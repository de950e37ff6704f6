"""Repair after alignment (METHOD.md section 7): exact targets give the model back, a refit never
raises a layer's calibration error, streamed equals all at once, every family and bad values."""
import pytest
import torch
from torch import nn

from tfuse.arch import hf_bert, hf_vit, timm_vit
from tfuse.errors import TfuseError
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods.ot import OTSettings, ot_fuse
from tfuse.fusion.methods.vanilla import vanilla_fuse
from tfuse.fusion.repair import repair
from tfuse.fusion.replay import Replay, find_stages, linear_layers
from tfuse.symmetry import permuted_copy
from conftest import batches_of, logits, tiny_vit
from test_bert_fusion import batches_of as text_batches_of, inputs_only, outputs, text_batches, tiny_bert
from test_hetero import vit as hetero_vit
from test_timm import out as timm_out, tiny_timm

identity = lambda batch: batch  # noqa: E731
HARD = dict(solver="emd", residual="global", qk="head_aware", tokens="all")


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """A different-seed model whose layers are far from the anchor's (random weights, scaled LayerNorms)."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("method", ["lstsq", "rescale"])
@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_repair_of_a_model_fused_with_its_permuted_copy_returns_the_model(method, ridge, images):
    model = trained_like(tiny_vit(), 3)
    copy = permuted_copy(model, hf_vit.graph(model), seed=5)
    settings = OTSettings(**HARD, repair=method, repair_ridge=ridge)
    outcome = ot_fuse([copy, model], hf_vit.graph(model), settings, 1, batches_of(images, 16), identity)
    torch.testing.assert_close(logits(outcome.model, images), logits(model, images), atol=1e-4, rtol=1e-4)
    if ridge > 0:  # ridge 0 may move weights along directions the calibration inputs never take
        for name, w in parameters(model).items():
            assert (parameters(outcome.model)[name] - w).abs().max() <= 1e-2 * w.abs().max() + 1e-6, name
    if method == "lstsq":
        assert len(outcome.repair) == 13 and max(f.after for f in outcome.repair) < 1e-6


def _layer_errors(fused, targets, weights, graph, x, before: dict) -> dict:
    """Per refit layer, independently of the repair's sums: squared error to the target of the
    layer's weights ``before`` and of its current ones, both on the repaired model's own inputs."""
    layers = linear_layers(fused, graph)
    seen_in, seen_out = {}, [{} for _ in targets]
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen_in.__setitem__(n, a[0])) for n, m in layers.items()]
    for store, t in zip(seen_out, targets):
        handles += [m.register_forward_hook(lambda m, i, o, n=n, s=store: s.__setitem__(n, o))
                    for n, m in linear_layers(t, graph).items()]
    with torch.no_grad():
        fused(pixel_values=x)
        for t in targets:
            t(pixel_values=x)
    for h in handles:
        h.remove()
    errors = {}
    for name, layer in layers.items():
        target = sum(a * s[name] for a, s in zip(weights, seen_out))
        w0, b0 = before[name]
        old = ((nn.functional.linear(seen_in[name], w0, b0) - target) ** 2).sum()
        new = ((layer(seen_in[name]) - target) ** 2).sum()
        errors[name] = (float(old.detach()), float(new.detach()))
    return errors


@pytest.mark.parametrize("ridge", [0.0, 1e-4, 1e-2, 10.0])
def test_lstsq_never_raises_a_layers_calibration_error(ridge, images):
    a, b = trained_like(tiny_vit(0), 1), trained_like(tiny_vit(1), 2)
    graph = hf_vit.graph(a)
    fused = vanilla_fuse([a, b], [0.5, 0.5])
    before = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in linear_layers(fused, graph).items()}
    settings = OTSettings(repair="lstsq", repair_ridge=ridge, tokens="all")
    fits = repair(fused, [a, b], [0.5, 0.5], graph, settings, batches_of(images, 16)(), identity)
    errors = _layer_errors(fused, [a, b], [0.5, 0.5], graph, images, before)
    assert set(errors) == {f.layer for f in fits}
    for fit in fits:
        old, new = errors[fit.layer]
        assert new <= old * (1 + 1e-5) + 1e-9, fit.layer
        energy = old / fit.before  # the repair's own before/after agree with the independent measurement
        assert fit.after * energy == pytest.approx(new, rel=2e-2, abs=1e-6), fit.layer
    improved = sum(errors[f.layer][1] < 0.5 * errors[f.layer][0] for f in fits)
    assert (improved == len(fits)) if ridge < 1 else (improved < len(fits))


def test_lstsq_with_a_large_ridge_leaves_the_model_as_fused(images):
    a, b = tiny_vit(0), tiny_vit(1)
    fused = vanilla_fuse([a, b], [0.5, 0.5])
    original = {n: w.clone() for n, w in parameters(fused).items()}
    repair(fused, [a, b], [0.5, 0.5], hf_vit.graph(a), OTSettings(repair="lstsq", repair_ridge=1e9),
           batches_of(images, 16)(), identity)
    for name, w in parameters(fused).items():
        torch.testing.assert_close(w, original[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["lstsq", "rescale"])
@pytest.mark.parametrize("tokens", ["all", "cls"])
def test_streamed_repair_equals_all_at_once(method, tokens, images):
    a, b = tiny_vit(0), tiny_vit(1)
    graph = hf_vit.graph(a)
    settings = OTSettings(repair=method, repair_tokens=tokens)
    repaired = []
    for size in (48, 5):
        fused = vanilla_fuse([a, b], [0.5, 0.5])
        repair(fused, [a, b], [0.5, 0.5], graph, settings, batches_of(images, size)(), identity)
        repaired.append(fused)
    torch.testing.assert_close(logits(repaired[1], images), logits(repaired[0], images), atol=2e-5, rtol=1e-4)
    if tokens == "all":  # 240 samples of 33 unknowns: the weights themselves are well determined
        for name, w in parameters(repaired[0]).items():
            assert (parameters(repaired[1])[name] - w).abs().max() <= 5e-3 * w.abs().max() + 1e-7, name


@pytest.mark.parametrize("family", ["hf_vit", "timm_vit", "hf_bert"])
def test_a_replay_from_a_cached_block_input_equals_the_whole_forward(family, images):
    """What makes the repair linear in depth: bypassing blocks 0..k-1 with block k's cached input
    gives the same block outputs and the same final outputs."""
    if family == "hf_bert":
        model, x = tiny_bert("cls"), inputs_only(text_batches(8, pad_from=4))
        graph, run = hf_bert.graph(model), lambda m: m(**x).logits
    elif family == "timm_vit":
        model, x = tiny_timm(), {"x": images[:8]}
        graph, run = timm_vit.graph(model), lambda m: m(**x)
    else:
        model, x = tiny_vit(), {"pixel_values": images[:8]}
        graph, run = hf_vit.graph(model), lambda m: m(**x).logits
    replay = Replay(model, graph.blocks)
    with torch.no_grad():
        expected = run(model)
        outs, state = [], None
        for k in range(len(graph.blocks)):
            state = replay.run(x, state, block_output=True)["block"]
            outs.append(state)
            replay.start += 1
        seen = {}
        hooks = [dict(model.named_modules())[b].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
                 for k, b in enumerate(graph.blocks)]
        assert torch.equal(run(model), expected)
        for h in hooks:
            h.remove()
        for k, out in enumerate(outs):
            torch.testing.assert_close(out, seen[k], atol=0, rtol=0)
        last = linear_layers(model, graph)
        head = list(last)[-1]
        got = replay.run(x, state, outputs_of=[head])[("out", head)]  # the tail alone, every block bypassed
        assert replay.start == len(graph.blocks) and all("forward" not in vars(b) for b in replay.blocks)
    captured = {}
    handle = dict(model.named_modules())[head].register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    with torch.no_grad():
        run(model)
    handle.remove()
    torch.testing.assert_close(got, captured["o"], atol=0, rtol=0)


def test_stages_group_the_layers_that_read_one_tensor(images):
    model = tiny_vit()
    stages, _ = find_stages(model, hf_vit.graph(model), {"pixel_values": images[:2]})
    names = [s.modules for s in stages]
    assert names[0] == tuple(f"vit.layers.0.attention.{p}_proj" for p in "qkv")
    assert names[1:4] == [("vit.layers.0.attention.o_proj",), ("vit.layers.0.mlp.fc1",), ("vit.layers.0.mlp.fc2",)]
    assert names[-1] == ("classifier",) and stages[-1].segment == 3 and stages[0].segment == 1
    timm_model = tiny_timm(qkv_bias=False)
    timm_stages, _ = find_stages(timm_model, timm_vit.graph(timm_model), {"x": images[:2]})
    assert timm_stages[0].modules == ("blocks.0.attn.qkv",) and timm_stages[-1].modules == ("head",)


def _improves(fits) -> bool:
    return all(f.after <= f.before * (1 + 1e-5) + 1e-9 for f in fits) and sum(f.after for f in fits) < 0.5 * sum(f.before for f in fits)


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": False}, {"init_values": 1e-5, "reg_tokens": 2},
                                     {"class_token": False, "global_pool": "avg"}])
def test_timm_repair_through_the_fused_qkv(variant, images):
    model = tiny_timm(**variant)
    copy = permuted_copy(model, timm_vit.graph(model), seed=4)
    settings = OTSettings(**HARD, repair="lstsq")
    outcome = ot_fuse([copy, model], timm_vit.graph(model), settings, 1, batches_of(images, 16), lambda b: b)
    torch.testing.assert_close(timm_out(outcome.model, images), timm_out(model, images), atol=1e-4, rtol=1e-4)
    other = tiny_timm(seed=1, **variant)
    outcome = ot_fuse([other, model], timm_vit.graph(model), settings, 1, batches_of(images, 16), lambda b: b)
    assert _improves(outcome.repair) and torch.isfinite(timm_out(outcome.model, images)).all()


@pytest.mark.parametrize("head", ["mlm", "cls", "bare"])
@pytest.mark.parametrize("method", ["lstsq", "rescale"])
def test_bert_repair_every_head_with_padding(head, method):
    data = text_batches(pad_from=4)
    model = tiny_bert(head)
    copy = permuted_copy(model, hf_bert.graph(model), seed=6)
    settings = OTSettings(**HARD, repair=method)
    graph = hf_bert.graph(model)
    outcome = ot_fuse([copy, model], graph, settings, 1, text_batches_of(data, 8), inputs_only)
    torch.testing.assert_close(outputs(outcome.model, inputs_only(data)), outputs(model, inputs_only(data)), atol=1e-4, rtol=1e-4)
    other = tiny_bert(head, seed=1)
    outcome = ot_fuse([other, model], graph, settings, 1, text_batches_of(data, 8), inputs_only)
    assert torch.isfinite(outputs(outcome.model, inputs_only(data))).all()
    if method == "lstsq":
        assert _improves(outcome.repair)
        layers = {f.layer for f in outcome.repair}
        assert ("bert.pooler.dense" in layers) == (head == "cls") and ("classifier" in layers) == (head == "cls")
        assert ("cls.predictions.transform.dense" in layers) == (head == "mlm")


def test_padding_never_counts_in_the_repair():
    """Changing what padded positions hold changes nothing."""
    data = text_batches(pad_from=4)
    noisy = {k: v.clone() for k, v in data.items()}
    noisy["input_ids"][noisy["attention_mask"] == 0] = 7
    a, b = tiny_bert("mlm", 0), tiny_bert("mlm", 1)
    graph = hf_bert.graph(a)
    states = []
    for d in (data, noisy):
        fused = vanilla_fuse([a, b], [0.5, 0.5])
        repair(fused, [a, b], [0.5, 0.5], graph, OTSettings(repair="lstsq"), text_batches_of(d, 8)(), inputs_only)
        states.append(parameters(fused))
    for name, w in states[0].items():
        torch.testing.assert_close(states[1][name], w, atol=1e-5, rtol=1e-4, msg=name)


def test_heterogeneous_and_n_parent_repair_stay_finite_and_fit_better(images):
    small, large = hetero_vit(0, hidden=16, mlp=32, head_dim=4), hetero_vit(1, hidden=32, mlp=64, head_dim=8)
    settings = OTSettings(**HARD, repair="lstsq")
    outcome = ot_fuse([large, small], hf_vit.graph(small), settings, 1, batches_of(images, 16), identity)
    assert outcome.model.config.hidden_size == 16 and _improves(outcome.repair)
    assert torch.isfinite(logits(outcome.model, images)).all()
    parents = [tiny_vit(s) for s in range(4)]
    for method in ("lstsq", "rescale"):
        outcome = ot_fuse(parents, hf_vit.graph(parents[0]), OTSettings(**HARD, repair=method), 0,
                          batches_of(images, 16), identity)
        assert torch.isfinite(logits(outcome.model, images)).all()
        assert method == "rescale" or _improves(outcome.repair)


def test_repair_uses_its_own_samples(images):
    """``repair_calibration`` (``fusion.repair_samples``) is read; the map's calibration is not."""
    a, b = tiny_vit(0), tiny_vit(1)
    settings = OTSettings(**HARD, repair="lstsq", samples=8)
    few = ot_fuse([a, b], hf_vit.graph(a), settings, 0, batches_of(images[:8], 8), identity)
    more = ot_fuse([a, b], hf_vit.graph(a), settings, 0, batches_of(images[:8], 8), identity,
                   repair_calibration=batches_of(images, 16))
    assert not torch.equal(parameters(few.model)["classifier.weight"], parameters(more.model)["classifier.weight"])


def test_bad_repair_values_are_clear_errors(images):
    with pytest.raises(TfuseError, match="fusion.repair='refit' is not a known value; allowed: none, rescale, lstsq"):
        OTSettings(repair="refit")
    with pytest.raises(TfuseError, match="fusion.repair_ridge=-1"):
        OTSettings(repair_ridge=-1)
    with pytest.raises(TfuseError, match="fusion.repair_samples=0"):
        OTSettings(repair_samples=0)
    a, b = tiny_vit(0), tiny_vit(1)
    broken = tiny_vit(1)
    with torch.no_grad():
        broken.vit.layers[1].mlp.fc1.weight[0, 0] = float("inf")
    with pytest.raises(TfuseError, match=r"layer 'vit.layers.1.mlp.fc1' are not finite"):
        repair(vanilla_fuse([a, b], [0.5, 0.5]), [a, broken], [0.5, 0.5], hf_vit.graph(a),
               OTSettings(repair="lstsq"), batches_of(images, 16)(), identity)
