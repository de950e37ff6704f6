"""Weight matching (git re-basin) through the method registry: exact recovery for every family,
no calibration data, monotone coordinate descent, clear errors."""
import pytest
import torch

from tfuse.arch import hf_bert, hf_vit, timm_vit
from tfuse.errors import TfuseError
from tfuse.fusion.apply import align
from tfuse.fusion.engine import parameters
from tfuse.fusion.methods import METHODS, Calibration, settings_from_config
from tfuse.fusion.methods.weight_matching import SYMMETRIES, WeightMatchingSettings, match_weights
from tfuse.fusion.plan import make_plan
from tfuse.symmetry import permuted_copy
from conftest import logits, tiny_vit
from test_bert_fusion import tiny_bert
from test_timm import tiny_timm


def no_data():
    raise AssertionError("weight matching read calibration data")


DATA_FREE = Calibration(batches=no_data, model_inputs=lambda batch: batch)


def fuse(models, family, anchor=0, **settings):
    settings = WeightMatchingSettings(method="weight_matching", **settings)
    return METHODS["weight_matching"].fuse(models, family.graph(models[anchor]), anchor, DATA_FREE, settings)


@pytest.mark.parametrize("family,build", [(hf_vit, tiny_vit), (timm_vit, tiny_timm), (hf_bert, lambda seed: tiny_bert(seed=seed))])
def test_a_permuted_copy_is_recovered_exactly_without_data(family, build):
    model = build(0)
    graph = family.graph(model)
    copy = permuted_copy(model, graph, seed=4)
    assert any(not torch.equal(parameters(copy, graph)[n], w) for n, w in parameters(model, graph).items())
    outcome = fuse([copy, model], family, anchor=1)
    for name, w in parameters(model, graph).items():
        torch.testing.assert_close(parameters(outcome.model, graph)[name], w, atol=1e-6, rtol=1e-5, msg=name)
    # the maps are permutations carrying the copy back onto the model
    aligned = align(parameters(copy, graph), graph, make_plan(graph, SYMMETRIES), outcome.maps[0])
    for name, w in parameters(model, graph).items():
        torch.testing.assert_close(aligned[name], w, atol=1e-6, rtol=1e-5, msg=name)
    assert outcome.info["sweeps"][0] < 10  # converged: a sweep that changed nothing


def test_three_parents_two_permuted_copies_give_back_the_model(images):
    model = tiny_vit(0)
    graph = hf_vit.graph(model)
    copies = [permuted_copy(model, graph, seed=s) for s in (1, 2)]
    fused = fuse([copies[0], model, copies[1]], hf_vit, anchor=1).model
    torch.testing.assert_close(logits(fused, images), logits(model, images), atol=1e-5, rtol=1e-5)


def test_coordinate_descent_never_lowers_the_agreement_and_stops_when_nothing_changes():
    a, b = tiny_vit(0), tiny_vit(1)
    graph = hf_vit.graph(b)
    plan = make_plan(graph, SYMMETRIES)
    state, reference = parameters(a, graph), parameters(b, graph)

    def agreement(perms):
        maps = {name: torch.zeros(len(p), len(p), dtype=torch.float64).index_put_((p, torch.arange(len(p))), torch.tensor(1.0 / len(p), dtype=torch.float64))
                for name, p in perms.items()}
        moved = align(state, graph, plan, maps)
        return sum(float((moved[n].double() * reference[n].double()).sum()) for n in graph.params)

    identity = {name: torch.arange(p.numel()) for name, p in match_weights(state, reference, graph, plan, 1, 0)[0].items()}
    previous = agreement(identity)
    for sweeps in (1, 2, 4):
        perms, used = match_weights(state, reference, graph, plan, sweeps, 0)
        score = agreement(perms)
        assert score >= previous - 1e-9
        previous = score
    perms, used = match_weights(state, reference, graph, plan, 100, 0)
    assert used < 100 and agreement(perms) >= previous - 1e-9
    again, _ = match_weights(state, reference, graph, plan, 100, 0)
    assert all(torch.equal(again[n], perms[n]) for n in perms)  # seeded: deterministic


def test_different_widths_are_refused_with_the_parameter_named():
    wide, small = tiny_vit(0, hidden=32), tiny_vit(1, hidden=16, mlp=32)
    with pytest.raises(TfuseError, match="weight_matching permutes neurons.*fusion.method=ot"):
        fuse([wide, small], hf_vit, anchor=1)


def test_settings_take_their_own_knobs_and_ignore_the_other_methods():
    settings = settings_from_config({"method": "weight_matching", "solver": "emd", "max_sweeps": 7, "repair": "lstsq"})
    assert isinstance(settings, WeightMatchingSettings) and settings.max_sweeps == 7 and settings.repair == "lstsq"
    with pytest.raises(TfuseError, match="fusion.max_sweeps=0"):
        settings_from_config({"method": "weight_matching", "max_sweeps": 0})
    with pytest.raises(TfuseError, match="unknown key .fusion.sweeps.; did you mean fusion.max_sweeps"):
        settings_from_config({"method": "weight_matching", "sweeps": 3})
    with pytest.raises(TfuseError, match="fusion.method='rebasin'.*allowed: ot, vanilla, weight_matching"):
        settings_from_config({"method": "rebasin"})
