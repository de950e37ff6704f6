"""The repair's replays change nothing: it equals a repair by whole forward passes, stage by stage,
bit for bit, whether its targets and block inputs are held in memory or spilled to disk and
whether the fused model's final modules stand in by their kept outputs or run again."""
import tempfile

import pytest
import torch

import tfuse.fusion.held as held_module
from tfuse.arch import hf_bert, hf_vit
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods.ot import OTSettings
from tfuse.fusion.methods.vanilla import vanilla_fuse
from tfuse.fusion.repair import Rows, repair
from tfuse.fusion.replay import find_stages, linear_layers
from tfuse.fusion.solvers import LeastSquares
from conftest import batches_of, tiny_vit
from test_bert_fusion import batches_of as text_batches_of, inputs_only, text_batches, tiny_bert
from test_repair import trained_like

identity = lambda batch: batch  # noqa: E731


def reference_repair(fused, parents, weights, graph, settings, batches) -> list:
    """lstsq as the repair's docstring states it: per stage, whole forward passes of every model."""
    stages, _ = find_stages(fused, graph, batches[0])
    layers = linear_layers(fused, graph)
    rows = Rows(graph, settings, batches)
    fits = []

    def seen(model, x, names, inputs):
        got, modules = {}, dict(model.named_modules())
        hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0])) if inputs else
                 modules[n].register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o)) for n in names]
        model(**x)
        for h in hooks:
            h.remove()
        return got

    with torch.no_grad():
        for stage in stages:
            method = LeastSquares({n: layers[n] for n in stage.modules}, settings.repair_ridge)
            for b, x in enumerate(batches):
                outs = [{n: rows(b, y) for n, y in seen(p, x, stage.modules, False).items()} for p in parents]
                method.add(rows(b, seen(fused, x, stage.modules[:1], True)[stage.modules[0]]), LeastSquares.target(outs, weights))
            fits += method.solve()
    return fits


def vits():
    return trained_like(tiny_vit(0), 1), trained_like(tiny_vit(1), 2)


def add_in_place(models):
    """Every MLP adds to its input in place: the LayerNorm output it reads, once kept, has moved."""
    for m in models:
        for layer in m.vit.layers:
            layer.mlp.register_forward_pre_hook(lambda mod, a: a[0].add_(0.5))


def share_a_norm(models):
    """One LayerNorm called twice in each block: it must never stand in for both calls."""
    for m in models:
        for layer in m.vit.layers:
            layer.layernorm_after = layer.layernorm_before


@pytest.mark.parametrize("change", [None, add_in_place, share_a_norm])
@pytest.mark.parametrize("held", [held_module.HELD_BYTES, 0])
def test_the_repair_equals_whole_forward_passes_bit_for_bit(change, held, images, monkeypatch):
    monkeypatch.setattr(held_module, "HELD_BYTES", held)
    settings = OTSettings(repair="lstsq", repair_ridge=1e-3, tokens="all")
    results = []
    for run in (repair, reference_repair):
        a, b = vits()
        graph = hf_vit.graph(a)
        fused = vanilla_fuse([a, b], [0.3, 0.7])
        if change is not None:
            change([fused, a, b])
        data = list(batches_of(images, 16)())
        fits = run(fused, [a, b], [0.3, 0.7], graph, settings, data, identity) if run is repair else \
            run(fused, [a, b], [0.3, 0.7], graph, settings, data)
        results.append(([(f.layer, f.before, f.after) for f in fits], parameters(fused)))
    (fits, state), (expected_fits, expected) = results
    assert fits == expected_fits
    assert all(torch.equal(state[name], w) for name, w in expected.items())


@pytest.mark.parametrize("method", ["lstsq", "rescale"])
def test_spilled_targets_and_block_inputs_give_the_same_repair_and_leave_no_files(method, tmp_path, monkeypatch):
    """BERT with padding and the MLM head: every target and parent block input spilled to
    temporary files, read back once, removed."""
    data = text_batches(pad_from=4)
    states, spilled = [], []
    save = held_module.save_file
    monkeypatch.setattr(held_module, "save_file", lambda *a, **k: (spilled.append(1), save(*a, **k)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for held in (held_module.HELD_BYTES, 0):
        monkeypatch.setattr(held_module, "HELD_BYTES", held)
        a, b = tiny_bert("mlm", 0), tiny_bert("mlm", 1)
        fused = vanilla_fuse([a, b], [0.5, 0.5])
        fits = repair(fused, [a, b], [0.5, 0.5], hf_bert.graph(a), OTSettings(repair=method), text_batches_of(data, 8)(),
                      inputs_only)
        states.append(([(f.layer, f.before, f.after) for f in fits], parameters(fused)))
        assert bool(spilled) == (held == 0) and not list(tmp_path.iterdir())
    assert states[0][0] == states[1][0]
    assert all(torch.equal(states[1][1][name], w) for name, w in states[0][1].items())
